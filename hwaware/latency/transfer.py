"""Few-shot transfer: a measured table of one device adapted to another from k whole subnets timed there.

The cheap path for the second, third, ... device of a fleet. The source table keeps its pieces (its
ranking of subnets), `k` random subnets are timed end to end on the target and an affine map
`factor * source_prediction + offset` is fitted on them, then checked on held-out subnets. Affine
rather than the one factor `recalibrate_table` fits on the same host: across devices the fixed cost
per call moves apart from the per-FLOP cost (a GPU's launch overhead is not a CPU's), and a factor
alone folds that into every subnet's slope. `layers` adds a cost per piece (depth + 2): what moves
with the layer count, not the work (per-operator thread synchronisation when the threads change,
quantise/dequantise per layer in INT8, kernel launches on a GPU). Per-term rescaling (compute and
memory apart) would need the pieces split by kernel family, which a measured table does not have.
The benchmark `benchmarks/estimate_accuracy.py` measures the maps side by side.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hwaware.errors import HwawareError
from hwaware.io import file_sha256, utc_timestamp
from hwaware.latency.devices import MeasureSettings
from hwaware.latency.table import Calibration, LatencyTable, relative_scale, table_name, validation_metrics
from hwaware.space import get_space

ADAPTERS = ("affine", "scale", "layers")


@dataclass(frozen=True)
class Adapter:
    """target_ms = factor * source_ms + per_piece * pieces + offset (pieces: depth + 2)."""

    factor: float
    offset: float = 0.0
    per_piece: float = 0.0

    def apply(self, source_ms, pieces=0):
        return (self.factor * np.asarray(source_ms, dtype=np.float64)
                + self.per_piece * np.asarray(pieces, dtype=np.float64) + self.offset)

    def compose(self, calibration: Calibration) -> Calibration:
        """The source table's correction followed by this map: one correction a table can carry."""
        return Calibration(self.factor * calibration.scale, self.factor * calibration.per_piece + self.per_piece,
                           self.factor * calibration.intercept + self.offset)


def fit_adapter(source_ms, measured_ms, method: str = "affine", floor_ms: float | None = None,
                pieces=None) -> Adapter:
    """The map from the source's predictions to the target's measurements, least squares on relative error.

    `layers` needs each subnet's piece count (`pieces`, depth + 2) and three subnets. A fit that would
    price a subnet of source latency `floor_ms` (default: the smallest fitted one; a table passes its
    cheapest subnet) at zero or less, at the fewest or the most pieces fitted, falls back to the next
    simpler map (layers, then affine, then the factor alone): noise on a few subnets must not make any
    subnet free.
    """
    if method not in ADAPTERS:
        raise HwawareError(f"transfer: method must be one of {', '.join(ADAPTERS)}, got {method!r}")
    x, y = np.asarray(source_ms, dtype=np.float64), np.asarray(measured_ms, dtype=np.float64)
    if len(y) < 2:
        raise HwawareError(f"transfer: needs at least 2 measured subnets, got {len(y)}")
    if method == "layers" and (pieces is None or len(y) < 3):
        raise HwawareError("transfer: the layers map needs each subnet's piece count and at least 3 measured subnets")
    scale_only = Adapter(relative_scale(x, y))
    if method == "scale":
        return scale_only
    floor = x.min() if floor_ms is None else min(floor_ms, x.min())
    n = np.zeros_like(x) if method == "affine" else np.asarray(pieces, dtype=np.float64)
    columns = [x, np.ones_like(x)] + ([n] if method == "layers" else [])
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1) / y[:, None], np.ones_like(y), rcond=None)
    adapter = Adapter(*(float(c) for c in coef)) if np.all(np.isfinite(coef)) else None
    if adapter is None or adapter.factor <= 0 or min(adapter.apply(floor, [n.min(), n.max()])) <= 0:
        return fit_adapter(x, y, "affine", floor_ms) if method == "layers" else scale_only
    return adapter


def check_transfer_source(source_csv: str | Path, space: str | None, fit_subnets: int,
                          holdout_subnets: int) -> LatencyTable:
    """The source table, if a transfer can adapt it: measured, with measured subnets, of `space` (when
    given), with room for the subnets asked for. The CLI calls it before it creates the output folder."""
    source = LatencyTable.load(source_csv)
    if source.estimated:
        raise HwawareError(f"transfer: {source_csv} is an estimate; a transfer adapts a measured table")
    if not source.meta.get("subnets"):
        raise HwawareError(f"transfer: {source_csv} has no measured subnets (its correction was never checked "
                           "end to end); profile the source device again")
    table_space = source.space
    if space is not None:
        wanted = get_space(space)
        if wanted.name != table_space.name or wanted.to_dict() != table_space.to_dict():
            raise HwawareError(f"transfer: {source_csv} was measured for space {table_space.name!r}, not "
                               f"{wanted.name!r}; transfer a table of that space")
    if fit_subnets < 2 or holdout_subnets < 0:
        raise HwawareError(f"transfer: needs at least 2 subnets to fit on (got {fit_subnets}) and 0 or more held out")
    if fit_subnets + holdout_subnets > table_space.num_subnets():
        raise HwawareError(f"transfer: space {table_space.name} has {table_space.num_subnets()} subnets, fewer than "
                           f"the {fit_subnets} + {holdout_subnets} asked for")
    return source


def transfer_table(source_csv: str | Path, device: str, out: str | Path, *, space: str | None = None,
                   backend: str | None = None, precision: str | None = None, batch: int | None = None,
                   settings: MeasureSettings | None = None, quantize_mode: str | None = None, fit_subnets: int = 10,
                   holdout_subnets: int = 10, seed: int = 0, method: str = "affine", progress: bool = True,
                   force: bool = False) -> Path:
    """Adapt the measured table `source_csv` to the present `device` from `fit_subnets` subnets timed there,
    validated on `holdout_subnets` others; writes the target's table in `out` and returns its path.
    `settings` (default: the device profile's) say how each subnet is timed, threads included."""
    from hwaware.latency.backends import environment
    from hwaware.latency.devices import load_device_profile
    from hwaware.latency.profile import resolve_backend, sample_subnets
    from hwaware.latency.recalibrate import measure_subnets

    source_csv = Path(source_csv)
    source = check_transfer_source(source_csv, space, fit_subnets, holdout_subnets)
    table_space = source.space
    profile = load_device_profile(device)
    backend_name, precision = backend or profile.backend, precision or profile.precision
    batch = batch or profile.batch_sizes[0]
    settings = settings or profile.measurement
    runner = resolve_backend(profile, backend_name, precision, settings.threads, quantize_mode, settings.cuda_graph)
    target = Path(out) / table_name(profile.name, runner.name, runner.precision, table_space.name, batch)
    if target.resolve() == source_csv.resolve() and not force:
        raise HwawareError(f"transfer: {target} is the source table; pass another output folder (or force)")
    if target.exists() and not force:
        raise HwawareError(f"transfer: {target} exists already; pass force to replace it")
    archs = sample_subnets(table_space, fit_subnets + holdout_subnets, random.Random(seed))
    started = time.perf_counter()
    measured = measure_subnets(runner, table_space, batch, archs, settings, progress,
                               desc=f"transfer {source_csv.stem} -> {profile.name}")
    seconds = time.perf_counter() - started
    # fit and held-out subnets alternate (then the rest are held out), so both see the same stretch of the run
    pairs, extra_fit = min(fit_subnets, holdout_subnets), fit_subnets - min(fit_subnets, holdout_subnets)
    rest = list(range(2 * pairs, len(archs)))
    order = [*range(0, 2 * pairs, 2), *rest[:extra_fit], *range(1, 2 * pairs, 2), *rest[extra_fit:]]
    archs, measured = [archs[i] for i in order], np.asarray(measured)[order]
    predicted = np.array([source.predict(a) for a in archs])
    pieces = np.array([a.depth + 2 for a in archs])
    fit = slice(None, fit_subnets)
    adapter = fit_adapter(predicted[fit], measured[fit], method, source.cheapest()[0], pieces[fit])
    held = slice(fit_subnets, None)
    after = adapter.apply(predicted[held], pieces[held])
    calibration = adapter.compose(source.calibration)
    per_subnet = seconds / max(len(archs), 1)
    source_timing = source.meta.get("timing") or {}
    meta = {
        "device": profile.name, "description": profile.description, "backend": runner.name,
        "precision": runner.precision, "batch_size": batch, "space": table_space.name,
        "space_def": table_space.to_dict(), "estimated": False, "statistic": source.meta.get("statistic", "median"),
        "environment": environment(runner), "settings": settings.to_dict(), "backend_settings": runner.settings(),
        "calibration": {**calibration.to_dict(), "fit_n": fit_subnets},
        "validation": validation_metrics(measured[held], after),
        "subnets": [{"arch": a.to_dict(), "measured_ms": m, "source_predicted_ms": float(p),
                     "predicted_ms": float(adapter.apply(p, a.depth + 2)),
                     "split": "fit" if i < fit_subnets else "holdout"}
                    for i, (a, m, p) in enumerate(zip(archs, measured, predicted))],
        "transfer": {
            "from": str(source_csv), "from_csv_sha256": file_sha256(source_csv), "from_device": source.device,
            "from_backend": source.backend, "from_precision": source.precision, "from_batch": source.batch_size,
            "pieces": f"measured on {source.device} ({source.backend} {source.precision}, batch {source.batch_size}); "
                      f"whole subnets on {profile.name} set the correction",
            "method": method, "factor": adapter.factor, "offset_ms": adapter.offset,
            "per_piece_ms": adapter.per_piece, "k": fit_subnets,
            "holdout": holdout_subnets, "seed": seed,
            "validation_before": validation_metrics(measured[held], predicted[held]),
            "seconds": round(seconds, 1), "seconds_fit_subnets": round(per_subnet * fit_subnets, 1),
            "full_profile_seconds_of_source": (round(source_timing["pieces_seconds"] + source_timing["calibration_seconds"], 1)
                                               if source_timing else None),
            "date": utc_timestamp(),
        },
    }
    return LatencyTable(source.rows.copy(), meta).save(target)


# ---- the same on the public GPU measurements ------------------------------------------------------


def transfer_on_reference(source_rows: pd.DataFrame, target_rows: pd.DataFrame, k: int, seed: int = 0,
                          method: str = "affine", params=None) -> dict:
    """Fit the kernel model on one GPU's rows (its 'table'; or pass its fitted `params`), predict another GPU's
    models as the source GPU would run them, adapt with `k` random target rows, and score the rest."""
    from hwaware.latency.estimate import Shapes, error_summary, fit_kernel_params, gpu_peaks, model_ms

    if not 2 <= k < len(target_rows):
        raise HwawareError(f"transfer: k must be at least 2 and below the {len(target_rows)} target rows, got {k}")
    params = params or fit_kernel_params(source_rows.reset_index(drop=True))
    source_gpu = source_rows.iloc[[0] * len(target_rows)].reset_index(drop=True)  # the source's peaks per row
    source_ms = model_ms(Shapes.from_reference(target_rows), gpu_peaks(source_gpu), params)
    measured = target_rows["measured_ms"].to_numpy(np.float64)
    order = np.random.default_rng(seed).permutation(len(target_rows))
    fit, held = order[:k], order[k:]
    pieces = target_rows["depth"].to_numpy(np.float64) + 2
    adapter = fit_adapter(source_ms[fit], measured[fit], method, source_ms.min(), pieces[fit])
    return {"before": error_summary(measured[held], source_ms[held]),
            "after": error_summary(measured[held], adapter.apply(source_ms[held], pieces[held])),
            "factor": adapter.factor, "offset_ms": adapter.offset, "per_piece_ms": adapter.per_piece}
