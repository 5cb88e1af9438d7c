"""What a latency table knows about the machine it was measured on: a host fingerprint.

Two hosts with the same CPU name (two cores of an "AMD EPYC" in different clouds) or the same
GPU name (power limits, clocks, driver, TensorRT) can differ several-fold in latency. A table
records the fingerprint of its host; search, export and bench compare it with the machine
they run on and warn, naming what differs, so a user knows to `hwaware profile --recalibrate`.

GPUs are read through `nvidia-smi`, not torch: on a V100 a current torch build has no kernels
for the GPU, yet TensorRT and ONNX Runtime still serve on it.
"""

from __future__ import annotations

import copy
import importlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

# CPU features that change which kernels ONNX Runtime and PyTorch pick.
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimd", "sve")
_GPU_FIELDS = ("index", "name", "compute_cap", "memory.total", "driver_version", "clocks.max.sm", "power.limit")
# Readings that are numbers and may wobble between reads of one machine: compared with a tolerance.
NUMERIC_TOLERANCE = {"cpu_max_mhz": 0.05, "gpu_max_sm_mhz": 0.05, "gpu_power_limit_w": 0.05, "gpu_memory_mib": 0.02}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    for key, value in _cpuinfo():
        if key == "model name":
            return value
    return platform.processor() or platform.machine()


def _cpuinfo() -> list[tuple[str, str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines) if _]


def _cpu_max_mhz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    speeds = [float(v) for k, v in _cpuinfo() if k == "cpu MHz"]
    return max(speeds) if speeds else None


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_fingerprint() -> dict[str, Any]:
    flags: set[str] = set()
    for key, value in _cpuinfo():
        if key in ("flags", "Features"):
            flags.update(value.split())
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "cpu_flags": sorted(f for f in CPU_FLAGS if f in flags),
        "cpu_max_mhz": _cpu_max_mhz(),
        "machine": platform.machine(),
    }


def gpus() -> list[dict[str, Any]]:
    """Every NVIDIA GPU `nvidia-smi` reports: index, name, compute capability, memory, driver, clocks, power.

    Read once per process (these are fixed facts of the machine; a GPU table's engine builds asked for
    them hundreds of times); each call gets its own copy.
    """
    global _GPUS
    if _GPUS is None:
        _GPUS = _query_gpus()
    return copy.deepcopy(_GPUS)


_GPUS: list[dict[str, Any]] | None = None


def _query_gpus() -> list[dict[str, Any]]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_GPU_FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(_GPU_FIELDS):
            continue
        index, name, cc, memory, driver, clock, power = values
        found.append({
            "index": _number(index, int), "gpu": name, "compute_capability": cc if "." in cc else None,
            "gpu_memory_mib": _number(memory, int), "driver": driver, "gpu_max_sm_mhz": _number(clock, float),
            "gpu_power_limit_w": _number(power, float),
        })
    return found


def _number(text: str, kind):
    try:
        return kind(float(text))
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def host_fingerprint(kind: str, gpu_index: int = 0) -> dict[str, Any]:
    """The fingerprint of this host for a `cpu` or `cuda` device profile (serving-stack versions included)."""
    stack = {"onnxruntime": _version("onnxruntime"), "tensorrt": _version("tensorrt")}
    if kind == "cpu":
        return {**cpu_fingerprint(), **stack}
    gpu = next((g for g in gpus() if g["index"] == gpu_index), None) or {}
    return {**{k: v for k, v in gpu.items() if k != "index"}, **stack}


def fingerprint_differences(recorded: dict[str, Any], present: dict[str, Any]) -> list[str]:
    """What differs between a table's recorded host and this one, as short phrases ('' keys ignored)."""
    differences = []
    for key in sorted(set(recorded) & set(present)):
        old, new = recorded[key], present[key]
        if old is None or new is None or old == new:
            continue
        tolerance = NUMERIC_TOLERANCE.get(key)
        if tolerance is not None and isinstance(old, (int, float)) and isinstance(new, (int, float)):
            if abs(new - old) <= tolerance * max(abs(old), 1e-9):
                continue
        differences.append(f"{key} {_short(old)} there, {_short(new)} here")
    return differences


def _short(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
