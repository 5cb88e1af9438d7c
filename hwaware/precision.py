"""The one list of precisions hwaware knows, and which backend on which device runs each.

Profile, export, bench, the device profiles and the roofline estimate read this instead of
keeping their own lists, so a precision is added (or refused) in one place. Float precisions
are written as a graph in their own dtype; quantized ones (int8, fp8) are written as an fp32
graph and then quantized to explicit Q/DQ nodes by `hwaware.quantize`, the form ONNX Runtime
and TensorRT (explicit quantization, the only INT8 path TensorRT 11 keeps) both take.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwaware.errors import HwawareError

BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEVICE_KINDS = {"cpu": "the CPU", "cuda": "a GPU"}


@dataclass(frozen=True)
class Precision:
    """A number format: its size, the dtype its graph is written in, and where it runs."""

    name: str
    bytes_per_element: int
    graph_dtype: str  # the torch/ONNX dtype the model is written in before any quantization
    quantized: bool
    runs_on: frozenset[tuple[str, str]]  # (backend, device kind)
    min_compute_capability: tuple[int, int] | None = None  # for GPUs; None: any that runs the backend

    def where(self) -> str:
        """`onnxruntime on the CPU, tensorrt on a GPU` - for error messages."""
        gpu_note = (f" (compute capability {'.'.join(map(str, self.min_compute_capability))}+)"
                    if self.min_compute_capability else "")
        return ", ".join(f"{backend} on {DEVICE_KINDS[kind]}{gpu_note if kind == 'cuda' else ''}"
                         for backend, kind in sorted(self.runs_on))


def _runs(*pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(tuple(p.split("/")) for p in pairs)  # type: ignore[misc]


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 4, "fp32", False, _runs("onnxruntime/cpu", "onnxruntime/cuda", "tensorrt/cuda", "torch/cpu",
                                              "torch/cuda")),
    Precision("fp16", 2, "fp16", False, _runs("onnxruntime/cuda", "tensorrt/cuda", "torch/cuda")),
    Precision("bf16", 2, "bf16", False, _runs("torch/cuda")),
    # ONNX Runtime's CPU kernels for Q/DQ MatMul and its dynamic MatMulInteger; TensorRT by explicit Q/DQ.
    Precision("int8", 1, "fp32", True, _runs("onnxruntime/cpu", "tensorrt/cuda")),
    # FP8 tensor cores arrived with Ada (8.9: L4, L40) and Hopper (9.0: H100, H200).
    Precision("fp8", 1, "fp32", True, _runs("tensorrt/cuda"), min_compute_capability=(8, 9)),
)}
# How an int8 graph is quantized (hwaware.quantize): Q/DQ nodes calibrated on images, or ONNX Runtime's
# dynamic MatMulInteger; a table and an export made for each other use the same mode.
QUANT_MODES = ("static", "dynamic")
# What `hwaware export --precision` writes: float ONNX graphs, quantized ones beside the float one, and bf16
# (which only torch serves) as timm weights in bf16.
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise HwawareError(f"precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def check_runs(name: str, backend: str, device_kind: str, device_name: str = "",
               capability: tuple[int, int] | None = None) -> Precision:
    """The precision `name`, or one line saying why `backend` on this device cannot run it."""
    precision = get_precision(name)
    if backend not in BACKENDS:
        raise HwawareError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if (backend, device_kind) not in precision.runs_on:
        raise HwawareError(f"precision: {name} does not run with {backend} on {DEVICE_KINDS[device_kind]}; "
                           f"{name} runs with {precision.where()}")
    needed = precision.min_compute_capability
    if device_kind == "cuda" and needed is not None:
        label = device_name or "this GPU"
        if capability is None:
            raise HwawareError(f"precision: {name} needs compute capability {needed[0]}.{needed[1]} or higher and "
                               f"the compute capability of {label} is unknown")
        if tuple(capability) < needed:
            raise HwawareError(f"precision: {name} needs compute capability {needed[0]}.{needed[1]} or higher "
                               f"(L4, H100, H200); {label} has {capability[0]}.{capability[1]}")
    return precision


def default_mode(precision: str, for_tensorrt: bool) -> str:
    """The one default for tables and exports alike: static Q/DQ where TensorRT must read the graph (it takes
    nothing else) and for fp8; dynamic int8 where ONNX Runtime on the CPU serves it: on digits it lost at
    most 0.37 test points where static lost up to 1.85, and on AutoFormer-T it ran as fast (0.434x against
    0.436x fp32)."""
    return "static" if for_tensorrt or precision != "int8" else "dynamic"


def check_mode(precision: str, mode: str | None, for_tensorrt: bool = False) -> str:
    """`mode` (None: `default_mode`) if it can quantize `precision`, else one line saying why not."""
    mode = mode or default_mode(precision, for_tensorrt)
    if not get_precision(precision).quantized:
        raise HwawareError(f"quantize: {precision} is not a quantized precision")
    if mode not in QUANT_MODES:
        raise HwawareError(f"quantize: mode {mode!r} is not one of {', '.join(QUANT_MODES)}")
    if mode == "dynamic" and precision != "int8":
        raise HwawareError(f"quantize: dynamic quantization is int8 only; {precision} needs static Q/DQ")
    if mode == "dynamic" and for_tensorrt:
        raise HwawareError("quantize: TensorRT takes explicit Q/DQ graphs only; use quantize mode static")
    return mode
