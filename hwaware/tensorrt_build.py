"""TensorRT engines built from hwaware's ONNX files, with the metadata that says where they can run.

An engine is only valid for the TensorRT version that built it and the GPU architecture
(compute capability) it was tuned on. `build_engine` writes `<plan>.json` beside the plan
with both; `load_engine` compares that with the present machine and refuses, in one clear
line, an engine that TensorRT would otherwise reject with a crash or a cryptic log.

Works with TensorRT 8.6, 10.x and 11.x. The ONNX file carries the precision (export writes
an fp16 graph for fp16, and explicit Q/DQ nodes for int8 and fp8), so on 11.x, where the
weak-typing precision flags are gone, the network is strongly typed and runs in the graph's
types; on 8.6 and 10.x the FP16/INT8/FP8 builder flags let TensorRT pick those kernels for the
same graph. INT8 is explicit quantization only: implicit INT8 calibration is deprecated since
TensorRT 10.1 and gone in 11. TensorRT is imported lazily.

Every engine is audited after its build (`audit_precision`, from the engine inspector's layer
information): TensorRT silently runs layers it has no reduced-precision kernel for in fp32, and
an engine asked for fp16/int8/fp8 that computes nothing in it is refused. `trtexec_command` gives
the NVIDIA command line that builds and times the same engine.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import atomic_write, atomic_write_text, read_json, utc_timestamp
from hwaware.precision import PRECISIONS as ALL_PRECISIONS
from hwaware.precision import check_runs

PRECISIONS = tuple(name for name, p in ALL_PRECISIONS.items() if ("tensorrt", "cuda") in p.runs_on)
DEFAULT_WORKSPACE_BYTES = 4 << 30
# The batch sizes an export serves unless told otherwise; a table's pieces take the same profile (see profile_shapes).
DEFAULT_BATCH_SIZES = (1, 8, 32)
log = logging.getLogger(__name__)


def metadata_path(plan_path: str | Path) -> Path:
    """Where the build metadata of `plan_path` lives: `model.plan` -> `model.plan.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are both here, else why not (one short phrase)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'hwaware[tensorrt]')"
    from hwaware.latency.host import gpus

    if not gpus():
        return "no NVIDIA GPU is visible (nvidia-smi reports none)"
    return None


def _tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise HwawareError(f"tensorrt: {reason}")
    import tensorrt as trt

    return trt


def present_environment(gpu_index: int | None = None) -> dict[str, str]:
    """The GPU and TensorRT of this machine, in the keys the build metadata uses (read via nvidia-smi,
    so it works where torch has no kernels for the GPU)."""
    from hwaware.latency.host import gpus

    trt = _tensorrt()
    if gpu_index is None:
        gpu_index = _current_gpu_index()
    gpu = next((g for g in gpus() if g["index"] == gpu_index), None)
    if gpu is None or not gpu["compute_capability"]:
        raise HwawareError(f"tensorrt: nvidia-smi does not report GPU {gpu_index} with its compute capability")
    return {"gpu": gpu["gpu"], "compute_capability": gpu["compute_capability"], "tensorrt_version": trt.__version__}


def _use_gpu(index: int) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(index)
    else:
        from hwaware.latency.cuda_runtime import use_device

        use_device(index)


def _current_gpu_index() -> int:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def check_supported(window: dict, version: str, device: str = "this GPU") -> None:
    """Refuse a TensorRT release outside a device profile's `tensorrt:` window (min_version, max_version),
    naming the install command the profile gives (e.g. TensorRT 10.4 for Volta, whose support 10.5 dropped)."""
    def key(v) -> tuple[int, ...]:
        return tuple(int(p) for p in str(v).split(".")[:2] if p.isdigit())

    low, high = window.get("min_version"), window.get("max_version")
    if (low is None or key(version) >= key(low)) and (high is None or key(version) <= key(high)):
        return
    span = f"{low or 'any'} to {high or 'the newest'}"
    fix = window.get("install") or f"pip install 'tensorrt>={low}'"
    raise HwawareError(f"tensorrt: TensorRT {version} does not support {device} (supported: {span}); {fix}")


def engine_mismatches(built: dict[str, Any], present: dict[str, str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) from comparing an engine's build metadata with the present machine.

    A different TensorRT version or compute capability cannot load the engine (error); a
    different GPU of the same compute capability loads it, but it was tuned elsewhere (warning).
    """
    errors, warnings = [], []
    for key, what in (("tensorrt_version", "TensorRT"), ("compute_capability", "compute capability")):
        if key not in built:
            errors.append(f"the build metadata has no {key}")
        elif str(built[key]) != str(present[key]):
            errors.append(f"built with {what} {built[key]}, this machine has {present[key]}")
    if not errors and built.get("gpu") != present["gpu"]:
        warnings.append(f"built on {built.get('gpu')}, running on {present['gpu']}: rebuild for best speed")
    return errors, warnings


def read_metadata(plan_path: str | Path) -> dict[str, Any]:
    path = metadata_path(plan_path)
    return read_json(path, f"{plan_path}: no build metadata {path.name} beside it; rebuild the engine")


def profile_shapes(batch_sizes: tuple[int, ...], opt: int | None = None) -> tuple[int, int, int]:
    """The one optimisation-profile rule (min / opt / max batch), for a table's pieces and the shipped plan alike.

    min is 1 whatever was asked, so every batch up to the largest runs (Triton's dynamic batcher
    sends any size up to `max_batch_size`); opt is the batch the latency table times when there is
    one (TensorRT tunes its tactics for the opt shape, so a table and the plan it prices must share
    it), else the median of the sizes; max is the largest size (opt included).
    """
    ordered = sorted({*batch_sizes, *((opt,) if opt else ())})
    if not ordered or ordered[0] < 1:
        raise HwawareError(f"batch sizes: need positive sizes, got {list(batch_sizes)}")
    return 1, int(opt or statistics.median_low(sorted(batch_sizes))), ordered[-1]


def build_plan(
    onnx_path: str | Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    timing_cache: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    gpu_index: int | None = None,
    opt_batch: int | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The one TensorRT builder: a serialized engine for `onnx_path` and its build metadata.

    `hwaware export` (model.plan) and the latency table's tensorrt backend (each piece) both call
    it, so a table times engines built exactly like the one that ships: the same typing for the
    TensorRT version, the same optimisation profile rule for the dynamic batch (`profile_shapes`,
    opt = `opt_batch`), the same timing cache handling. `timing_cache` (a file, created if missing,
    updated after the build) makes rebuilds on the same GPU and TensorRT fast. Every engine is
    audited (`audit_precision`): one asked for a reduced precision that computes in fp32 is refused.
    """
    if precision not in PRECISIONS:
        raise HwawareError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    low, opt, high = profile_shapes(tuple(batch_sizes), opt_batch)
    trt = _tensorrt()
    if gpu_index is not None:
        _use_gpu(gpu_index)  # TensorRT builds for the current CUDA device
    environment = present_environment(gpu_index)
    capability = tuple(int(p) for p in environment["compute_capability"].split("."))
    spec = check_runs(precision, "tensorrt", "cuda", environment["gpu"], capability)  # fp8: 8.9+ only
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # gone in TensorRT 11: strong typing only
    network, _parser = _parse_network(trt, builder, logger, onnx_path, weakly_typed)  # the parser owns the weights
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the audit
    network_input = network.get_input(0)
    if spec.quantized and not _has_qdq(trt, network):
        raise HwawareError(f"tensorrt: {precision} needs an explicitly quantized (Q/DQ) ONNX graph and {onnx_path} "
                           "has no QuantizeLinear/DequantizeLinear; quantize it with hwaware.quantize.quantize_onnx")
    if weakly_typed:
        for flag in builder_flags(precision):
            if not hasattr(trt.BuilderFlag, flag):
                raise HwawareError(f"tensorrt: TensorRT {trt.__version__} has no {flag} builder flag; "
                                   f"{precision} needs a newer TensorRT")
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if not weakly_typed and precision == "fp16" and network_input.dtype != trt.float16:
        raise HwawareError(
            f"tensorrt: TensorRT {trt.__version__} builds in the ONNX graph's own types and {onnx_path} is not fp16; "
            "export it with precision fp16"
        )
    sample_shape = tuple(network_input.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(network_input.name, (low, *sample_shape), (opt, *sample_shape), (high, *sample_shape))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    _attach_timing_cache(config, cache_file)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HwawareError(f"tensorrt: building the engine for {onnx_path} failed (see the TensorRT log above)")
    plan = bytes(memoryview(serialized))
    audit = audit_precision(_engine_information(trt, logger, plan), precision)  # refused before anything is written
    if cache_file:
        atomic_write(cache_file, lambda tmp: tmp.write_bytes(memoryview(config.get_timing_cache().serialize())))
    metadata = {
        **environment, "precision": precision, "strongly_typed": not weakly_typed, "input": network_input.name,
        "input_shape": [-1, *sample_shape], "batch_min": low, "batch_opt": opt, "batch_max": high,
        "workspace_bytes": workspace_bytes, "layer_precisions": audit,
        "onnx": Path(onnx_path).name, "built": utc_timestamp(),
    }
    return plan, metadata


def _engine_information(trt, logger, plan: bytes) -> str:
    """The engine inspector's JSON for a serialized engine (what `audit_precision` reads)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise HwawareError("tensorrt: the engine just built does not deserialize (see the TensorRT log above)")
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


# Layers that move or reshape data: they compute nothing, so their types say nothing about the engine's precision.
_DATA_MOVEMENT = frozenset({"Reformat", "Shuffle", "NoOp", "Constant", "Identity", "Cast", "Slice", "Concatenation",
                            "Gather", "Shape", "Quantize", "Dequantize"})
# How the inspector spells a data type in a tensor's "Format/Datatype" (or "DataType") text, lowest precision first.
_TYPE_WORDS = (("fp8", ("FP8", "E4M3")), ("int8", ("Int8", "INT8")), ("bf16", ("BF16", "BFloat16")),
               ("fp16", ("FP16", "Half")), ("fp32", ("FP32", "Float", "TF32")))
_ORDER = [name for name, _ in _TYPE_WORDS]


def _tensor_type(tensor: Any) -> str | None:
    text = " ".join(str(tensor.get(key, "")) for key in ("Format/Datatype", "DataType", "Format")) \
        if isinstance(tensor, dict) else ""
    words = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return next((name for name, spellings in _TYPE_WORDS if words & set(spellings)), None)


def audit_precision(engine_information: str, precision: str) -> dict[str, Any]:
    """Share of compute layers per precision in the engine inspector's JSON (`get_engine_information(JSON)`
    of an engine built with detailed profiling verbosity), refusing an engine asked for fp16, bf16, int8 or
    fp8 that computes in none of them: TensorRT falls back to fp32 silently (no fp16 kernels for the GPU, a
    graph exported in fp32 on a strongly typed build).

    A layer's precision is the lowest float type among its inputs and outputs (an int8 GEMM reads int8
    and may write fp16). Mixed precision is allowed and recorded: `{"layers": n, "shares": {...}}`.
    """
    try:
        info = json.loads(engine_information)
    except (TypeError, json.JSONDecodeError):
        raise HwawareError("tensorrt: the engine inspector's information is not JSON") from None
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list) or not layers:
        raise HwawareError("tensorrt: the engine inspector lists no layers; cannot audit the engine's precision")
    if any(not isinstance(layer, dict) for layer in layers):
        raise HwawareError("tensorrt: the engine inspector gives layer names only (the engine was not built with "
                           "detailed profiling verbosity); cannot audit its precision")
    counts: dict[str, int] = {}
    for layer in layers:
        if str(layer.get("LayerType", "")) in _DATA_MOVEMENT:
            continue
        types = [_tensor_type(t) for t in [*(layer.get("Inputs") or []), *(layer.get("Outputs") or [])]]
        types = [t for t in types if t]
        if types:
            lowest = min(types, key=_ORDER.index)
            counts[lowest] = counts.get(lowest, 0) + 1
    total = sum(counts.values())
    if not total:
        raise HwawareError("tensorrt: no compute layer in the engine inspector's information has a float type")
    shares = {name: round(counts[name] / total, 4) for name in _ORDER if name in counts}
    reduced = {"fp16": ("fp16",), "bf16": ("bf16",), "int8": ("int8",), "fp8": ("fp8",)}.get(precision, ())
    if reduced and not any(name in counts for name in reduced):
        found = ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
        raise HwawareError(f"tensorrt: the engine built for {precision} computes no layer in {precision} "
                           f"({total} compute layers: {found}); TensorRT fell back to fp32")
    return {"layers": total, "shares": shares}


def builder_flags(precision: str) -> tuple[str, ...]:
    """Weak-typing flags: Q/DQ layers run int8/fp8 and, as trtexec --best does, layers between them may run fp16."""
    return {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16"), "fp8": ("FP8", "FP16")}[precision]


def _has_qdq(trt, network) -> bool:
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _parse_network(trt, builder, logger, onnx_path: str | Path, weakly_typed: bool):
    """The network of an ONNX file: explicit batch (8.x needs the flag), strongly typed where TensorRT has only that."""
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if not weakly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HwawareError(f"tensorrt: cannot parse {onnx_path}: {problems}")
    return network, parser


def _attach_timing_cache(config, cache_file: Path | None) -> None:
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.exists() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), False):
        # a cache from another GPU or TensorRT version: start a fresh one rather than fail
        config.set_timing_cache(config.create_timing_cache(b""), False)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    timing_cache: str | Path | None = None,
    opt_batch: int | None = None,
) -> dict[str, Any]:
    """`build_plan`, written as `plan_path` with its metadata beside it (`metadata_path`); returns the metadata."""
    plan, metadata = build_plan(onnx_path, precision, batch_sizes, timing_cache, opt_batch=opt_batch)
    atomic_write(plan_path, lambda tmp: tmp.write_bytes(plan))
    atomic_write_text(metadata_path(plan_path), json.dumps(metadata, indent=2) + "\n")
    return metadata


def load_engine(plan_path: str | Path):
    """Deserialize `plan_path` after checking its metadata against this GPU and TensorRT.

    Returns the `tensorrt.ICudaEngine`; a mismatch is a HwawareError naming what differs.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise HwawareError(f"{plan_path}: no such engine file")
    built = read_metadata(plan_path)
    errors, warnings = engine_mismatches(built, present_environment())
    if errors:
        raise HwawareError(f"{plan_path}: cannot run here: {'; '.join(errors)}; rebuild it on this machine")
    for warning in warnings:
        log.warning("%s: %s", plan_path, warning)
    trt = _tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise HwawareError(f"{plan_path}: TensorRT could not deserialize the engine (see the TensorRT log above)")
    return engine


def check_serves(metadata: dict[str, Any], precision: str, batch: int, plan_path: str | Path) -> None:
    """Refuse to time a plan at a precision it was not built for, or a batch outside its optimisation profile."""
    built = metadata.get("precision")
    if built != precision:
        raise HwawareError(f"{plan_path}: built for {built}, not {precision}; export with --precision {precision}")
    low, high = metadata.get("batch_min"), metadata.get("batch_max")
    if not (isinstance(low, int) and isinstance(high, int)):
        raise HwawareError(f"{plan_path}: the build metadata has no batch_min/batch_max; rebuild the engine")
    if not low <= batch <= high:
        raise HwawareError(f"{plan_path}: serves batch {low} to {high}, not {batch}; export with batch sizes "
                           f"that include {batch}")


def profile_differences(plan: dict[str, Any], table_profile: dict[str, Any] | None, batch: int) -> list[str]:
    """Why a plan's timing may not match a table's prediction: another opt batch or profile than the table's pieces."""
    notes = []
    shipped = {k: plan.get(f"batch_{k}") for k in ("min", "opt", "max")}
    if batch != shipped["opt"]:
        notes.append(f"served at batch {batch}, the plan is tuned for batch {shipped['opt']} (its opt shape)")
    if table_profile and {k: table_profile.get(k) for k in shipped} != shipped:
        notes.append("the table's pieces were built with optimisation profile "
                     f"{_profile_text(table_profile)}, the plan with {_profile_text(shipped)}")
    return notes


def _profile_text(profile: dict[str, Any]) -> str:
    return "/".join(str(profile.get(k)) for k in ("min", "opt", "max")) + " (min/opt/max batch)"


def trtexec_command(metadata: dict[str, Any], onnx_file: str, plan_file: str, timing_cache_file: str | None,
                    settings: Any = None, batch: int | None = None, cuda_graph: bool = False) -> str:
    """The `trtexec` command that builds and times the engine `metadata` describes with NVIDIA's own tool.

    Its flags come from the same settings: the ONNX file, the optimisation profile, the precision as the
    TensorRT version takes it (weak-typing flags on 8.6/10.x as `builder_flags` sets them, --stronglyTyped
    where hwaware built strongly typed on 10.x, nothing on 11.x where strong typing is always on), the
    workspace pool, the timing cache, detailed profiling verbosity; and the timing of `settings` (a
    `MeasureSettings`: --iterations, --duration, --warmUp) at `batch` (default: the opt batch), compute
    only (--noDataTransfers, as hwaware times), with --useCudaGraph where hwaware replays a CUDA graph.
    """
    name = metadata["input"]
    dims = [str(d) for d in metadata["input_shape"][1:]]

    def shape(b: int) -> str:
        return f"{name}:{'x'.join([str(b), *dims])}"

    major = int(str(metadata["tensorrt_version"]).split(".")[0])
    flags = [f"--onnx={onnx_file}", f"--saveEngine={plan_file}", f"--minShapes={shape(metadata['batch_min'])}",
             f"--optShapes={shape(metadata['batch_opt'])}", f"--maxShapes={shape(metadata['batch_max'])}",
             f"--shapes={shape(batch or metadata['batch_opt'])}"]
    if not metadata.get("strongly_typed"):
        flags += [f"--{flag.lower()}" for flag in builder_flags(metadata["precision"])]
    elif major < 11:
        flags.append("--stronglyTyped")
    flags.append(f"--memPoolSize=workspace:{int(metadata.get('workspace_bytes', DEFAULT_WORKSPACE_BYTES)) >> 20}")
    if timing_cache_file:
        flags.append(f"--timingCacheFile={timing_cache_file}")
    flags.append("--profilingVerbosity=detailed")
    if settings is not None:
        flags += [f"--iterations={settings.min_repeats}", f"--duration={max(1, math.ceil(settings.min_time_s))}",
                  "--warmUp=200"]
    flags.append("--noDataTransfers")
    if cuda_graph:
        flags.append("--useCudaGraph")
    return " ".join(["trtexec", *flags])
