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
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import atomic_write, atomic_write_text, read_json, utc_timestamp
from hwaware.precision import PRECISIONS as ALL_PRECISIONS
from hwaware.precision import check_runs

PRECISIONS = tuple(name for name, p in ALL_PRECISIONS.items() if ("tensorrt", "cuda") in p.runs_on)
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


def profile_shapes(batch_sizes: tuple[int, ...]) -> tuple[int, int, int]:
    """min / opt / max batch of the optimisation profile: 1 / median / largest of the sizes asked for.

    min is 1 whatever was asked, so every batch up to the largest runs: Triton's dynamic
    batcher sends any size up to `max_batch_size`.
    """
    ordered = sorted(batch_sizes)
    return 1, int(statistics.median_low(ordered)), ordered[-1]


def build_plan(
    onnx_path: str | Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    timing_cache: str | Path | None = None,
    workspace_bytes: int = 4 << 30,
    gpu_index: int | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The one TensorRT builder: a serialized engine for `onnx_path` and its build metadata.

    `hwaware export` (model.plan) and the latency table's tensorrt backend (each piece) both call
    it, so a table times engines built exactly like the one that ships: the same typing for the
    TensorRT version, the same optimisation profile rule for the dynamic batch (`profile_shapes`),
    the same timing cache handling. `timing_cache` (a file, created if missing, updated after the
    build) makes rebuilds on the same GPU and TensorRT fast.
    """
    if precision not in PRECISIONS:
        raise HwawareError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise HwawareError(f"batch sizes: need positive sizes, got {list(batch_sizes)}")
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
    network_input = network.get_input(0)
    if spec.quantized and not _has_qdq(trt, network):
        raise HwawareError(f"tensorrt: {precision} needs an explicitly quantized (Q/DQ) ONNX graph and {onnx_path} "
                           "has no QuantizeLinear/DequantizeLinear; quantize it with hwaware.quantize.quantize_onnx")
    if weakly_typed:
        for flag in _builder_flags(precision):
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
    low, opt, high = profile_shapes(tuple(batch_sizes))
    profile = builder.create_optimization_profile()
    profile.set_shape(network_input.name, (low, *sample_shape), (opt, *sample_shape), (high, *sample_shape))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    _attach_timing_cache(config, cache_file)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HwawareError(f"tensorrt: building the engine for {onnx_path} failed (see the TensorRT log above)")
    if cache_file:
        atomic_write(cache_file, lambda tmp: tmp.write_bytes(memoryview(config.get_timing_cache().serialize())))
    metadata = {
        **environment, "precision": precision, "strongly_typed": not weakly_typed, "input": network_input.name,
        "input_shape": [-1, *sample_shape], "batch_min": low, "batch_opt": opt, "batch_max": high,
        "onnx": Path(onnx_path).name, "built": utc_timestamp(),
    }
    return bytes(memoryview(serialized)), metadata


def _builder_flags(precision: str) -> tuple[str, ...]:
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
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """`build_plan`, written as `plan_path` with its metadata beside it (`metadata_path`); returns the metadata."""
    plan, metadata = build_plan(onnx_path, precision, batch_sizes, timing_cache)
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


def run_engine(engine, images):
    """Run `engine` on a batch of images (a torch tensor) and return its logits as a CUDA torch tensor.

    Uses the name-based I/O API that TensorRT 8.5+, 10.x and 11.x share (`set_input_shape`,
    `set_tensor_address`, `execute_async_v3`), with torch tensors as device buffers.
    """
    import tensorrt as trt
    import torch

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise HwawareError(f"tensorrt: expected one input and one output, the engine has {inputs} and {outputs}")
    context = engine.create_execution_context()
    dtype = _torch_dtype(engine.get_tensor_dtype(inputs[0]))
    images = images.to("cuda", dtype).contiguous()
    context.set_input_shape(inputs[0], tuple(images.shape))
    out_shape = tuple(context.get_tensor_shape(outputs[0]))
    logits = torch.empty(out_shape, dtype=_torch_dtype(engine.get_tensor_dtype(outputs[0])), device="cuda")
    context.set_tensor_address(inputs[0], images.data_ptr())
    context.set_tensor_address(outputs[0], logits.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise HwawareError("tensorrt: the engine failed to run (see the TensorRT log above)")
    stream.synchronize()
    return logits


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if trt_dtype not in table:
        raise HwawareError(f"tensorrt: unsupported I/O data type {trt_dtype}")
    return table[trt_dtype]
