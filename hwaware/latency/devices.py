"""Device profiles (`profiles/<name>.yaml`) and which of them are present on this machine.

A profile says how to recognise a device, how it serves (backend, precision, batch sizes),
how to measure on it, which TensorRT releases support it and its peak figures, which the
roofline `--estimate` scales. Users add a device by adding a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwaware import bounds
from hwaware.errors import HwawareError
from hwaware.io import excerpt, read_yaml
from hwaware.precision import BACKENDS, PRECISIONS


@dataclass(frozen=True)
class MeasureSettings:
    """How long to time each thing and how to guard against drift.

    Repeats run until both `min_repeats` and `min_time_s` are reached (capped by `max_repeats`).
    Every `anchor_every` items an anchor is timed again. A profile measures a segment again (up to
    `max_remeasure` times) when its anchor moved more than `drift_tolerance` from the quietest one seen;
    recalibration and transfer rescale each subnet's reading by the first anchor over the latest, and
    time each subnet `subnet_rounds` times, round-robin within its segment, reading the quickest round.
    """

    warmup: int = 10
    min_repeats: int = 30
    min_time_s: float = 0.3
    max_repeats: int = 2000
    threads: int | None = 1
    anchor_every: int = 6
    subnet_rounds: int = 2
    drift_tolerance: float = 0.05
    max_remeasure: int = 2
    fit_subnets: int = 20
    holdout_subnets: int = 30
    statistic: str = "median"  # what a table predicts from: "median" or "min" (uncontended speed on shared hosts)
    cuda_graph: bool = False  # GPU backends time replays of one captured run (launch overhead removed, as served)

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "measurement") -> MeasureSettings:
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise HwawareError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if not isinstance(data.get("cuda_graph", False), bool):
            raise HwawareError(f"{source}: cuda_graph must be true or false, got {data['cuda_graph']!r}")
        try:
            defaults = cls()
            settings = cls(**{k: (v if v is None or k == "cuda_graph" else type(getattr(defaults, k) or 0)(v))
                              for k, v in data.items()})
        except (TypeError, ValueError, OverflowError) as exc:
            raise HwawareError(f"{source}: {str(exc)[:120]}") from None
        for name, (low, high) in bounds.MEASUREMENT.items():
            value = getattr(settings, name)
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                raise HwawareError(f"{source}: {name} must be in {low}..{high}, got {excerpt(data.get(name, value))}")
        if settings.min_repeats < 1 or settings.warmup < 0 or settings.min_time_s < 0 or settings.max_repeats < 1:
            raise HwawareError(f"{source}: warmup >= 0, min_repeats >= 1, max_repeats >= 1 and min_time_s >= 0")
        if settings.statistic not in ("median", "min"):
            raise HwawareError(f"{source}: statistic must be median or min, got {settings.statistic!r}")
        if settings.fit_subnets < 3 or settings.holdout_subnets < 0:
            raise HwawareError(f"{source}: fit_subnets must be at least 3 (the correction has 3 coefficients)")
        return settings

    def replace(self, **changes: Any) -> MeasureSettings:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update({k: v for k, v in changes.items() if v is not None})
        return MeasureSettings.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # "cpu" | "cuda"
    name_contains: tuple[str, ...] = ()
    name_excludes: tuple[str, ...] = ()
    compute_capability: tuple[int, int] | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1,)
    measurement: MeasureSettings = field(default_factory=MeasureSettings)
    tensorrt: dict = field(default_factory=dict)
    peak_flops: dict = field(default_factory=dict)  # precision -> FLOP/s (2 FLOP per multiply-add)
    memory_bandwidth: float = 0.0  # bytes/s
    path: str = ""

    def matches(self, kind: str, device_name: str = "", capability: tuple[int, int] | None = None) -> bool:
        """True if a device of `kind` called `device_name` with `capability` is this profile's device."""
        if kind != self.kind:
            return False
        if kind == "cpu":
            return True
        upper = device_name.upper()
        if self.name_contains and not any(s.upper() in upper for s in self.name_contains):
            return False
        if any(s.upper() in upper for s in self.name_excludes):
            return False
        return self.compute_capability is None or capability is None or tuple(capability) == self.compute_capability

    def peak_flops_for(self, precision: str) -> float:
        value = self.peak_flops.get(precision)
        if not value:
            raise HwawareError(f"profile {self.name}: no peak FLOP/s for {precision} in {self.path or 'the profile'}")
        return float(value)


def profile_dirs() -> list[Path]:
    """Where device profiles are looked up, first match wins: each folder in `$HWAWARE_PROFILES`
    (separated by the OS path separator), then the profiles that ship with hwaware."""
    from importlib.resources import files

    extra = [Path(p) for p in os.environ.get("HWAWARE_PROFILES", "").split(os.pathsep) if p]
    return [*extra, Path(str(files("hwaware.profiles")))]


def list_profiles(root: str | Path | None = None) -> list[str]:
    roots = [Path(root)] if root else profile_dirs()
    return sorted({p.stem for folder in roots for p in folder.glob("*.yaml")})


def _profile_path(name: str, root: str | Path | None) -> Path:
    if str(name).endswith((".yaml", ".yml")):
        return Path(name)
    roots = [Path(root)] if root else profile_dirs()
    for folder in roots:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = ", ".join(list_profiles(root)) or "none"
    raise HwawareError(f"device: unknown device {name!r}; profiles: {known} "
                       f"(add one as {name}.yaml in a folder named by $HWAWARE_PROFILES)")


def load_device_profile(name: str, root: str | Path | None = None) -> DeviceProfile:
    """The profile `name` (a file stem in a profiles folder, see `profile_dirs`) or a path to a profile YAML."""
    path = _profile_path(name, root)
    if not path.is_file():
        raise HwawareError(f"device: {path}: no such profile file")
    data = read_yaml(path, "device")  # a FIFO, a huge or deep file, malformed YAML: one line
    if not isinstance(data, dict) or "match" not in data:
        raise HwawareError(f"{path}: a device profile needs at least name, match, backend and precision")
    match = data.get("match") or {}
    peak = data.get("peak") or {}
    backend, precision = data.get("backend", "onnxruntime"), data.get("precision", "fp32")
    if backend not in BACKENDS:
        raise HwawareError(f"{path}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise HwawareError(f"{path}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if match.get("kind") not in ("cpu", "cuda"):
        raise HwawareError(f"{path}: match.kind must be cpu or cuda")
    try:
        cc = match.get("compute_capability")
        profile = DeviceProfile(
            name=str(data.get("name") or path.stem),
            description=str(data.get("description", "")),
            kind=match["kind"],
            name_contains=tuple(str(s) for s in match.get("name_contains") or ()),
            name_excludes=tuple(str(s) for s in match.get("name_excludes") or ()),
            compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
            backend=backend,
            precision=precision,
            batch_sizes=tuple(int(b) for b in data.get("batch_sizes") or (1,)),
            measurement=MeasureSettings.from_dict(data.get("measurement"), f"{path}: measurement"),
            tensorrt=dict(data.get("tensorrt") or {}),
            # YAML 1.1 reads 15.7e12 (no exponent sign) as a string; float() accepts both.
            peak_flops={k: float(v) for k, v in (peak.get("flops") or {}).items() if v is not None},
            memory_bandwidth=float(peak.get("memory_bandwidth") or 0.0),
            path=str(path),
        )
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise HwawareError(f"{path}: {str(exc)[:120]}") from None
    _check_figures(profile, path)
    return profile


def _check_figures(profile: DeviceProfile, path: Path) -> None:
    """Peaks a roofline divides by must be positive (a negative one inverts the ranking search prices
    with), batch sizes within the CLI's bounds."""
    for precision, flops in profile.peak_flops.items():
        if not (math.isfinite(flops) and flops > 0):
            raise HwawareError(f"{path}: peak.flops.{precision} must be a positive FLOP/s figure, got {flops:g}")
    if not (math.isfinite(profile.memory_bandwidth) and profile.memory_bandwidth >= 0):
        raise HwawareError(f"{path}: peak.memory_bandwidth must be a positive bytes/s figure (or left out), "
                           f"got {profile.memory_bandwidth:g}")
    if not profile.batch_sizes or not all(1 <= b <= 65536 for b in profile.batch_sizes):
        raise HwawareError(f"{path}: batch_sizes must be integers in 1..65536")


@dataclass(frozen=True)
class PresentDevice:
    kind: str  # "cpu" | "cuda"
    index: int
    name: str
    capability: tuple[int, int] | None = None

    def label(self) -> str:
        return self.name if self.kind == "cpu" else f"cuda:{self.index} {self.name}"


def present_devices() -> list[PresentDevice]:
    """This machine's CPU and every NVIDIA GPU: from nvidia-smi (so a GPU counts even where torch has no
    kernels for it, as on a V100 with a current torch), else from torch."""
    from hwaware.latency.host import cpu_model, gpus, usable_cores

    found = [PresentDevice("cpu", 0, f"CPU {cpu_model()} ({usable_cores()} cores)")]
    listed = gpus()
    if listed:
        for gpu in listed:
            cc = gpu["compute_capability"]
            found.append(PresentDevice("cuda", gpu["index"], gpu["gpu"],
                                       tuple(int(p) for p in cc.split(".")) if cc else None))
        return found
    if not Path("/proc/driver/nvidia").exists():
        return found  # no NVIDIA driver: skip importing torch just to hear that
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                found.append(PresentDevice("cuda", i, props.name, (props.major, props.minor)))
    except ImportError:
        pass
    return found


def find_present(profile: DeviceProfile) -> PresentDevice:
    """The present device matching `profile`, or a one-line error naming what is present."""
    present = present_devices()
    for device in present:
        if profile.matches(device.kind, device.name, device.capability):
            return device
    here = "; ".join(d.label() for d in present)
    raise HwawareError(
        f"device: {profile.name} ({profile.description}) is not present on this machine; present: {here}. "
        f"Run on a machine with one, or use --estimate for a roofline table"
    )
