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
                 quantize_mode: str | None = None, cuda_graph: bool = False):
        self.device, self.precision, self.threads, self.cuda_graph = device, precision, threads, bool(cuda_graph)
        if self.cuda_graph and not (self.on_gpu and self.replays_cuda_graphs):
            where = "on the CPU" if not self.on_gpu else f"with {self.name}"
            raise HwawareError(f"backend {self.name}: timing with CUDA graphs is not available {where}; "
                               "the torch and tensorrt backends on a GPU replay them")
        self.spec = check_runs(precision, self.name, "cuda" if self.on_gpu else "cpu", device, self._capability())
        self.quantize_mode = (check_mode(precision, quantize_mode, self.name == "tensorrt") if self.spec.quantized
                              else None)
        if self.on_gpu and self.needs_torch_cuda and not torch.cuda.is_available():
            raise HwawareError(f"backend {self.name}: device {device} requested but torch cannot use it "
                               "(no CUDA build, or none with kernels for this GPU); the onnxruntime and tensorrt "
                               "backends time it without torch")

    needs_torch_cuda = True  # the ONNX-serving backends override this: pieces are exported on the CPU
    replays_cuda_graphs = False  # whether runners can capture one run as a CUDA graph and time its replays

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
                "exporter": EXPORTER if self.name != "torch" else None, "quantize_mode": self.quantize_mode,
                "cuda_graph": self.cuda_graph}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU execution provider, or CUDA with I/O binding on the torch stream."""

    name = "onnxruntime"
    needs_torch_cuda = False

    def __init__(self, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 quantize_mode: str | None = None, cuda_graph: bool = False):
        self.ort = require("onnxruntime")
        super().__init__(device, precision, threads, quantize_mode, cuda_graph)
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
    """PyTorch eager on the CPU or one GPU; fp16/bf16 run the module cast to that dtype. On a GPU, `cuda_graph`
    times replays of one captured forward: at batch 1 a small ViT is launch-bound, and a CUDA graph removes
    the per-kernel launch cost a serving stack can remove too."""

    name = "torch"
    replays_cuda_graphs = True

    def prepare(self, module, example, workdir=None):
        module, example = _cast(module, example, self.precision, self.device)
        return _TorchRunner(module, example, self.on_gpu, None if self.on_gpu else self.threads, self.cuda_graph)

    def versions(self) -> dict:
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


class _TorchRunner:
    """Eager module (or, on a GPU with `cuda_graph`, the replay of its captured forward); on the CPU its thread
    count is set while it runs and restored after."""

    def __init__(self, module: nn.Module, example: torch.Tensor, on_gpu: bool, threads: int | None,
                 cuda_graph: bool = False):
        self.module, self.example, self.on_gpu, self.threads = module, example, on_gpu, threads
        self.graph = _capture_torch_graph(module, example) if cuda_graph else None

    def time(self, repeats: int) -> list[float]:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                run = self.graph.replay if self.graph else lambda: self.module(self.example)
                return _cuda_time(run, repeats) if self.on_gpu else _host_time(run, repeats)
        finally:
            torch.set_num_threads(previous)


def _capture_torch_graph(module: nn.Module, example: torch.Tensor) -> torch.cuda.CUDAGraph:
    """One forward of `module` captured as a CUDA graph, after warm-up runs on a side stream (what capture needs:
    lazy initialisation and cuDNN/cuBLAS autotuning happen outside the graph)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(3):
                module(example)
        torch.cuda.current_stream(example.device).wait_stream(side)
        with torch.cuda.graph(graph):
            module(example)
    torch.cuda.synchronize(example.device)
    return graph


class TensorRTBackend(Backend):
    """TensorRT engines built from the ONNX pieces by `hwaware.tensorrt_build.build_plan`, the builder
    export uses too (same typing per TensorRT version, same optimisation profile rule, same timing
    cache handling, same precision audit). Precision lives in the ONNX graph (the module is exported in
    fp16, or in fp32 and quantized to int8/fp8 Q/DQ). `serve_for_table` sets what a latency table
    needs: the optimisation profile the shipped plan will have at the table's batch, and a timing cache
    kept beside the table. `prepare_plan` times an exported model.plan as it is (bench). Runs with torch's
    CUDA where torch can use the GPU, else through cuda-python.
    """

    name = "tensorrt"
    needs_torch_cuda = False
    replays_cuda_graphs = True

    def __init__(self, device: str = "cuda", precision: str = "fp16", threads: int | None = None,
                 timing_cache: str | Path | None = None, quantize_mode: str | None = None, cuda_graph: bool = False):
        self.trt = require("tensorrt")
        super().__init__(device if device.startswith("cuda") else "cuda", precision, threads, quantize_mode, cuda_graph)
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.batch_sizes: tuple[int, ...] = ()  # the sizes the shipped plan serves
        self.table_batch: int | None = None
        self.last_audit: dict | None = None

    def serve_for_table(self, batch: int, batch_sizes: tuple[int, ...], timing_cache: Path) -> None:
        """Build every piece with the optimisation profile `profile_shapes(batch_sizes, opt=batch)`, the rule the
        export applies at the table's batch, and keep the timing cache at `timing_cache` (unless one was given)."""
        self.batch_sizes, self.table_batch = tuple(batch_sizes), int(batch)
        self.timing_cache = self.timing_cache or Path(timing_cache)

    def optimization_profile(self, batch: int) -> dict[str, int]:
        from hwaware.tensorrt_build import profile_shapes

        low, opt, high = profile_shapes((*self.batch_sizes, batch), batch)
        return {"min": low, "opt": opt, "max": high}

    def prepare_onnx(self, onnx_path, example):
        from hwaware.tensorrt_build import build_plan

        batch = int(example.shape[0])
        plan, metadata = build_plan(onnx_path, self.precision, (*self.batch_sizes, batch), self.timing_cache,
                                    gpu_index=self.gpu_index, opt_batch=batch)
        self.last_audit = metadata["layer_precisions"]  # the table's sidecar sums these
        engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise HwawareError("tensorrt: the engine does not deserialize on this TensorRT/GPU")
        return self.runner(engine, example)

    def prepare_plan(self, plan_path: str | Path, example: torch.Tensor):
        """A runner for an exported plan, loaded (never rebuilt) after its metadata is checked against this
        GPU, TensorRT, the precision and the batch."""
        from hwaware.tensorrt_build import check_serves, load_engine, read_metadata

        check_serves(read_metadata(plan_path), self.precision, int(example.shape[0]), plan_path)
        return self.runner(load_engine(plan_path), example)

    def runner(self, engine, example: torch.Tensor):
        if torch.cuda.is_available():
            return TensorRTRunner(engine, example.to(self.device), self.cuda_graph)
        return _TensorRTCudaPythonRunner(self.trt, engine, example.numpy(), self.gpu_index, self.cuda_graph)

    def versions(self) -> dict:
        return {"tensorrt": self.trt.__version__, "torch_cuda": torch.version.cuda}

    def settings(self) -> dict:
        settings = {**super().settings(), "timing_cache": self.timing_cache.name if self.timing_cache else None}
        if self.table_batch is not None:
            settings["optimization_profile"] = self.optimization_profile(self.table_batch)
        return settings


class TensorRTRunner:
    """The one TensorRT runner (profile, export's checks, bench): name-based I/O (`set_tensor_address`) and
    `execute_async_v3` on its own stream (present from TensorRT 8.5 on), torch tensors as buffers.

    With `cuda_graph`, one `execute_async_v3` is captured as a CUDA graph (after a first run, which TensorRT
    needs after an input shape change) and replayed: what `trtexec --useCudaGraph` times.
    """

    def __init__(self, engine, example: torch.Tensor, cuda_graph: bool = False):
        import tensorrt as trt

        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if hasattr(trt.DataType, "BF16"):
            dtypes[trt.DataType.BF16] = torch.bfloat16
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=example.device)
        self.buffers, self.output = [], None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = dtypes.get(engine.get_tensor_dtype(name))
            if dtype is None:
                raise HwawareError(f"tensorrt: unsupported I/O data type {engine.get_tensor_dtype(name)} of {name}")
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffer = example.to(dtype).contiguous()
                self.context.set_input_shape(name, tuple(buffer.shape))
            else:
                buffer = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=example.device)
                self.output = buffer
            self.context.set_tensor_address(name, buffer.data_ptr())
            self.buffers.append(buffer)
        self.stream.wait_stream(torch.cuda.current_stream(example.device))  # the input copy precedes every run
        self.graph = None
        if cuda_graph:
            self._enqueue()
            self.stream.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self._enqueue()

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise HwawareError("tensorrt: the engine failed to run (see the TensorRT log above)")

    def _run(self) -> None:
        self.graph.replay() if self.graph else self._enqueue()

    def time(self, repeats: int) -> list[float]:
        with torch.cuda.stream(self.stream):
            return _cuda_time(self._run, repeats)

    def outputs(self) -> torch.Tensor:
        """Run once on the example and return the output (a CUDA tensor)."""
        with torch.cuda.stream(self.stream):
            self._run()
        self.stream.synchronize()
        return self.output


class _TensorRTCudaPythonRunner:
    """The same engine run where torch cannot use the GPU: buffers, events and CUDA graphs from cuda-python."""

    def __init__(self, trt, engine, example: np.ndarray, index: int, cuda_graph: bool = False):
        from hwaware.latency.cuda_runtime import CudaGraph, DeviceArray, EventTimer

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
        self.run = self.context.execute_async_v3
        if cuda_graph:
            self.timer.time(self.run, 1)  # the first run after an input shape change stays outside the graph
            self.run = CudaGraph(self.run, self.timer.stream).launch

    def time(self, repeats: int) -> list[float]:
        return self.timer.time(self.run, repeats)


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
