"""TensorRT engines built from hwaware's ONNX files, with the metadata that says where they can run.

An engine is only valid for the TensorRT version that built it and the GPU architecture
(compute capability) it was tuned on. `build_engine` writes `<plan>.json` beside the plan
with both; `load_engine` compares that with the present machine and refuses, in one clear
line, an engine that TensorRT would otherwise reject with a crash or a cryptic log.

Works with TensorRT 8.6, 10.x and 11.x. The ONNX file carries the precision (export writes
an fp16 graph for fp16), so on 11.x, where the weak-typing precision flags are gone, the
network is strongly typed and runs in the graph's types; on 8.6 and 10.x the FP16 builder
flag lets TensorRT pick fp16 kernels for the same fp16 graph. TensorRT is imported lazily.
"""

from __future__ import annotations

import json
import logging
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import atomic_write, atomic_write_text, read_json

PRECISIONS = ("fp32", "fp16")
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
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise HwawareError(f"tensorrt: {reason}")
    import tensorrt as trt

    return trt


def present_environment() -> dict[str, str]:
    """The GPU and TensorRT of this machine, in the keys the build metadata uses."""
    trt = _tensorrt()
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "tensorrt_version": trt.__version__,
    }


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


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build a TensorRT engine for `onnx_path` covering `batch_sizes`; write the plan and its metadata.

    `timing_cache` (a file, created if missing, updated after the build) makes rebuilds on the
    same GPU and TensorRT fast. Returns the metadata written to `metadata_path(plan_path)`.
    """
    if precision not in PRECISIONS:
        raise HwawareError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise HwawareError(f"batch sizes: need positive sizes, got {list(batch_sizes)}")
    trt = _tensorrt()
    environment = present_environment()
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)

    weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # gone in TensorRT 11: strong typing only
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if not weakly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HwawareError(f"tensorrt: cannot parse {onnx_path}: {problems}")

    config = builder.create_builder_config()
    if precision == "fp16" and weakly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    network_input = network.get_input(0)
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
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.exists() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), False):
        # a cache from another GPU or TensorRT version: start a fresh one rather than fail
        config.set_timing_cache(config.create_timing_cache(b""), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HwawareError(f"tensorrt: building the engine for {onnx_path} failed (see the TensorRT log above)")
    atomic_write(plan_path, lambda tmp: tmp.write_bytes(memoryview(serialized)))
    if cache_file:
        atomic_write(cache_file, lambda tmp: tmp.write_bytes(memoryview(config.get_timing_cache().serialize())))

    metadata = {
        **environment,
        "precision": precision,
        "strongly_typed": not weakly_typed,
        "input": network_input.name,
        "input_shape": [-1, *sample_shape],
        "batch_min": low,
        "batch_opt": opt,
        "batch_max": high,
        "onnx": Path(onnx_path).name,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
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
