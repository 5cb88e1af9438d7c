"""GPU buffers and event timing without torch, through NVIDIA's cuda-python (`cuda.bindings.runtime`).

Needed where torch has no kernels for the GPU (a current torch on a V100) but TensorRT serves
on it: the TensorRT runner then allocates its I/O and times with CUDA events here instead of
through torch. Installed by the `tensorrt-volta` extra.
"""

from __future__ import annotations

import numpy as np

from hwaware.errors import HwawareError


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python before 12.6
        except ImportError:
            raise HwawareError("backend: torch cannot use this GPU and cuda-python is not installed; "
                               "pip install 'hwaware[tensorrt-volta]' (or cuda-python)") from None
    return runtime


# What the runtime answers where there is no GPU, or no driver new enough for it.
_NO_GPU = frozenset({"cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInitializationError"})


def _check(result):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        hint = "; no usable NVIDIA GPU and driver here" if name in _NO_GPU else ""
        raise HwawareError(f"cuda: {name}{hint}")
    return values[0] if len(values) == 1 else values


def use_device(index: int) -> None:
    """Make GPU `index` the current CUDA device of this thread (what TensorRT builds and runs on)."""
    _check(_cudart().cudaSetDevice(index))


class DeviceArray:
    """A device buffer holding `array` (or `nbytes` of uninitialised memory), freed with the object."""

    def __init__(self, array: np.ndarray | None = None, nbytes: int = 0, device: int = 0):
        self.rt = _cudart()
        use_device(device)
        self.nbytes = array.nbytes if array is not None else nbytes
        self.ptr = int(_check(self.rt.cudaMalloc(self.nbytes)))
        if array is not None:
            host = np.ascontiguousarray(array)
            _check(self.rt.cudaMemcpy(self.ptr, host.ctypes.data, self.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def __del__(self):
        if getattr(self, "ptr", 0):
            self.rt.cudaFree(self.ptr)


class EventTimer:
    """Milliseconds of each call of `run(stream)` from a pair of CUDA events on one stream."""

    def __init__(self):
        self.rt = _cudart()
        self.stream = _check(self.rt.cudaStreamCreate())

    def __del__(self):
        if getattr(self, "stream", None) is not None:
            self.rt.cudaStreamDestroy(self.stream)

    def time(self, run, repeats: int) -> list[float]:
        events = [(_check(self.rt.cudaEventCreate()), _check(self.rt.cudaEventCreate())) for _ in range(repeats)]
        for start, end in events:
            _check(self.rt.cudaEventRecord(start, self.stream))
            run(int(self.stream))
            _check(self.rt.cudaEventRecord(end, self.stream))
        _check(self.rt.cudaStreamSynchronize(self.stream))
        times = [float(_check(self.rt.cudaEventElapsedTime(start, end))) for start, end in events]
        for pair in events:
            for event in pair:
                self.rt.cudaEventDestroy(event)
        return times


class CudaGraph:
    """One call of `run(stream)` captured on `stream` as a CUDA graph; `launch(stream)` replays it."""

    def __init__(self, run, stream):
        self.rt = _cudart()
        _check(self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            run(int(stream))
        finally:
            self.graph = _check(self.rt.cudaStreamEndCapture(stream))
        self.exec = _check(self.rt.cudaGraphInstantiate(self.graph, 0))

    def launch(self, stream: int) -> None:
        _check(self.rt.cudaGraphLaunch(self.exec, stream))

    def __del__(self):
        if getattr(self, "exec", None) is not None:
            self.rt.cudaGraphExecDestroy(self.exec)
        if getattr(self, "graph", None) is not None:
            self.rt.cudaGraphDestroy(self.graph)
