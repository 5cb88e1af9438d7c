"""Backends that turn a module or an ONNX file into a timed runner: ONNX Runtime, TensorRT, PyTorch.

Each backend has `prepare(module, example, workdir)` (export if it serves ONNX, then load) and,
for the ONNX-serving ones, `prepare_onnx(path, example)`, so export can time the very model.onnx
it wrote. Optional packages are imported only when a backend is used; a missing one is one line
naming the package to install.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hwaware.errors import HwawareError
from hwaware.io import atomic_write
from hwaware.onnx_writer import write_onnx

EXPORTER = "torch.onnx TorchScript (dynamo=False), dynamic batch"
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PIP_NAMES = {"onnxruntime": "onnxruntime (or onnxruntime-gpu for CUDA)", "tensorrt": "tensorrt"}


def require(module: str):
    """Import an optional package, or fail with one line naming what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HwawareError(
            f"backend: the Python package {module!r} is not installed; pip install {_PIP_NAMES.get(module, module)}"
        ) from None


def write_piece_onnx(module: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `module` with `hwaware export`'s own ONNX writer (TorchScript exporter, opset 17, dynamic
    batch), atomically, so the table prices the graph that ships."""
    atomic_write(path, lambda tmp: write_onnx(module, example, tmp, output_name="output"))
    return Path(path)


def _cast(module: nn.Module, example: torch.Tensor, precision: str, device: str) -> tuple[nn.Module, torch.Tensor]:
    dtype = _TORCH_DTYPES[precision]
    return module.eval().to(device=device, dtype=dtype), example.to(device=device, dtype=dtype)


def _cuda_time(run, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of `run`, from CUDA events on the current stream."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _host_time(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class Backend:
    """A serving stack on one device, at one precision, with a fixed thread count."""

    name = ""

    def __init__(self, device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        if precision not in _TORCH_DTYPES:
            raise HwawareError(f"precision: {precision!r} is not one of {', '.join(_TORCH_DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise HwawareError(f"backend {self.name}: device {device} requested but torch sees no CUDA device")
        self.device, self.precision, self.threads = device, precision, threads

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def prepare(self, module: nn.Module, example: torch.Tensor, workdir: str | Path):
        """Export `module` to ONNX in this precision under `workdir`, then load it as a runner."""
        module, example = _cast(module, example, self.precision, "cpu")
        onnx_path = write_piece_onnx(module, example, Path(workdir) / "model.onnx")
        return self.prepare_onnx(onnx_path, example)

    def prepare_onnx(self, onnx_path: str | Path, example: torch.Tensor):
        raise HwawareError(f"backend {self.name}: runs nn.Modules, not ONNX files")

    def versions(self) -> dict:
        return {}

    def settings(self) -> dict:
        return {"backend": self.name, "device": self.device, "precision": self.precision, "threads": self.threads,
                "exporter": EXPORTER if self.name != "torch" else None}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU execution provider, or CUDA with I/O binding on the torch stream."""

    name = "onnxruntime"

    def __init__(self, device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        self.ort = require("onnxruntime")
        super().__init__(device, precision, threads)
        if self.on_gpu and "CUDAExecutionProvider" not in self.ort.get_available_providers():
            raise HwawareError("backend onnxruntime: no CUDA execution provider; pip install onnxruntime-gpu")
        if precision == "bf16" or (precision != "fp32" and not self.on_gpu):
            raise HwawareError(f"backend onnxruntime: {precision} on {device} is not supported; use fp32 (or fp16 on CUDA)")

    def prepare_onnx(self, onnx_path, example):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not self.on_gpu:
            session = self.ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
            return _OrtCpuRunner(session, feed)
        stream = torch.cuda.current_stream()
        index = torch.device(self.device).index or 0
        provider = ("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream.cuda_stream)})
        session = self.ort.InferenceSession(str(onnx_path), options, providers=[provider])
        return _OrtCudaRunner(session, example.to(self.device), index)

    def versions(self) -> dict:
        return {"onnxruntime": self.ort.__version__, "providers": self.ort.get_available_providers()}


class _OrtCpuRunner:
    def __init__(self, session, feed):
        self.session, self.feed = session, feed

    def time(self, repeats: int) -> list[float]:
        return _host_time(lambda: self.session.run(None, self.feed), repeats)


class _OrtCudaRunner:
    """Input and output stay on the GPU (I/O binding), so only the model is timed."""

    def __init__(self, session, example: torch.Tensor, index: int):
        self.session, self.example = session, example.contiguous()
        self.binding = session.io_binding()
        dtype = {torch.float32: np.float32, torch.float16: np.float16}[example.dtype]
        self.binding.bind_input(session.get_inputs()[0].name, "cuda", index, dtype, list(example.shape),
                                self.example.data_ptr())
        for output in session.get_outputs():
            self.binding.bind_output(output.name, "cuda", index)

    def time(self, repeats: int) -> list[float]:
        return _cuda_time(lambda: self.session.run_with_iobinding(self.binding), repeats)


class TorchBackend(Backend):
    """PyTorch eager on the CPU or one GPU; fp16/bf16 run the module cast to that dtype."""

    name = "torch"

    def prepare(self, module, example, workdir=None):
        if not self.on_gpu and self.precision != "fp32":
            raise HwawareError(f"backend torch: {self.precision} on the CPU is not supported; use fp32")
        module, example = _cast(module, example, self.precision, self.device)
        return _TorchRunner(module, example, self.on_gpu, None if self.on_gpu else self.threads)

    def versions(self) -> dict:
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


class _TorchRunner:
    """Eager module; on the CPU its thread count is set while it runs and restored after."""

    def __init__(self, module: nn.Module, example: torch.Tensor, on_gpu: bool, threads: int | None):
        self.module, self.example, self.on_gpu, self.threads = module, example, on_gpu, threads

    def time(self, repeats: int) -> list[float]:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                run = lambda: self.module(self.example)  # noqa: E731
                return _cuda_time(run, repeats) if self.on_gpu else _host_time(run, repeats)
        finally:
            torch.set_num_threads(previous)


class TensorRTBackend(Backend):
    """TensorRT engines built from ONNX with the Python API (8.6, 10.x and 11.x).

    Precision lives in the ONNX graph (the module is exported in fp16/bf16). TensorRT >= 10 builds
    a strongly typed network from it (11.x has no precision flags at all); 8.x builds a weakly typed
    explicit-batch network with the FP16/BF16 builder flag. A timing cache makes rebuilds quick.
    """

    name = "tensorrt"

    def __init__(self, device: str = "cuda", precision: str = "fp16", threads: int | None = None,
                 timing_cache: str | Path | None = None, workspace_bytes: int = 4 << 30):
        self.trt = require("tensorrt")
        super().__init__(device if device.startswith("cuda") else "cuda", precision, threads)
        self.major = int(self.trt.__version__.split(".")[0])
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.workspace_bytes = workspace_bytes
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def build(self, onnx_path: str | Path) -> bytes:
        """A serialized engine (plan) for `onnx_path`; export writes it as model.plan."""
        trt = self.trt
        creation = trt.NetworkDefinitionCreationFlag
        flags = 0
        if self.major < 10:
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        strongly_typed = self.major >= 10 and hasattr(creation, "STRONGLY_TYPED")
        if strongly_typed:
            flags |= 1 << int(creation.STRONGLY_TYPED)
        builder = trt.Builder(self.logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise HwawareError(f"tensorrt: cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if not strongly_typed and self.precision != "fp32":
            config.set_flag(getattr(trt.BuilderFlag, self.precision.upper()))
        cached = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.exists() else b""
        cache = config.create_timing_cache(cached)
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise HwawareError(f"tensorrt: building an engine from {onnx_path} failed (see TensorRT's log above)")
        if self.timing_cache:
            serialized = bytes(cache.serialize())
            atomic_write(self.timing_cache, lambda tmp: tmp.write_bytes(serialized))
        return bytes(plan)

    def prepare_onnx(self, onnx_path, example):
        return self.load_plan(self.build(onnx_path), example)

    def load_plan(self, plan: bytes, example: torch.Tensor):
        engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise HwawareError("tensorrt: the engine does not deserialize on this TensorRT/GPU")
        return _TensorRTRunner(self.trt, engine, example.to(self.device))

    def versions(self) -> dict:
        return {"tensorrt": self.trt.__version__, "torch_cuda": torch.version.cuda}


class _TensorRTRunner:
    """Name-based I/O (`set_tensor_address`) and `execute_async_v3`: present from TensorRT 8.5 on."""

    def __init__(self, trt, engine, example: torch.Tensor):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.current_stream()
        self.buffers = []
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if hasattr(trt.DataType, "BF16"):
            dtypes[trt.DataType.BF16] = torch.bfloat16
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = dtypes[engine.get_tensor_dtype(name)]
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffer = example.to(dtype).contiguous()
                self.context.set_input_shape(name, tuple(buffer.shape))
            else:
                buffer = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=example.device)
            self.context.set_tensor_address(name, buffer.data_ptr())
            self.buffers.append(buffer)

    def time(self, repeats: int) -> list[float]:
        return _cuda_time(lambda: self.context.execute_async_v3(self.stream.cuda_stream), repeats)


BACKEND_CLASSES = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "torch": TorchBackend}


def get_backend(name: str, device: str = "cpu", precision: str = "fp32", threads: int | None = None, **options) -> Backend:
    if name not in BACKEND_CLASSES:
        raise HwawareError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKEND_CLASSES)}")
    return BACKEND_CLASSES[name](device=device, precision=precision, threads=threads, **options)


def environment(backend: Backend) -> dict:
    """Provenance for a table's sidecar: versions, driver, CPU model, threads."""
    from hwaware.latency.devices import cpu_model

    env = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "driver": _nvidia_driver(),
        "onnxruntime": _version_of("onnxruntime"),
        "tensorrt": _version_of("tensorrt"),
        "threads": backend.threads,
    }
    if backend.on_gpu:
        env["gpu"] = torch.cuda.get_device_name(torch.device(backend.device))
    env.update(backend.versions())
    return env


def _version_of(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
