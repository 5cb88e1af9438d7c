"""`hwaware profile`: time every piece of a space, then whole subnets for calibration, resumably.

Work is done in segments bracketed by an anchor piece. A segment whose anchor moved more than
the drift tolerance from the quietest anchor seen is measured again (drift, not repeat noise,
is what spoils latency tables). Accepted segments are appended to `<table>.csv.partial` with
fsync; killed and rerun with the same settings, the run continues from there. Only when every
piece and subnet is in does the table get its final name, so a partial is never taken for one.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from hwaware.errors import HwawareError
from hwaware.io import atomic_write_text, open_regular, read_json, utc_timestamp
from hwaware.latency.backends import Backend, environment, get_backend
from hwaware.latency.devices import DeviceProfile, MeasureSettings, find_present, load_device_profile
from hwaware.latency.protocol import Stats, time_interleaved
from hwaware.latency.table import COLUMNS, Calibration, LatencyTable, table_name, validation_metrics
from hwaware.precision import check_runs
from hwaware.space import Arch, SearchSpace, get_space
from hwaware.vit import Piece, build_piece, build_vit, piece_input

LOG_FIELDS = ["kind", "key", "median_ms", "iqr_ms", "p90_ms", "min_ms", "n", "attempt", "drifted", "anchor_ratio",
              "seconds", "load", "time"]


def space_pieces(space: SearchSpace) -> list[Piece]:
    """Every piece any subnet of `space` is made of: stem and head per embed dim, one block per choice."""
    ends = [Piece(kind, d) for d in space.embed_dims for kind in ("stem", "head")]
    blocks = [Piece("block", d, h, r) for d in space.embed_dims for h in space.num_heads for r in space.mlp_ratios]
    return ends + blocks


def sample_subnets(space: SearchSpace, count: int, rng: random.Random) -> list[Arch]:
    """`count` distinct random subnets; a space with fewer is refused, never quietly handed back fewer (a
    recalibration's hold-out would shrink to nothing)."""
    if count > space.num_subnets():
        raise HwawareError(f"subnets: {count} distinct subnets asked of space {space.name}, which has only "
                           f"{space.num_subnets()}")
    chosen: dict[Arch, None] = {}
    for _ in range(count * 50):
        if len(chosen) >= count:
            break
        chosen.setdefault(space.sample(rng))
    if len(chosen) < count:
        raise HwawareError(f"subnets: {count * 50} draws from space {space.name} found {len(chosen)} distinct "
                           f"subnets of the {count} asked; ask for fewer")
    return list(chosen)


@dataclass
class _Item:
    kind: str  # "piece" | "subnet"
    key: str

    @classmethod
    def piece(cls, piece: Piece) -> _Item:
        return cls("piece", piece.key)

    @classmethod
    def subnet(cls, arch: Arch) -> _Item:
        return cls("subnet", arch.to_json())


class PartialLog:
    """Append-only CSV of accepted measurements; a torn last line (killed mid-write) is cut off."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open_regular(self.path, "r+b") as f:
                f.truncate(len(data))
        lines = data.decode().splitlines()
        if not lines:
            return []
        if lines[0].split(",") != LOG_FIELDS:
            raise HwawareError(f"profile: {self.path} is not a partial profiling log; delete it to start over")
        return list(csv.DictReader(lines))

    def append(self, rows: list[dict]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open_regular(self.path, "a") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


class Profiler:
    """One profiling run: a device profile, a space, a backend at a precision and batch size."""

    def __init__(self, profile: DeviceProfile, space: SearchSpace, backend: Backend, batch_size: int,
                 settings: MeasureSettings, out_dir: str | Path = "latency_tables", seed: int = 0,
                 progress: bool = True):
        self.profile, self.space, self.backend, self.batch_size = profile, space, backend, batch_size
        self.settings, self.out_dir, self.seed, self.progress = settings, Path(out_dir), seed, progress
        self.csv_path = self.out_dir / table_name(profile.name, backend.name, backend.precision, space.name, batch_size)
        if backend.name == "tensorrt":  # pieces built as the shipped plan is; the timing cache stays with the table
            from hwaware.tensorrt_build import DEFAULT_BATCH_SIZES

            backend.serve_for_table(batch_size, DEFAULT_BATCH_SIZES, self.csv_path.with_suffix(".timing.cache"))
        self.log = PartialLog(Path(f"{self.csv_path}.partial"))
        self.run_info_path = Path(f"{self.csv_path.with_suffix('.json')}.partial")
        # each TensorRT engine's share of layers per precision (its audit), kept while the run is partial
        self.audit_path = Path(f"{self.csv_path.with_suffix('.layers.json')}.partial")
        self.audits: dict[str, dict] = {}
        rng = random.Random(seed)
        self.pieces = space_pieces(space)
        rng.shuffle(self.pieces)
        self.subnets = sample_subnets(space, settings.fit_subnets + settings.holdout_subnets, rng)
        # One anchor per phase, alike to what the phase times: a middle block among pieces, the middle
        # subnet among subnets (a whole model feels cache and memory contention a small block does not).
        middle = space.middle()
        middle_block = Piece("block", middle.embed_dim, middle.num_heads[0], middle.mlp_ratios[0])
        self.anchors = {"pieces": _Item.piece(middle_block), "subnets": _Item.subnet(space.middle())}
        self._anchor_runners: dict = {}
        self._workdir = tempfile.TemporaryDirectory(prefix="hwaware-profile-")

    # ---- configuration that a resumed run must share ---------------------------------------------
    def config(self) -> dict:
        return {"device": self.profile.name, "space_def": self.space.to_dict(), "batch_size": self.batch_size,
                "backend": self.backend.settings(), "settings": self.settings.to_dict(), "seed": self.seed}

    def _start_or_resume(self) -> list[dict]:
        if self.run_info_path.exists():
            info = read_json(self.run_info_path, f"profile: {self.run_info_path} vanished")
            if not isinstance(info, dict) or info.get("config") != self.config():
                raise HwawareError(
                    f"profile: {self.log.path} is a partial run with other settings ({self.run_info_path}); "
                    f"rerun with those settings to resume it, or delete both files to start over")
            self.audits = _read_audits(self.audit_path) if self.audit_path.exists() else {}
            return self.log.read()
        self.audit_path.unlink(missing_ok=True)
        if self.log.path.exists():  # a log without its run info cannot be trusted to match
            self.log.path.unlink()
        info = {"config": self.config(), "started": utc_timestamp(), "environment": environment(self.backend)}
        atomic_write_text(self.run_info_path, json.dumps(info, indent=1) + "\n")
        return []

    # ---- measuring ----------------------------------------------------------------------------------
    def _module_and_input(self, item: _Item):
        if item.kind == "piece":
            piece = Piece.from_key(item.key)
            return build_piece(self.space, piece), piece_input(self.space, piece, self.batch_size)
        arch = Arch.from_dict(json.loads(item.key))
        x = torch.randn(self.batch_size, self.space.in_chans, self.space.img_size, self.space.img_size)
        return build_vit(arch, self.space), x

    def _prepare(self, item: _Item):
        module, example = self._module_and_input(item)
        workdir = Path(self._workdir.name) / item.kind
        workdir.mkdir(exist_ok=True)
        runner = self.backend.prepare(module, example, workdir)
        if getattr(self.backend, "last_audit", None):
            self.audits[item.key] = self.backend.last_audit
        return runner

    def _anchor(self, phase: str):
        if phase not in self._anchor_runners:
            self._anchor_runners[phase] = self._prepare(self.anchors[phase])
        return self._anchor_runners[phase]

    def _value(self, stats: Stats) -> float:
        return stats.reading(self.settings.statistic)

    @staticmethod
    def _row(kind: str, key: str, stats: Stats, seconds: float, attempt=0, drifted=False, ratio=1.0) -> dict:
        return {"kind": kind, "key": key, **{k: f"{v:.6g}" for k, v in stats.to_dict().items()}, "attempt": attempt,
                "drifted": int(drifted), "anchor_ratio": f"{ratio:.4f}", "seconds": f"{seconds:.3f}",
                "load": f"{os.getloadavg()[0]:.2f}", "time": utc_timestamp()}

    def _segment(self, items: list[_Item], phase: str, anchors: list[float]) -> list[dict]:
        """Export and load `items`, then time them interleaved with the anchor; time them again
        (without re-exporting) while the anchor says conditions drifted from the quietest seen."""
        prepare_s = []
        runners = []
        for item in items:
            started = time.perf_counter()
            runners.append(self._prepare(item))
            prepare_s.append(time.perf_counter() - started)
        anchor = self._anchor(phase)
        wasted = 0.0
        for attempt in range(self.settings.max_remeasure + 1):
            started = time.perf_counter()
            anchor_stats, *stats = time_interleaved([anchor, *runners], self.settings)
            timing_s = time.perf_counter() - started
            value = self._value(anchor_stats)
            ratio = value / min([*anchors, value])
            drifted = ratio - 1 > self.settings.drift_tolerance
            if drifted and attempt < self.settings.max_remeasure:
                wasted += timing_s + attempt + 1
                anchors.append(value)
                time.sleep(attempt + 1)  # let a burst of load from elsewhere pass
                continue
            share = timing_s / len(items)
            rows = [self._row("anchor", f"anchor#{phase}", anchor_stats, 0.0, attempt, drifted, ratio)]
            rows += [self._row(item.kind, item.key, st, prep + share, attempt, drifted, ratio)
                     for item, st, prep in zip(items, stats, prepare_s, strict=True)]
            if wasted:
                rows.append(self._row("retry", f"retry#{phase}", Stats(0, 0, 0, 0, 0), wasted, attempt))
            return rows
        raise AssertionError("unreachable")

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Measure what is missing, then write the finished table; returns its path."""
        from hwaware.progress import progress

        self.out_dir.mkdir(parents=True, exist_ok=True)
        done = self._start_or_resume()
        have = {(r["kind"], r["key"]) for r in done}
        column = f"{self.settings.statistic}_ms"
        anchors = {phase: [float(r[column]) for r in done if r["key"] == f"anchor#{phase}"] for phase in self.anchors}
        todo = {
            "pieces": [_Item.piece(p) for p in self.pieces if ("piece", p.key) not in have],
            "subnets": [_Item.subnet(a) for a in self.subnets if ("subnet", a.to_json()) not in have],
        }
        total = len(self.pieces) + len(self.subnets)
        remaining = sum(len(v) for v in todo.values())
        with progress(total=total, initial=total - remaining, desc=f"profile {self.csv_path.stem}", unit="item",
                  disable=not self.progress, file=None) as bar:
            for phase, items in todo.items():
                step = max(1, self.settings.anchor_every)
                for i in range(0, len(items), step):
                    segment = items[i: i + step]
                    rows = self._segment(segment, phase, anchors[phase])
                    self.log.append(rows)
                    if self.audits:
                        atomic_write_text(self.audit_path, json.dumps(self.audits) + "\n")
                    anchors[phase].extend(float(r[column]) for r in rows if r["kind"] == "anchor")
                    bar.update(len(segment))
        table = self.finalize(self.log.read())
        table.save(self.csv_path)
        self.log.path.unlink(missing_ok=True)
        self.run_info_path.unlink(missing_ok=True)
        self.audit_path.unlink(missing_ok=True)
        return self.csv_path

    def finalize(self, log_rows: list[dict]) -> LatencyTable:
        """Pieces into a table, subnets into a fitted and validated correction, provenance into the sidecar."""
        latest = {(r["kind"], r["key"]): r for r in log_rows}
        missing = [p.key for p in self.pieces if ("piece", p.key) not in latest]
        missing += [a.short() for a in self.subnets if ("subnet", a.to_json()) not in latest]
        if missing:
            raise HwawareError(f"profile: the partial log lacks {len(missing)} measurements ({missing[0]}, ...)")
        records = []
        for piece in sorted(self.pieces):
            r = latest[("piece", piece.key)]
            records.append({"piece": piece.key, "kind": piece.kind, "embed_dim": piece.embed_dim,
                            "num_heads": piece.num_heads, "mlp_ratio": piece.mlp_ratio,
                            **{k: float(r[k]) for k in ("median_ms", "iqr_ms", "p90_ms", "min_ms")},
                            "n": int(r["n"]), "attempts": int(r["attempt"]) + 1, "drifted": bool(int(r["drifted"]))})
        rows = pd.DataFrame.from_records(records, columns=COLUMNS)
        info = read_json(self.run_info_path, f"profile: {self.run_info_path} vanished")
        meta = {
            "device": self.profile.name, "description": self.profile.description, "backend": self.backend.name,
            "precision": self.backend.precision, "batch_size": self.batch_size, "space": self.space.name,
            "space_def": self.space.to_dict(), "estimated": False, "started": info["started"], "finished": utc_timestamp(),
            "environment": info["environment"], "settings": self.settings.to_dict(), "seed": self.seed,
            "backend_settings": self.backend.settings(), "calibration": Calibration().to_dict(),
            "statistic": self.settings.statistic,
            "conditions": ("timed with a fixed thread count; the load average while measuring is under drift; "
                           "on a shared host other processes perturb timings"),
        }
        raw = LatencyTable(rows, meta)
        subnets = []
        for i, arch in enumerate(self.subnets):
            r = latest[("subnet", arch.to_json())]
            subnets.append({"arch": arch.to_dict(), "measured_ms": float(r[f"{self.settings.statistic}_ms"]),
                            "median_ms": float(r["median_ms"]), "min_ms": float(r["min_ms"]), "iqr_ms": float(r["iqr_ms"]),
                            "piece_sum_ms": raw.piece_sum(arch), "pieces": arch.depth + 2,
                            "split": "fit" if i < self.settings.fit_subnets else "holdout",
                            "drifted": bool(int(r["drifted"]))})
        fit = [s for s in subnets if s["split"] == "fit" and not s["drifted"]]
        if len(fit) < 3:  # too few clean ones: fit on all, the sidecar's drift counts say so
            fit = [s for s in subnets if s["split"] == "fit"]
        calibration = Calibration.fit([s["piece_sum_ms"] for s in fit], [s["pieces"] for s in fit],
                                      [s["measured_ms"] for s in fit])
        for s in subnets:
            s["predicted_ms"] = calibration.apply(s["piece_sum_ms"], s["pieces"])
        held = [s for s in subnets if s["split"] == "holdout"]
        meta["calibration"] = {**calibration.to_dict(), "fit_n": len(fit)}
        meta["validation"] = validation_metrics([s["measured_ms"] for s in held], [s["predicted_ms"] for s in held])
        meta["validation_uncalibrated"] = validation_metrics([s["measured_ms"] for s in held],
                                                             [s["piece_sum_ms"] for s in held])
        meta["subnets"] = subnets
        clean = [s for s in held if not s["drifted"]]
        meta["validation_without_drifted"] = validation_metrics([s["measured_ms"] for s in clean],
                                                                [s["predicted_ms"] for s in clean])
        meta["validation_other_statistic"] = _other_statistic_validation(rows, subnets, self.settings)
        meta["drift"] = _drift_summary(log_rows, self.anchors, self.settings)
        meta["timing"] = _timing_summary(log_rows)
        if self.audits:
            meta["layer_precisions"] = _layer_shares(self.audits)
        return LatencyTable(rows, meta)


def _other_statistic_validation(rows: pd.DataFrame, subnets: list[dict], settings: MeasureSettings) -> dict:
    """The same fit and hold-out with the statistic not chosen, so the choice can be judged."""
    other = "min" if settings.statistic == "median" else "median"
    table = LatencyTable(rows, {"statistic": other, "calibration": {}})
    arch = [Arch.from_dict(s["arch"]) for s in subnets]
    sums = [table.piece_sum(a) for a in arch]
    fit = [i for i, s in enumerate(subnets) if s["split"] == "fit"]
    held = [i for i, s in enumerate(subnets) if s["split"] == "holdout"]
    cal = Calibration.fit([sums[i] for i in fit], [arch[i].depth + 2 for i in fit], [subnets[i][f"{other}_ms"] for i in fit])
    return {"statistic": other, **validation_metrics([subnets[i][f"{other}_ms"] for i in held],
                                                     [cal.apply(sums[i], arch[i].depth + 2) for i in held])}


def _drift_summary(log_rows: list[dict], anchors: dict, settings: MeasureSettings) -> dict:
    column = f"{settings.statistic}_ms"
    spans = {}
    for phase, item in anchors.items():
        values = [float(r[column]) for r in log_rows if r["key"] == f"anchor#{phase}"]
        spans[phase] = {"anchor": item.key, "min_ms": min(values), "max_ms": max(values)}
    measured = [r for r in log_rows if r["kind"] in ("piece", "subnet")]
    loads = [float(r["load"]) for r in log_rows if r["kind"] != "retry"]
    return {"anchors": spans, "tolerance": settings.drift_tolerance,
            "remeasured_rows": sum(int(r["attempt"]) > 0 for r in measured),
            "rows_still_drifted": sum(int(r["drifted"]) for r in measured),
            "load_average_1min": [min(loads), max(loads)]}


def _timing_summary(log_rows: list[dict]) -> dict:
    """Wall time spent on pieces (the table) and on whole subnets (calibration), retries included."""
    def seconds(phase_kinds, phase):
        return sum(float(r["seconds"]) for r in log_rows
                   if r["kind"] in phase_kinds or (r["kind"] in ("anchor", "retry") and r["key"].endswith(f"#{phase}")))

    per_subnet = [float(r["seconds"]) for r in log_rows if r["kind"] == "subnet"]
    mean_subnet = sum(per_subnet) / len(per_subnet)
    return {"pieces_seconds": seconds(("piece",), "pieces"), "calibration_seconds": seconds(("subnet",), "subnets"),
            "seconds_per_subnet_end_to_end": mean_subnet,
            "end_to_end_1000_candidates_seconds": 1000 * mean_subnet}


def _read_audits(path: Path) -> dict[str, dict]:
    audits = read_json(path, f"profile: {path} vanished")
    if not (isinstance(audits, dict) and all(isinstance(a, dict) and isinstance(a.get("layers"), int)
                                             and isinstance(a.get("shares"), dict) for a in audits.values())):
        raise HwawareError(f"profile: {path} is not a record of engine audits; delete it to start over")
    return audits


def _layer_shares(audits: dict[str, dict]) -> dict:
    """Share of compute layers per precision over every TensorRT engine the table timed (pieces, subnets, anchors)."""
    counts: dict[str, float] = {}
    for audit in audits.values():
        for precision, share in audit["shares"].items():
            counts[precision] = counts.get(precision, 0.0) + share * audit["layers"]
    total = sum(counts.values())
    return {"engines": len(audits), "layers": round(total),
            "shares": {k: round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def resolve_backend(profile: DeviceProfile, backend: str | None, precision: str | None, threads: int | None,
                    quantize_mode: str | None = None, cuda_graph: bool = False) -> Backend:
    """The backend object for a present device of `profile` (raises if the device is absent, or cannot run
    the precision with that backend: fp8 on a GPU below compute capability 8.9, int8 with torch)."""
    present = find_present(profile)
    device = "cpu" if present.kind == "cpu" else f"cuda:{present.index}"
    backend, precision = backend or profile.backend, precision or profile.precision
    check_runs(precision, backend, present.kind, present.label(), present.capability)
    runner_backend = get_backend(backend, device=device, precision=precision, threads=threads,
                                 quantize_mode=quantize_mode, cuda_graph=cuda_graph)
    if runner_backend.name == "tensorrt":
        from hwaware.tensorrt_build import check_supported

        check_supported(profile.tensorrt, runner_backend.trt.__version__, profile.description)
    return runner_backend


def profile_device(device: str, space: str | SearchSpace, backend: str | None = None, precision: str | None = None,
                   batch: int | None = None, out: str | Path = "latency_tables", seed: int = 0,
                   settings: MeasureSettings | None = None, progress: bool = True, force: bool = False,
                   quantize_mode: str | None = None) -> Path:
    """Profile `space` on the present `device`; resumes a partial run; returns the finished table's path.

    int8/fp8 time every piece and subnet quantized in `quantize_mode` (see `hwaware.quantize`);
    the mode is in the sidecar's backend settings, so a table and an export can be matched."""
    profile = load_device_profile(device)
    space = get_space(space)
    settings = settings or profile.measurement
    runner_backend = resolve_backend(profile, backend, precision, settings.threads, quantize_mode, settings.cuda_graph)
    batch = batch or profile.batch_sizes[0]
    if batch < 1:
        raise HwawareError(f"batch: must be at least 1, got {batch}")
    profiler = Profiler(profile, space, runner_backend, batch, settings, out, seed, progress)
    resumable = profiler.log.path.exists() and profiler.run_info_path.exists()  # a partial log and its run record
    if profiler.csv_path.exists() and not resumable:
        if not force:
            raise HwawareError(f"profile: {profiler.csv_path} exists already; pass --force to measure it again")
        for stray in (profiler.log.path, profiler.run_info_path):  # a partial of a dead run cannot be trusted
            stray.unlink(missing_ok=True)
    return profiler.run()
