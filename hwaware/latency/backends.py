"""Backends that turn a module or an ONNX file into a timed runner: ONNX Runtime, TensorRT, PyTorch.

Each backend has `prepare(module, example, workdir)` (export if it serves ONNX, then load) and,
for the ONNX-serving ones, `prepare_onnx(path, example)`, so export can time the very model.onnx
it wrote. Optional packages are imported only when a backend is used; a missing one is one line
naming the package to install.
"""

from __future__ import annotations

import importlib
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hwaware.errors import HwawareError
from hwaware.io import atomic_write
from hwaware.onnx_writer import write_onnx
from hwaware.precision import check_mode, check_runs
from hwaware.quantize import quantize_onnx, quantized_file_name

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


def _cast(module: nn.Module, example: torch.Tensor, dtype_name: str, device: str) -> tuple[nn.Module, torch.Tensor]:
    dtype = _TORCH_DTYPES[dtype_name]
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
    """A serving stack on one device, at one precision, with a fixed thread count.

    A quantized precision (int8, fp8) exports each piece in fp32 and quantizes it with
    `hwaware.quantize.quantize_onnx` in `quantize_mode`, the function export uses on the model.
    """

    name = ""

    def __init__(self, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 quantize_mode: str | None = None):
        self.device, self.precision, self.threads = device, precision, threads
        self.spec = check_runs(precision, self.name, "cuda" if self.on_gpu else "cpu", device, self._capability())
        self.quantize_mode = (check_mode(precision, quantize_mode, self.name == "tensorrt") if self.spec.quantized
                              else None)
        if self.on_gpu and self.needs_torch_cuda and not torch.cuda.is_available():
            raise HwawareError(f"backend {self.name}: device {device} requested but torch cannot use it "
                               "(no CUDA build, or none with kernels for this GPU); the onnxruntime and tensorrt "
                               "backends time it without torch")

    needs_torch_cuda = True  # the ONNX-serving backends override this: pieces are exported on the CPU

    def _capability(self) -> tuple[int, int] | None:
        """The compute capability of this backend's GPU (nvidia-smi), for precisions that need one (fp8)."""
        if not self.on_gpu:
            return None
        from hwaware.latency.host import gpus

        cc = next((g["compute_capability"] for g in gpus() if g["index"] == self.gpu_index), None)
        return tuple(int(p) for p in cc.split(".")) if cc else None

    @property
    def gpu_index(self) -> int:
        return torch.device(self.device).index or 0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def prepare(self, module: nn.Module, example: torch.Tensor, workdir: str | Path):
        """Export `module` to ONNX in this precision under `workdir` (quantized the way export quantizes,
        calibrated on `example`: the Q/DQ placement, not the scales, sets the speed), then load it."""
        module, example = _cast(module, example, self.spec.graph_dtype, "cpu")
        onnx_path = write_piece_onnx(module, example, Path(workdir) / "model.onnx")
        if self.spec.quantized:
            quantized = Path(workdir) / quantized_file_name(self.precision)
            quantize_onnx(onnx_path, quantized, self.precision, self.quantize_mode, calibration=example)
            onnx_path = quantized
        return self.prepare_onnx(onnx_path, example)

    def prepare_onnx(self, onnx_path: str | Path, example: torch.Tensor):
        raise HwawareError(f"backend {self.name}: runs nn.Modules, not ONNX files")

    def versions(self) -> dict:
        return {}

    def settings(self) -> dict:
        return {"backend": self.name, "device": self.device, "precision": self.precision, "threads": self.threads,
                "exporter": EXPORTER if self.name != "torch" else None, "quantize_mode": self.quantize_mode}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU execution provider, or CUDA with I/O binding on the torch stream."""

    name = "onnxruntime"
    needs_torch_cuda = False

    def __init__(self, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 quantize_mode: str | None = None):
        self.ort = require("onnxruntime")
        super().__init__(device, precision, threads, quantize_mode)
        if self.on_gpu and "CUDAExecutionProvider" not in self.ort.get_available_providers():
            raise HwawareError("backend onnxruntime: no CUDA execution provider; pip install onnxruntime-gpu")

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
        if not torch.cuda.is_available():
            provider = ("CUDAExecutionProvider", {"device_id": self.gpu_index})
            session = self.ort.InferenceSession(str(onnx_path), options, providers=[provider])
            return _OrtValueRunner(self.ort, session, example.detach().cpu().numpy(), self.gpu_index)
        stream = torch.cuda.current_stream()
        provider = ("CUDAExecutionProvider", {"device_id": self.gpu_index, "user_compute_stream": str(stream.cuda_stream)})
        session = self.ort.InferenceSession(str(onnx_path), options, providers=[provider])
        return _OrtCudaRunner(session, example.to(self.device), self.gpu_index)

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


class _OrtValueRunner:
    """ONNX Runtime on a GPU torch cannot drive: I/O in OrtValues on the device; each synchronous
    `run_with_iobinding` is timed on the host clock."""

    def __init__(self, ort, session, example, index: int):
        self.session, self.binding = session, session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_numpy(example, "cuda", index)
        self.binding.bind_ortvalue_input(session.get_inputs()[0].name, self.input)
        for output in session.get_outputs():
            self.binding.bind_output(output.name, "cuda", index)

    def time(self, repeats: int) -> list[float]:
        return _host_time(lambda: self.session.run_with_iobinding(self.binding), repeats)


class TorchBackend(Backend):
    """PyTorch eager on the CPU or one GPU; fp16/bf16 run the module cast to that dtype."""

    name = "torch"

    def prepare(self, module, example, workdir=None):
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
    """TensorRT engines built from the ONNX pieces by `hwaware.tensorrt_build.build_plan`, the builder
    export uses too (same typing per TensorRT version, same optimisation profile rule, same timing
    cache handling), for the batch being timed. Precision lives in the ONNX graph (the module is
    exported in fp16, or in fp32 and quantized to int8/fp8 Q/DQ). Runs with torch's CUDA where torch can use the GPU, else through cuda-python.
    """

    name = "tensorrt"
    needs_torch_cuda = False

    def __init__(self, device: str = "cuda", precision: str = "fp16", threads: int | None = None,
                 timing_cache: str | Path | None = None, quantize_mode: str | None = None):
        self.trt = require("tensorrt")
        super().__init__(device if device.startswith("cuda") else "cuda", precision, threads, quantize_mode)
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def prepare_onnx(self, onnx_path, example):
        from hwaware.tensorrt_build import build_plan

        plan, _ = build_plan(onnx_path, self.precision, (int(example.shape[0]),), self.timing_cache,
                             gpu_index=self.gpu_index)
        return self.load_plan(plan, example)

    def load_plan(self, plan: bytes, example: torch.Tensor):
        engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise HwawareError("tensorrt: the engine does not deserialize on this TensorRT/GPU")
        if torch.cuda.is_available():
            return _TensorRTRunner(self.trt, engine, example.to(self.device))
        return _TensorRTCudaPythonRunner(self.trt, engine, example.numpy(), self.gpu_index)

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


class _TensorRTCudaPythonRunner:
    """The same engine run where torch cannot use the GPU: buffers and events from cuda-python."""

    def __init__(self, trt, engine, example: np.ndarray, index: int):
        from hwaware.latency.cuda_runtime import DeviceArray, EventTimer

        self.context = engine.create_execution_context()
        self.timer = EventTimer()
        self.buffers = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffer = DeviceArray(example.astype(dtype), device=index)
                self.context.set_input_shape(name, example.shape)
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                buffer = DeviceArray(nbytes=int(np.prod(shape)) * dtype.itemsize, device=index)
            self.context.set_tensor_address(name, buffer.ptr)
            self.buffers.append(buffer)

    def time(self, repeats: int) -> list[float]:
        return self.timer.time(self.context.execute_async_v3, repeats)


BACKEND_CLASSES = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "torch": TorchBackend}


def get_backend(name: str, device: str = "cpu", precision: str = "fp32", threads: int | None = None, **options) -> Backend:
    if name not in BACKEND_CLASSES:
        raise HwawareError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKEND_CLASSES)}")
    return BACKEND_CLASSES[name](device=device, precision=precision, threads=threads, **options)


def environment(backend: Backend) -> dict:
    """Provenance for a table's sidecar: the host fingerprint (CPU or GPU, driver, clocks, serving-stack
    versions), Python and torch versions, and the thread count."""
    from hwaware.latency.host import host_fingerprint

    env = {
        **host_fingerprint("cuda" if backend.on_gpu else "cpu", backend.gpu_index if backend.on_gpu else 0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": backend.threads,
    }
    env.update(backend.versions())
    return env
