"""The measurement protocol: warm up, repeat until a minimum count and a minimum time, summarise.

A runner times its own calls (`perf_counter` on the CPU, CUDA events on a GPU), so the protocol
does not care which backend it drives. Export's `hwaware bench` reuses `measure_latency`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hwaware.latency.devices import MeasureSettings


class Runner(Protocol):
    """A prepared model on its backend: `time(n)` runs it n times and returns each run's milliseconds."""

    def time(self, repeats: int) -> list[float]: ...


@dataclass(frozen=True)
class Stats:
    median_ms: float
    iqr_ms: float
    p90_ms: float
    min_ms: float
    n: int

    @classmethod
    def of(cls, samples_ms: list[float] | np.ndarray) -> Stats:
        s = np.asarray(samples_ms, dtype=np.float64)
        q25, q50, q75, q90 = np.percentile(s, [25, 50, 75, 90])
        return cls(float(q50), float(q75 - q25), float(q90), float(s.min()), int(s.size))

    def reading(self, statistic: str) -> float:
        """The figure a table records and predicts: the median, or the minimum on a shared host."""
        return self.min_ms if statistic == "min" else self.median_ms

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "p90_ms": self.p90_ms,
                "min_ms": self.min_ms, "n": self.n}


def time_runner(runner: Runner, settings: MeasureSettings) -> Stats:
    """Warm up, then time in growing chunks until both `min_repeats` and `min_time_s` are reached."""
    if settings.warmup:
        runner.time(settings.warmup)
    samples: list[float] = []
    started = time.perf_counter()
    chunk = max(1, min(settings.min_repeats, settings.max_repeats))
    while True:
        samples.extend(runner.time(chunk))
        enough_count = len(samples) >= settings.min_repeats
        enough_time = time.perf_counter() - started >= settings.min_time_s
        if (enough_count and enough_time) or len(samples) >= settings.max_repeats:
            return Stats.of(samples)
        chunk = max(1, min(chunk * 2, settings.max_repeats - len(samples)))


def time_interleaved(runners: list[Runner], settings: MeasureSettings, slice_ms: float = 20.0) -> list[Stats]:
    """Time several runners in alternating slices of about `slice_ms`, until each meets the protocol.

    Load from other processes then falls on every runner alike, instead of on whichever happened
    to be running when it came, so the rows of one segment stay comparable with each other.
    """
    if settings.warmup:
        for runner in runners:
            runner.time(settings.warmup)
    per_call = [max(1e-3, float(np.median(runner.time(3)))) for runner in runners]
    chunks = [max(1, min(settings.max_repeats, int(slice_ms / ms))) for ms in per_call]
    samples: list[list[float]] = [[] for _ in runners]

    def done(i: int) -> bool:
        n, spent_s = len(samples[i]), sum(samples[i]) / 1e3
        return n >= settings.max_repeats or (n >= settings.min_repeats and spent_s >= settings.min_time_s)

    while not all(done(i) for i in range(len(runners))):
        for i, runner in enumerate(runners):
            if len(samples[i]) < settings.max_repeats:
                samples[i].extend(runner.time(min(chunks[i], settings.max_repeats - len(samples[i]))))
    return [Stats.of(s) for s in samples]


def time_in_rounds(runners: list[Runner], settings: MeasureSettings, rounds: int) -> list[float]:
    """Each runner's quickest of `rounds` readings (`settings.statistic`), the runners timed in turn each
    round: whole bursts, not `time_interleaved`'s slices, for models long enough that a slice holds one call."""
    best = [float("inf")] * len(runners)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            best[i] = min(best[i], time_runner(runner, settings).reading(settings.statistic))
    return best


def measure_latency(model, example, backend="onnxruntime", settings: MeasureSettings | None = None,
                    workdir=None, **backend_options) -> dict:
    """Time `model` (an nn.Module, an ONNX file path, or a runner) on `example` with the protocol.

    `backend` is a name ("onnxruntime", "tensorrt", "torch") or a backend object; extra keyword
    arguments (device, precision, threads) go to `get_backend`. Returns `Stats.to_dict()`.
    """
    import tempfile
    from pathlib import Path

    from hwaware.latency.backends import get_backend

    settings = settings or MeasureSettings()
    if isinstance(backend, str):
        backend_options.setdefault("threads", settings.threads)
        backend = get_backend(backend, **backend_options)
    if hasattr(model, "time"):
        return time_runner(model, settings).to_dict()
    with tempfile.TemporaryDirectory(prefix="hwaware-measure-") as tmp:
        if isinstance(model, (str, Path)):
            runner = backend.prepare_onnx(Path(model), example)
        else:
            runner = backend.prepare(model, example, Path(workdir or tmp))
        stats = time_runner(runner, settings)
        del runner
    return stats.to_dict()
