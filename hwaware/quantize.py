"""INT8 and FP8 ONNX models through `onnxruntime.quantization`: the one quantizer for tables and export.

`quantize_onnx` is called by the latency backends on every piece and whole subnet they time
and by `hwaware export` on the shipped model, so a table prices the graph that ships. It
quantizes the raw exported graph (the transformers optimizer's fused graph fails the
quantizer's shape inference) and writes the result atomically.

Modes:
- `static` (the default with TensorRT, and for fp8): explicit QuantizeLinear/DequantizeLinear around MatMul, Gemm and Conv, weights
  int8 per output channel, activations int8 symmetric with scales calibrated (min/max) on real
  inputs. Symmetric int8 with zero points of 0 is what TensorRT's explicit quantization takes, so
  one file serves ONNX Runtime and TensorRT. Only the matmuls and the patch-embedding conv are
  quantized: quantizing every op (LayerNorm, Softmax, GELU too) made AutoFormer-T slower than fp32 on
  ONNX Runtime's CPU kernels (1.23x fp32 against 0.89x for matmuls only, 1 thread, batch 1, 20
  interleaved runs, when this was chosen).
- `dynamic` (the default for int8 on ONNX Runtime's CPU, see `hwaware.precision.default_mode`): int8 weights, activations quantized at run time (no calibration), after the
  quantizer's own pre-processing (shape inference, constant folding): without it ONNX Runtime
  does not fuse MatMulInteger and the model ran slower than fp32. CPU only (TensorRT needs Q/DQ).
FP8 is static E4M3 Q/DQ (ONNX opset 19), for TensorRT on compute capability 8.9+.

Calibration: for export, a class-stratified draw of real training images of the checkpoint's dataset
(`calibration_images`);
for a latency piece, its own example input - the Q/DQ placement decides the speed, the scale
values do not, and a block's input is tokens, not images.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwaware.errors import HwawareError
from hwaware.io import atomic_path
from hwaware.precision import check_mode

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
DEFAULT_CALIBRATION_COUNT = 256
MAX_CALIBRATION_IMAGES = 2048  # held as float32 while calibrating: 1.2 GB at 224 px
_CALIBRATION_BATCH = 16


def quantized_file_name(precision: str) -> str:
    """The quantized ONNX file written beside `model.onnx`: `model.int8.onnx`, `model.fp8.onnx`."""
    return f"model.{precision}.onnx"


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs advice and progress through the root logger; errors still raise."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_spec(onnx_path: str | Path) -> tuple[str, list[int | None]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    value = next(v for v in graph.input if v.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return value.name, dims


def _calibration_array(calibration: torch.Tensor | np.ndarray | None, dims: list[int | None],
                       onnx_path: str | Path) -> np.ndarray:
    if calibration is None:
        raise HwawareError("quantize: static quantization needs calibration inputs")
    array = calibration.detach().float().cpu().numpy() if isinstance(calibration, torch.Tensor) \
        else np.asarray(calibration, dtype=np.float32)
    expected = dims[1:]
    if array.ndim != len(dims) or list(array.shape[1:]) != expected or array.shape[0] < 1:
        raise HwawareError(f"calibration data: shape {list(array.shape)} does not match the input of {Path(onnx_path).name} "
                           f"[batch, {', '.join(map(str, expected))}]")
    if not np.isfinite(array).all():
        raise HwawareError("calibration data: contains NaN or infinite values")
    return array


def quantize_onnx(float_path: str | Path, out_path: str | Path, precision: str = "int8", mode: str | None = None,
                  calibration: torch.Tensor | np.ndarray | None = None) -> dict[str, Any]:
    """Quantize the fp32 ONNX file `float_path` into `out_path` (atomically); returns how, for a card or sidecar.

    `calibration`: inputs of the graph's input shape (images for a model, tokens for a block),
    needed by static mode; all of them are used.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    mode = check_mode(precision, mode)
    input_name, dims = _input_spec(float_path)
    how: dict[str, Any] = {"precision": precision, "mode": mode, "quantized_ops": list(QUANTIZED_OPS),
                           "tool": f"onnxruntime.quantization {_ort_version()}"}
    with _quiet_quantizer(), atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="hwaware-q-") as work:
        if mode == "dynamic":
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared))
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(QUANTIZED_OPS))
            how.update(weights="int8 per tensor", activations="uint8, quantized at run time")
            return how
        array = _calibration_array(calibration, dims, float_path)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(array[i: i + _CALIBRATION_BATCH] for i in range(0, len(array), _CALIBRATION_BATCH))

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {input_name: batch}

        if precision == "fp8":
            kind, method, extra = QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution, {}
            how.update(weights="fp8 e4m3", activations="fp8 e4m3, calibrated (distribution)")
        else:
            kind, method, extra = QuantType.QInt8, CalibrationMethod.MinMax, {"ActivationSymmetric": True}
            how.update(weights="int8 per channel, symmetric", activations="int8 symmetric, calibrated (min/max)")
        try:
            quantize_static(str(float_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=precision == "int8", weight_type=kind, activation_type=kind,
                            op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=method, extra_options=extra)
        except (AssertionError, ValueError) as exc:  # e.g. a model whose activations are NaN on the calibration data
            raise HwawareError(f"quantize: calibrating {Path(float_path).name} failed ({type(exc).__name__}: "
                               f"{str(exc)[:120]}); are the model's outputs finite on the calibration data?") from None
        how["calibration_count"] = int(len(array))
    return how


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def calibration_images(data: str, space, count: int = DEFAULT_CALIBRATION_COUNT, seed: int = 0,
                       workers: int | None = None) -> torch.Tensor:
    """`count` training images of dataset `data`, a seeded class-stratified draw (unaugmented): what export
    calibrates on. The first images of an image folder are one or two classes; every class's activations
    should set the scales. More than the split has, or than `MAX_CALIBRATION_IMAGES`, is refused."""
    from torch.utils.data import Subset

    from hwaware.data import build_dataset, dataloader, dataset_targets, stratified_sample
    from hwaware.evaluation import default_workers

    if not 1 <= count <= MAX_CALIBRATION_IMAGES:
        raise HwawareError(f"calibration: {count} images asked; calibrate on 1 to {MAX_CALIBRATION_IMAGES}")
    dataset = build_dataset(data, space, "train")
    if count > len(dataset):
        raise HwawareError(f"calibration: {count} images asked, but {data} has {len(dataset)} training images")
    chosen = stratified_sample(dataset_targets(dataset), count, seed)
    workers = default_workers(dataset) if workers is None else workers
    loader = dataloader(Subset(dataset, chosen.tolist()), batch_size=64, num_workers=workers)
    return torch.cat([images for images, _ in loader])


def onnx_session(path: str | Path, threads: int | None = 1):
    """An ONNX Runtime CPU session with a fixed thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _predictions(session, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    name = session.get_inputs()[0].name
    predicted = [session.run(None, {name: images.float().numpy()})[0].argmax(-1) for images, _ in batches]
    return np.concatenate(predicted), np.concatenate([labels.numpy() for _, labels in batches])


def compare_accuracy(float_path: str | Path, quantized_path: str | Path,
                     splits: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, dict[str, Any]]:
    """Per split: top-1 of the float and the quantized ONNX model, the drop in points, and how often they agree.

    ONNX Runtime uses all its threads here: this is a check on thousands of images, not a latency."""
    float_session, quantized_session = onnx_session(float_path, None), onnx_session(quantized_path, None)
    report = {}
    for split, batches in splits.items():
        float_pred, labels = _predictions(float_session, batches)
        quantized_pred, _ = _predictions(quantized_session, batches)
        float_top1, quantized_top1 = float((float_pred == labels).mean()), float((quantized_pred == labels).mean())
        report[split] = {"float_top1": float_top1, "quantized_top1": quantized_top1,
                         "drop_points": 100 * (float_top1 - quantized_top1),
                         "agreement": float((float_pred == quantized_pred).mean()), "n": int(len(labels))}
    return report


def check_accuracy_drop(report: dict[str, dict[str, Any]], max_drop_points: float | None, precision: str) -> None:
    """Refuse (one line, both numbers) a quantized model that loses more than `max_drop_points` on any split."""
    if max_drop_points is None:
        return
    for split, r in report.items():
        if r["drop_points"] > max_drop_points:
            raise HwawareError(
                f"quantize: {precision} top-1 on {split} is {100 * r['quantized_top1']:.2f} % against "
                f"{100 * r['float_top1']:.2f} % in float, a drop of {r['drop_points']:.2f} points, more than the "
                f"allowed {max_drop_points:g}; nothing was exported")
