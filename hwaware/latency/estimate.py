"""`hwaware profile --estimate`: a latency table for a device that is not present.

GPUs: a kernel model fitted on public measurements (`hwaware.reference`), never on a CPU table.
A block costs its four GEMMs on the tensor cores (each the slower of its FLOPs at `gemm_efficiency`
of the vendor's dense peak and its operands streamed at `gemm_memory_efficiency` of the bandwidth:
a GEMM's tiles read memory in long runs, which elementwise kernels do not), attention as the
stack computes it (fused kernels read Q, K, V once and never write the N^2 scores; unfused ones do),
the memory traffic of LayerNorm, GELU and the residual adds, and a fixed per-layer overhead (kernel
launches: what dominates at batch 1). The parameters are fitted per software stack, because nothing
transfers across stacks, and each table's sidecar carries the error the model makes on GPUs it did
not see (leave one GPU out).

CPUs: the former roofline (compute and memory efficiencies plus an overhead, fitted on a measured
table of a present CPU), which is all the CPU path has to go on.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import lru_cache
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

# ---- the GPU kernel model -----------------------------------------------------------------------

# Which reference stacks price a backend. TensorRT: FasterTransformer's fused ViT (C++ and its TensorRT
# plugin), the public TensorRT-class numbers; ONNX Runtime's CUDA provider has no public ViT data.
REFERENCE_STACKS = {"torch": ("torch-eager",), "tensorrt": ("fastertransformer", "tensorrt")}
COVERED_PRECISIONS = ("fp16", "bf16")  # bf16 runs at the fp16 tensor rate on every GPU that has it
FP16_BYTES = 2


@dataclass(frozen=True)
class KernelParams:
    """What a stack achieves of a GPU's peaks, and what it pays per layer and per model call."""

    gemm_efficiency: float = 0.6
    attention_efficiency: float = 0.3
    memory_efficiency: float = 0.6  # elementwise kernels: LayerNorm, GELU, residual adds
    layer_overhead_ms: float = 0.01
    model_overhead_ms: float = 0.05
    gemm_memory_efficiency: float = 0.9  # a GEMM's operands and result, streamed by its tiles

    def to_array(self) -> np.ndarray:
        return np.array(list(asdict(self).values()), dtype=np.float64)

    @classmethod
    def from_array(cls, values) -> KernelParams:
        return cls(*(float(v) for v in values))


@dataclass(frozen=True)
class GpuPeaks:
    """The figures of a GPU the kernel model scales (scalars, or arrays with one entry per row)."""

    flops: float | np.ndarray  # dense tensor-core FLOP/s for the precision
    bandwidth: float | np.ndarray  # DRAM bytes/s

    @classmethod
    def of(cls, profile: DeviceProfile, precision: str) -> GpuPeaks:
        from hwaware.reference import check_peaks

        check_peaks(profile, precision)
        return cls(profile.peak_flops_for(precision), profile.memory_bandwidth)


@dataclass(frozen=True)
class Shapes:
    """ViT shapes as arrays, one entry per (model, batch): what the kernel model prices."""

    batch: np.ndarray
    tokens: np.ndarray
    embed_dim: np.ndarray
    num_heads: np.ndarray
    head_dim: np.ndarray
    hidden: np.ndarray
    depth: np.ndarray
    patches: np.ndarray
    patch_inputs: np.ndarray  # in_chans * patch^2: the stem GEMM's inner size
    num_classes: np.ndarray
    fused: np.ndarray  # bool: attention in one kernel, no N^2 scores in memory

    @classmethod
    def from_reference(cls, rows: pd.DataFrame) -> Shapes:
        patches = (rows["img_size"] // rows["patch_size"]) ** 2
        d = rows["embed_dim"].to_numpy(np.float64)
        heads = rows["num_heads"].to_numpy(np.float64)
        return cls(batch=rows["batch"].to_numpy(np.float64), tokens=(patches + rows["extra_tokens"]).to_numpy(np.float64),
                   embed_dim=d, num_heads=heads, head_dim=d / heads, hidden=d * rows["mlp_ratio"].to_numpy(np.float64),
                   depth=rows["depth"].to_numpy(np.float64), patches=patches.to_numpy(np.float64),
                   patch_inputs=3.0 * rows["patch_size"].to_numpy(np.float64) ** 2,
                   num_classes=np.full(len(rows), 1000.0), fused=(rows["attention"] == "fused").to_numpy())

    @classmethod
    def from_piece(cls, space: SearchSpace, piece: Piece, batch: int, fused: bool) -> Shapes:
        """One piece of `space` as a one-layer 'model' (depth 1 for a block, 0 for stem and head)."""
        one = lambda v: np.array([float(v)])  # noqa: E731
        return cls(batch=one(batch), tokens=one(space.num_tokens), embed_dim=one(piece.embed_dim),
                   num_heads=one(piece.num_heads), head_dim=one(space.head_dim),
                   hidden=one(int(piece.embed_dim * piece.mlp_ratio)), depth=one(piece.kind == "block"),
                   patches=one(space.num_patches), patch_inputs=one(space.in_chans * space.patch_size**2),
                   num_classes=one(space.num_classes), fused=np.array([fused]))


def kernel_ms(shapes: Shapes, peaks: GpuPeaks, params: KernelParams) -> dict[str, np.ndarray]:
    """Milliseconds of the stem, of one block (its overhead included) and of the head, per entry."""
    s = shapes
    gemm_rate, attn_rate = peaks.flops * params.gemm_efficiency, peaks.flops * params.attention_efficiency
    mem_rate, stream_rate = peaks.bandwidth * params.memory_efficiency, peaks.bandwidth * params.gemm_memory_efficiency

    def memory(bytes_):
        return bytes_ / mem_rate * 1e3

    def gemm(m, k, n):  # [m, k] x [k, n] + bias: the slower of its FLOPs and its bytes
        return np.maximum(2.0 * m * k * n / gemm_rate * 1e3, FP16_BYTES * (k * n + m * k + m * n) / stream_rate * 1e3)

    rows, d, attn = s.batch * s.tokens, s.embed_dim, s.num_heads * s.head_dim
    scores = s.batch * s.num_heads * s.tokens**2
    # fused: Q, K, V read and the output written once; unfused: the scores written, softmaxed and read again
    attention_bytes = FP16_BYTES * (rows * 4 * attn + np.where(s.fused, 0.0, 4.0 * scores))
    attention = np.maximum(4.0 * scores * s.head_dim / attn_rate * 1e3, memory(attention_bytes))
    x_bytes = FP16_BYTES * rows * d
    layer_norm = memory(2 * x_bytes)
    residual = memory(3 * x_bytes)
    gelu = memory(FP16_BYTES * 2 * rows * s.hidden)
    block = (2 * layer_norm + 2 * residual + gelu + attention
             + gemm(rows, d, 3 * attn) + gemm(rows, attn, d) + gemm(rows, d, s.hidden) + gemm(rows, s.hidden, d)
             + params.layer_overhead_ms)
    stem = gemm(s.batch * s.patches, s.patch_inputs, d) + residual + params.model_overhead_ms  # + position add
    head = layer_norm + gemm(s.batch, d, s.num_classes)
    return {"stem": stem, "block": block, "head": head}


def model_ms(shapes: Shapes, peaks: GpuPeaks, params: KernelParams) -> np.ndarray:
    parts = kernel_ms(shapes, peaks, params)
    return parts["stem"] + shapes.depth * parts["block"] + parts["head"]


def gpu_peaks(rows: pd.DataFrame) -> GpuPeaks:
    """Each row's GPU figures for its precision, from the device profiles."""
    cache: dict[tuple[str, str], GpuPeaks] = {}
    for gpu, precision in rows[["gpu", "precision"]].drop_duplicates().itertuples(index=False):
        cache[gpu, precision] = GpuPeaks.of(load_device_profile(gpu), precision)
    peaks = [cache[g, p] for g, p in zip(rows["gpu"], rows["precision"])]
    return GpuPeaks(*(np.array([getattr(p, f) for p in peaks]) for f in ("flops", "bandwidth")))


def predict_reference(rows: pd.DataFrame, params: KernelParams) -> np.ndarray:
    return model_ms(Shapes.from_reference(rows), gpu_peaks(rows), params)


_LOWER = np.array([1e-3, 1e-3, 1e-3, 0.0, 0.0, 1e-3])
_UPPER = np.array([1.0, 1.0, 1.0, 10.0, 100.0, 1.0])
_FIELDS = list(KernelParams.__dataclass_fields__)
_OVERHEADS = [_FIELDS.index("layer_overhead_ms"), _FIELDS.index("model_overhead_ms")]
_ELEMENTWISE, _GEMM_STREAM = _FIELDS.index("memory_efficiency"), _FIELDS.index("gemm_memory_efficiency")
# Stacks that run LayerNorm, GELU and the residual adds as kernels of their own (eager PyTorch): their
# bytes move at another efficiency than a GEMM's operand streams, and 238 rows of four GPUs pin both down.
# Fused stacks (FasterTransformer, TensorRT) fold that work into a few fused kernels, and their data (two
# GPUs at batch 1-32) cannot tell the two apart: one efficiency prices all their bytes (leave one GPU
# out, torch: 14.2 % separate vs 16.1 % tied; FasterTransformer: 23.8 % separate vs 14.7 % tied).
SEPARATE_ELEMENTWISE_STACKS = ("torch-eager",)


def fit_kernel_params(rows: pd.DataFrame) -> KernelParams:
    """The parameters that minimise the squared log ratio of predicted to measured over `rows`.

    Log ratios weigh a 2x miss on a 1 ms model as much as on a 1 s one, which is how latency is judged.
    Efficiencies stay in (0, 1] (a fit above the vendor's peak would mean the peak figure is wrong).
    """
    from scipy.optimize import least_squares

    if len(rows) < 3:
        raise HwawareError(f"estimate: {len(rows)} reference rows are too few to fit the kernel model (need 3)")
    peaks = gpu_peaks(rows)
    shapes, measured = Shapes.from_reference(rows), rows["measured_ms"].to_numpy(np.float64)
    overheads_seen = bool((rows["batch"] <= 64).any())  # large batches alone cannot pin down a launch overhead
    separate_elementwise = bool(rows["stack"].isin(SEPARATE_ELEMENTWISE_STACKS).all())

    def constrained(x):
        values = x.copy()
        if not overheads_seen:
            values[_OVERHEADS] = 0.0
        if not separate_elementwise:
            values[_GEMM_STREAM] = values[_ELEMENTWISE]
        return values

    def residual(x):
        return np.log(model_ms(shapes, peaks, KernelParams.from_array(constrained(x))) / measured)

    start = np.clip(KernelParams().to_array(), _LOWER, _UPPER)
    fit = least_squares(residual, start, bounds=(_LOWER, _UPPER), x_scale=np.array([0.3, 0.3, 0.3, 0.01, 0.05, 0.3]))
    return KernelParams.from_array(constrained(fit.x))


def error_summary(measured, predicted, sets=None) -> dict:
    """MAPE, shares within 10 % / 25 %, and Kendall's tau within each set (e.g. one GPU and software version),
    averaged: a search ranks subnets on one device, so the ranking that matters is within a set."""
    from scipy.stats import kendalltau

    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(y) == 0:
        return {"n": 0, "mape": None, "within_10pct": None, "within_25pct": None, "kendall_tau": None}
    rel = np.abs(p / y - 1)
    taus = []
    groups = pd.Series(np.zeros(len(y)) if sets is None else np.asarray(sets))
    for _, index in groups.groupby(groups).groups.items():
        if len(index) > 2:
            tau = kendalltau(y[index], p[index]).statistic
            if np.isfinite(tau):
                taus.append(float(tau))
    return {"n": int(len(y)), "mape": float(rel.mean()), "within_10pct": float((rel <= 0.10).mean()),
            "within_25pct": float((rel <= 0.25).mean()), "kendall_tau": float(np.mean(taus)) if taus else None,
            "max_error": float(rel.max())}


def _sets(rows: pd.DataFrame) -> pd.Series:
    return rows["gpu"] + " / " + rows["stack_version"]


def leave_one_gpu_out(rows: pd.DataFrame) -> dict:
    """Fit on every GPU but one, predict that one, for each GPU: the error on a GPU the model never saw."""
    gpus = sorted(rows["gpu"].unique())
    if len(gpus) < 2:
        raise HwawareError(f"estimate: leave-one-GPU-out needs rows of two GPUs, got {', '.join(gpus) or 'none'}")
    predicted = np.empty(len(rows))
    per_gpu = {}
    for gpu in gpus:
        held = (rows["gpu"] == gpu).to_numpy()
        params = fit_kernel_params(rows[~held])
        predicted[held] = predict_reference(rows[held], params)
        per_gpu[gpu] = error_summary(rows["measured_ms"][held], predicted[held], _sets(rows[held]))
    summary = error_summary(rows["measured_ms"], predicted, _sets(rows))
    return {**summary, "per_gpu": per_gpu, "batch_range": [int(rows["batch"].min()), int(rows["batch"].max())],
            "predicted_ms": predicted.tolist()}


def half_split(rows: pd.DataFrame, seed: int = 0) -> dict:
    """Per set (one GPU and software version): fit on a random half of its models, predict the other half.
    The error on a GPU the model has measurements of, the situation of a table refitted on a few subnets."""
    rng = np.random.default_rng(seed)
    held_rows, predicted = [], []
    for _, index in rows.groupby(_sets(rows)).groups.items():
        if len(index) < 6:
            continue  # three rows cannot pin down five parameters
        index = rng.permutation(np.asarray(index))
        fit, held = rows.loc[index[: len(index) // 2]], rows.loc[index[len(index) // 2:]]
        held_rows.append(held)
        predicted.append(predict_reference(held, fit_kernel_params(fit.reset_index(drop=True))))
    if not held_rows:
        raise HwawareError("estimate: no set of six or more reference rows to split in half")
    held = pd.concat(held_rows)
    return error_summary(held["measured_ms"], np.concatenate(predicted), _sets(held))


def stack_rows(reference: pd.DataFrame, backend: str, precision: str = "fp16") -> pd.DataFrame:
    """The reference rows that price `backend`, or a one-line error saying the data do not cover it."""
    stacks = REFERENCE_STACKS.get(backend)
    if stacks is None or precision not in COVERED_PRECISIONS:
        covered = ", ".join(f"{b} ({'/'.join(s)})" for b, s in REFERENCE_STACKS.items())
        raise HwawareError(f"estimate: the GPU reference data do not cover {backend} {precision} (covered: {covered}, "
                           f"in {'/'.join(COVERED_PRECISIONS)}); measure one such GPU and transfer its table instead")
    rows = reference[reference["stack"].isin(stacks) & (reference["precision"] == "fp16")]
    if rows.empty:
        raise HwawareError(f"estimate: the reference data have no {'/'.join(stacks)} rows to fit {backend} on")
    return rows.reset_index(drop=True)


def gpu_estimate_model(backend: str, precision: str, reference: str | Path | None = None) -> dict:
    """The fitted parameters for `backend` and their leave-one-GPU-out error, as a sidecar records them."""
    from hwaware.io import file_sha256
    from hwaware.reference import reference_path

    path = Path(reference) if reference else reference_path()
    model = _fitted_model(backend, "fp16" if precision in COVERED_PRECISIONS else precision, str(path), file_sha256(path))
    return copy.deepcopy(model)


@lru_cache(maxsize=8)
def _fitted_model(backend: str, precision: str, path: str, sha256: str) -> dict:
    """Fitting and leave-one-GPU-out take a few seconds; a search prices many tables from one file."""
    from hwaware.reference import load_reference

    path = Path(path)
    rows = stack_rows(load_reference(path), backend, precision)
    params = fit_kernel_params(rows)
    logo = leave_one_gpu_out(rows)
    logo.pop("predicted_ms")
    return {"model": "per block: 4 tensor-core GEMMs (max of flops / (peak * gemm_efficiency) and bytes / "
                     "(bandwidth * gemm_memory_efficiency)) + attention as the stack computes it + LayerNorm/GELU/"
                     "residual bytes / (bandwidth * memory_efficiency) + layer_overhead_ms; + model_overhead_ms",
            "params": asdict(params), "stacks": sorted(rows["stack"].unique()), "gpus": sorted(rows["gpu"].unique()),
            "reference": {"file": path.name, "sha256": sha256, "rows": len(rows)},
            "expected_error": {"method": "leave one GPU out", **logo}}


def _gpu_pieces(space: SearchSpace, target: DeviceProfile, precision: str, batch: int, params: KernelParams,
                fused: bool) -> list[dict]:
    peaks = GpuPeaks.of(target, "fp16" if precision in COVERED_PRECISIONS else precision)
    records = []
    for piece in sorted(space_pieces(space)):
        parts = kernel_ms(Shapes.from_piece(space, piece, batch, fused), peaks, params)
        records.append(_record(piece, float(parts[piece.kind][0])))
    return records


def _record(piece: Piece, ms: float) -> dict:
    return {"piece": piece.key, "kind": piece.kind, "embed_dim": piece.embed_dim, "num_heads": piece.num_heads,
            "mlp_ratio": piece.mlp_ratio, "median_ms": ms, "iqr_ms": float("nan"), "p90_ms": float("nan"),
            "min_ms": ms, "n": 0, "attempts": 0, "drifted": False}


# ---- the CPU roofline -----------------------------------------------------------------------------


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
    """A measured table of a present CPU, preferring one of the same space."""
    present_names = []
    for name in list_profiles():
        try:
            profile = load_device_profile(name)
            if profile.kind == "cpu":
                find_present(profile)
                present_names.append(name)
        except HwawareError:
            continue
    candidates = [p for p in sorted(root.glob("*.csv")) if "-estimated" not in p.name
                  and any(p.name.startswith(f"{n}-") for n in present_names)]
    candidates.sort(key=lambda p: f"-{space_name}-b" not in p.name)
    if not candidates:
        raise HwawareError(f"estimate: no measured table of a present CPU in {root} to fit efficiencies on; "
                           f"run hwaware profile --device cpu --space {space_name} first, or pass --calibrate-from")
    return candidates[0]


def _cpu_pieces(space: SearchSpace, target: DeviceProfile, precision: str, batch: int, out: Path,
                calibrate_from: str | Path | None) -> tuple[list[dict], dict]:
    source_path = Path(calibrate_from) if calibrate_from else _default_calibration_table(out, space.name)
    source = LatencyTable.load(source_path)
    source_profile = load_device_profile(source.device)
    if source_profile.kind != "cpu":
        raise HwawareError(f"estimate: {source_path} was measured on {source.device}, a GPU; a CPU estimate is "
                           "fitted on a CPU table")
    find_present(source_profile)
    efficiency = fit_efficiency(source, source_profile)
    peak, bandwidth = target.peak_flops_for(precision), target.memory_bandwidth
    if not bandwidth:
        raise HwawareError(f"profile {target.name}: no memory_bandwidth under peak in {target.path}")
    records = []
    for piece in sorted(space_pieces(space)):
        flops, bytes_ = piece_work(space, piece, batch, precision)
        records.append(_record(piece, float(_roofline(flops, bytes_, peak, bandwidth, efficiency["compute_efficiency"],
                                                      efficiency["memory_efficiency"], efficiency["overhead_ms"]))))
    estimate = {"model": "max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) "
                         "+ overhead_ms, per piece", "peak_flops": peak, "memory_bandwidth": bandwidth, **efficiency}
    return records, estimate


# ---- writing an estimated table --------------------------------------------------------------------


def estimate_table(device: str, space: str | SearchSpace, backend: str | None = None, precision: str | None = None,
                   batch: int | None = None, out: str | Path = "latency_tables",
                   calibrate_from: str | Path | None = None, reference: str | Path | None = None) -> Path:
    """Write `<device>-...-estimated.csv`: from the GPU kernel model fitted on the reference data for a GPU,
    from efficiencies fitted on a measured table of a present CPU for a CPU."""
    from hwaware.reference import check_peaks

    target = load_device_profile(device)
    space = get_space(space)
    backend, precision = backend or target.backend, precision or target.precision
    batch = batch or target.batch_sizes[0]
    out = Path(out)
    if target.kind == "cuda":
        if calibrate_from:
            raise HwawareError("estimate: a GPU estimate is fitted on the public GPU reference data, not on a measured "
                               "table; to adapt a measured table to this GPU, transfer it")
        model = gpu_estimate_model(backend, precision, reference)  # refuses what the data do not cover
        check_peaks(target, "fp16")
        # AutoFormer's relative position terms are explicit matmuls around the scores: never one fused kernel
        fused = not space.relative_position
        records = _gpu_pieces(space, target, precision, batch, KernelParams(**model["params"]), fused)
        error = model["expected_error"]
        lo, hi = error["batch_range"]
        seen = (f"{target.name} is in the reference data" if target.name in model["gpus"] else
                f"{target.name} is not in the reference data ({', '.join(model['gpus'])}): expect the "
                "leave-one-GPU-out error, more on a GPU class none of them belongs to (e.g. power-limited)")
        batches = ("" if lo <= batch <= hi else
                   f"; batch {batch} is outside the reference batches {lo}-{hi}: the error there is not known")
        model["coverage"] = seen + batches + ("" if fused else "; attention unfused (relative position encoding)")
        model.update(peak_flops=target.peak_flops_for(precision), memory_bandwidth=target.memory_bandwidth)
        estimate = model
    else:
        records, estimate = _cpu_pieces(space, target, precision, batch, out, calibrate_from)
    meta = {
        "device": target.name, "description": target.description, "backend": backend, "precision": precision,
        "batch_size": batch, "space": space.name, "space_def": space.to_dict(), "estimated": True,
        "date": utc_timestamp(), "statistic": "median",
        "estimate": estimate,
        "calibration": {"scale": 1.0, "per_piece": 0.0, "intercept": 0.0, "model": "identity (estimate)"},
        "validation": {},
    }
    table = LatencyTable(pd.DataFrame.from_records(records, columns=COLUMNS), meta)
    meta["validation"] = _check_against_measured(table, out)
    path = out / table_name(target.name, backend, precision, space.name, batch, estimated=True)
    return table.save(path)


def expected_error_line(table: LatencyTable) -> str | None:
    """One line saying how far off an estimated table is expected to be, for the commands that price with it."""
    if not table.estimated:
        return None
    error = (table.meta.get("estimate") or {}).get("expected_error")
    if not error or not error.get("n"):
        return (f"{table.path}: ESTIMATED latencies (CPU roofline fitted on another table); its error is unknown "
                "until measured (hwaware profile --validate)")
    lo, hi = error["batch_range"]
    tau = error.get("kendall_tau")
    return (f"{table.path}: ESTIMATED latencies; on GPUs it never saw the model was off by {100 * error['mape']:.0f} % "
            f"on average ({100 * error['within_10pct']:.0f} % of {error['n']} within 10 %, "
            f"{100 * error['within_25pct']:.0f} % within 25 %, Kendall tau {tau if tau is None else f'{tau:.2f}'}; "
            f"batches {lo}-{hi}{'' if lo <= table.batch_size <= hi else f', not {table.batch_size}: unknown there'})")


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
