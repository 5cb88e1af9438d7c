"""`hwaware profile --estimate`: a roofline latency table for a device that is not present.

Each piece costs max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (bandwidth x memory
efficiency)) + a per-piece overhead. The two efficiencies and the overhead are fitted on a
measured table of a device that is present, then applied to the target profile's peak figures.
An estimate is only as good as that transfer; its sidecar says so and carries its error where
a measured table for the same settings exists to check against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hwaware.errors import HwawareError
from hwaware.io import utc_timestamp
from hwaware.latency.devices import DeviceProfile, find_present, list_profiles, load_device_profile
from hwaware.latency.profile import space_pieces
from hwaware.latency.table import COLUMNS, LatencyTable, table_name, validation_metrics
from hwaware.precision import get_precision
from hwaware.space import Arch, SearchSpace, get_space
from hwaware.vit import Piece


def piece_work(space: SearchSpace, piece: Piece, batch: int, precision: str) -> tuple[float, float]:
    """FLOPs (2 per multiply-add) and bytes moved by one call of `piece` on a batch.

    Bytes: the weights once, plus every activation written and read once (attention scores
    included, as an unfused kernel would move them).
    """
    from hwaware.costs import piece_cost

    cost = piece_cost(space, piece)
    elem = get_precision(precision).bytes_per_element
    n, d = space.num_tokens, piece.embed_dim
    if piece.kind == "block":
        attn = piece.num_heads * space.head_dim
        hidden = int(d * piece.mlp_ratio)
        activations = n * (2 * d + 2 * 3 * attn + 2 * attn + 2 * hidden + 4 * d) + 2 * piece.num_heads * n * n
    elif piece.kind == "stem":
        activations = space.in_chans * space.img_size**2 + 2 * n * d
    else:
        activations = n * d + space.num_classes
    return 2.0 * cost.flops * batch, float(elem * (cost.params + batch * activations))


def _roofline(flops, bytes_, peak, bandwidth, eff_compute, eff_memory, overhead_ms):
    return np.maximum(flops / (peak * eff_compute), bytes_ / (bandwidth * eff_memory)) * 1e3 + overhead_ms


def fit_efficiency(table: LatencyTable, profile: DeviceProfile) -> dict:
    """Compute and memory efficiencies and a per-piece overhead that best explain `table` (relative error)."""
    space = table.space
    keys = list(table.piece_ms)
    work = np.array([piece_work(space, p, table.batch_size, table.precision) for p in keys])
    measured = np.array([table.piece_ms[p] for p in keys])
    peak, bandwidth = profile.peak_flops_for(table.precision), profile.memory_bandwidth
    if not bandwidth:
        raise HwawareError(f"profile {profile.name}: no memory_bandwidth under peak in {profile.path}")
    best = None
    grid = np.logspace(-3, 0, 61)
    for ec in grid:
        for em in grid:
            core = _roofline(work[:, 0], work[:, 1], peak, bandwidth, ec, em, 0.0)
            # overhead >= 0 minimising sum(((core + o) / y - 1)^2): closed form, clipped
            w = 1.0 / measured**2
            overhead = max(0.0, float(np.sum(w * (measured - core)) / np.sum(w)))
            err = float(np.mean(((core + overhead) / measured - 1) ** 2))
            if best is None or err < best[0]:
                best = (err, ec, em, overhead)
    _, ec, em, overhead = best
    return {"compute_efficiency": float(ec), "memory_efficiency": float(em), "overhead_ms": float(overhead),
            "fitted_on": str(table.path), "fit_rms_relative_error": float(np.sqrt(best[0]))}


def _default_calibration_table(root: Path, space_name: str) -> Path:
    """A measured table of a present device, preferring one of the same space."""
    present_names = []
    for name in list_profiles():
        try:
            find_present(load_device_profile(name))
            present_names.append(name)
        except HwawareError:
            continue
    candidates = [p for p in sorted(root.glob("*.csv")) if "-estimated" not in p.name
                  and any(p.name.startswith(f"{n}-") for n in present_names)]
    candidates.sort(key=lambda p: f"-{space_name}-b" not in p.name)
    if not candidates:
        raise HwawareError(f"estimate: no measured table of a present device in {root} to fit efficiencies on; "
                           f"run hwaware profile --device cpu --space {space_name} first, or pass --calibrate-from")
    return candidates[0]


def estimate_table(device: str, space: str | SearchSpace, backend: str | None = None, precision: str | None = None,
                   batch: int | None = None, out: str | Path = "latency_tables",
                   calibrate_from: str | Path | None = None) -> Path:
    """Write `<device>-...-estimated.csv` from the profile's peaks and efficiencies fitted on a present device."""
    target = load_device_profile(device)
    space = get_space(space)
    backend, precision = backend or target.backend, precision or target.precision
    batch = batch or target.batch_sizes[0]
    out = Path(out)
    source_path = Path(calibrate_from) if calibrate_from else _default_calibration_table(out, space.name)
    source = LatencyTable.load(source_path)
    source_profile = load_device_profile(source.device)
    find_present(source_profile)
    efficiency = fit_efficiency(source, source_profile)
    peak, bandwidth = target.peak_flops_for(precision), target.memory_bandwidth
    if not bandwidth:
        raise HwawareError(f"profile {target.name}: no memory_bandwidth under peak in {target.path}")
    records = []
    for piece in sorted(space_pieces(space)):
        flops, bytes_ = piece_work(space, piece, batch, precision)
        ms = float(_roofline(flops, bytes_, peak, bandwidth, efficiency["compute_efficiency"],
                             efficiency["memory_efficiency"], efficiency["overhead_ms"]))
        records.append({"piece": piece.key, "kind": piece.kind, "embed_dim": piece.embed_dim,
                        "num_heads": piece.num_heads, "mlp_ratio": piece.mlp_ratio, "median_ms": ms,
                        "iqr_ms": float("nan"), "p90_ms": float("nan"), "min_ms": ms, "n": 0, "attempts": 0,
                        "drifted": False})
    meta = {
        "device": target.name, "description": target.description, "backend": backend, "precision": precision,
        "batch_size": batch, "space": space.name, "space_def": space.to_dict(), "estimated": True,
        "date": utc_timestamp(), "statistic": "median",
        "estimate": {"model": "max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) "
                              "+ overhead_ms, per piece", "peak_flops": peak, "memory_bandwidth": bandwidth,
                     **efficiency},
        "calibration": {"scale": 1.0, "per_piece": 0.0, "intercept": 0.0, "model": "identity (roofline estimate)"},
        "validation": {},
    }
    table = LatencyTable(pd.DataFrame.from_records(records, columns=COLUMNS), meta)
    meta["validation"] = _check_against_measured(table, out)
    path = out / table_name(target.name, backend, precision, space.name, batch, estimated=True)
    return table.save(path)


def _check_against_measured(table: LatencyTable, root: Path) -> dict:
    """Error of the estimate on the measured subnets of a measured table with the same settings, if any."""
    measured_path = root / table_name(table.device, table.backend, table.precision, table.space_name, table.batch_size)
    if not measured_path.is_file():
        return {"n": 0, "note": "no measured table with these settings to check against"}
    measured = LatencyTable.load(measured_path)
    subnets = measured.meta.get("subnets") or []
    truth = [s["measured_ms"] for s in subnets]
    guess = [table.predict(Arch.from_dict(s["arch"])) for s in subnets]
    return {**validation_metrics(truth, guess), "against": str(measured_path),
            "truth": f"whole subnets measured end to end ({measured.meta.get('statistic', 'median')} over repeats)"}
