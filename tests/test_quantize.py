"""Quantized deployment: the precision registry, INT8/FP8 ONNX through onnxruntime.quantization, int8
latency pieces quantized like the shipped model, int8 export with its accuracy gate, TensorRT on a GPU."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hwaware.errors import HwawareError
from hwaware.export import export_model, preflight
from hwaware.latency import devices
from hwaware.latency.backends import get_backend
from hwaware.precision import PRECISIONS, check_mode, check_runs
from hwaware.quantize import check_accuracy_drop, quantize_onnx
from hwaware.space import BUILTIN_SPACES, Arch
from hwaware.supernet import SuperViT
from hwaware.tensorrt_build import PRECISIONS as TENSORRT_PRECISIONS
from hwaware.tensorrt_build import tensorrt_unavailable_reason
from hwaware.vit import Piece, build_piece, piece_input

SPACE = BUILTIN_SPACES["digits"]
ARCH = Arch(48, (4, 1, 2), (2.0, 4.0, 3.0))
TRT_MISSING = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SuperViT(SPACE).extract(ARCH).eval()


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits scaled to [0, 1], as the digits dataset feeds them, with labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images[:160] / 16.0, dtype=torch.float32).unsqueeze(1)
    return images, torch.tensor(data.target[:160])


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory, model):
    from hwaware.export import export_onnx

    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(model, SPACE, path)
    return path


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# ---- the registry ----------------------------------------------------------------------------------


def test_registry_is_the_one_list_and_refuses_in_one_line():
    assert devices.PRECISIONS is PRECISIONS and set(PRECISIONS) == {"fp32", "fp16", "bf16", "int8", "fp8"}
    assert TENSORRT_PRECISIONS == ("fp32", "fp16", "int8", "fp8")
    with pytest.raises(HwawareError, match="precision: fp8 does not run with onnxruntime on the CPU; fp8 runs with "
                                           r"tensorrt on a GPU \(compute capability 8.9\+\)"):
        check_runs("fp8", "onnxruntime", "cpu")
    with pytest.raises(HwawareError, match=r"fp8 needs compute capability 8.9 or higher \(L4, H100, H200\); "
                                           "cuda:0 Tesla V100-SXM2-16GB has 7.0"):
        check_runs("fp8", "tensorrt", "cuda", "cuda:0 Tesla V100-SXM2-16GB", (7, 0))
    assert check_runs("fp8", "tensorrt", "cuda", "H200", (9, 0)).quantized
    with pytest.raises(HwawareError, match="precision: int8 does not run with torch on the CPU"):
        get_backend("torch", precision="int8")
    with pytest.raises(HwawareError, match="precision: 'int4' is not one of fp32, fp16, bf16, int8, fp8"):
        check_runs("int4", "onnxruntime", "cpu")


# ---- quantizing ONNX files -------------------------------------------------------------------------


def test_static_int8_is_symmetric_qdq_on_the_matmuls_and_stays_close(tmp_path, float_onnx, digits):
    images, _ = digits
    out = tmp_path / "model.int8.onnx"
    how = quantize_onnx(float_onnx, out, "int8", "static", calibration=images[:64])
    assert how["calibration_count"] == 64 and how["mode"] == "static"
    graph = onnx.load(str(out)).graph
    counts = op_counts(out)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    zero_points = [i for i in graph.initializer if "zero_point" in i.name and i.data_type != onnx.TensorProto.INT32]
    assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)  # int32: biases
    assert all(not np.any(onnx.numpy_helper.to_array(z)) for z in zero_points)  # symmetric: what TensorRT takes
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert not any(n.op_type == "LayerNormalization" and n.input[0] in quantized_inputs for n in graph.node)
    reference, got = run(float_onnx, images[64:96]), run(out, images[64:96])
    cosine = (reference * got).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99 and (reference.argmax(1) == got.argmax(1)).mean() >= 0.9


def test_dynamic_int8_needs_no_calibration_and_fp8_is_e4m3_qdq(tmp_path, float_onnx, digits):
    images, _ = digits
    quantize_onnx(float_onnx, tmp_path / "d.onnx", "int8", "dynamic")
    assert op_counts(tmp_path / "d.onnx")["DynamicQuantizeLinear"] > 0
    quantize_onnx(float_onnx, tmp_path / "f8.onnx", "fp8", "static", calibration=images[:32])
    fp8 = onnx.load(str(tmp_path / "f8.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in fp8.graph.initializer)
    assert max(o.version for o in fp8.opset_import if o.domain in ("", "ai.onnx")) >= 19  # float8 Q/DQ
    with pytest.raises(HwawareError, match="dynamic quantization is int8 only"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "fp8", "dynamic")


def test_calibration_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path, float_onnx):
    with pytest.raises(HwawareError, match=r"calibration data: shape \[4, 3, 8, 8\] does not match the input of "
                                           r"model.onnx \[batch, 1, 8, 8\]"):
        quantize_onnx(float_onnx, tmp_path / "q.onnx", "int8", "static", calibration=torch.zeros(4, 3, 8, 8))
    with pytest.raises(HwawareError, match="static quantization needs calibration inputs"):
        quantize_onnx(float_onnx, tmp_path / "q.onnx", "int8", "static")
    nan_model = tmp_path.parent / "nan.onnx"
    onnx_model = onnx.load(str(float_onnx))
    weight = next(i for i in onnx_model.graph.initializer if i.name.endswith("qkv.weight") or "MatMul" in i.name)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full_like(onnx.numpy_helper.to_array(weight), np.nan), weight.name))
    onnx.save(onnx_model, str(nan_model))
    with pytest.raises(HwawareError, match="quantize: calibrating nan.onnx failed"):
        quantize_onnx(nan_model, tmp_path / "q.onnx", "int8", "static", calibration=torch.rand(2, 1, 8, 8))
    with pytest.raises(HwawareError, match="NaN or infinite"):
        quantize_onnx(float_onnx, tmp_path / "q.onnx", "int8", "static", calibration=torch.full((2, 1, 8, 8), np.nan))
    assert list(tmp_path.iterdir()) == []


# ---- latency pieces are quantized the way the whole model is -----------------------------------------


def test_int8_pieces_have_the_quantized_ops_of_the_whole_model(tmp_path, model):
    """The table sums pieces; each piece must carry the Q/DQ nodes it has inside the quantized whole model."""
    assert get_backend("onnxruntime", precision="int8", threads=1).quantize_mode == "dynamic"  # the CPU default
    backend = get_backend("onnxruntime", precision="int8", threads=1, quantize_mode="static")
    totals: collections.Counter = collections.Counter()
    pieces = [Piece("stem", 48), *(Piece("block", 48, h, r) for h, r in zip(ARCH.num_heads, ARCH.mlp_ratios)),
              Piece("head", 48)]
    for i, piece in enumerate(pieces):
        workdir = tmp_path / f"piece{i}"
        workdir.mkdir()
        runner = backend.prepare(build_piece(SPACE, piece), piece_input(SPACE, piece, 2), workdir)
        assert len(runner.time(2)) == 2
        totals += op_counts(workdir / "model.int8.onnx")
    (tmp_path / "whole").mkdir()
    backend.prepare(model, torch.rand(2, 1, 8, 8), tmp_path / "whole")
    whole = op_counts(tmp_path / "whole" / "model.int8.onnx")
    for op in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Conv"):
        assert totals[op] == whole[op] > 0, op
    assert backend.settings()["quantize_mode"] == "static"


# ---- export ---------------------------------------------------------------------------------------


def test_int8_export_ships_the_quantized_model_with_its_accuracy(tmp_path, model, digits):
    images, labels = digits
    batches = {"val": [(images[:80], labels[:80])], "test": [(images[80:], labels[80:])]}
    result = export_model(model, ARCH, SPACE, tmp_path / "e", formats="timm,onnx,triton", precision="int8",
                          batch_sizes=(1, 4), calibration_inputs=images[:64], sample_inputs=images[80:112],
                          accuracy_batches=batches, max_accuracy_drop=100.0, quantize_mode="static")
    q = result.card["quantized"]
    assert q["file"] == "model.int8.onnx" and q["mode"] == "static" and q["calibration_count"] == 64
    for split in ("val", "test"):
        r = q["accuracy"][split]
        assert r["n"] == 80 and 0 <= r["agreement"] <= 1
        assert r["drop_points"] == pytest.approx(100 * (r["float_top1"] - r["quantized_top1"]))
        float_pred = run(result.out_dir / "model.onnx", batches[split][0][0]).argmax(1)
        assert r["float_top1"] == pytest.approx((float_pred == batches[split][0][1].numpy()).mean())
    assert q["cpu_latency"]["float_ms"] > 0 and q["cpu_latency"]["quantized_ms"] > 0
    triton_file = result.out_dir / "triton" / "e" / "1" / "model.onnx"
    assert triton_file.read_bytes() == (result.out_dir / "model.int8.onnx").read_bytes()
    assert json.loads((result.out_dir / "card.json").read_text())["quantized"]["accuracy"] == q["accuracy"]
    # a user loads the shipped file with ONNX Runtime in a few lines
    session = ort.InferenceSession(str(result.out_dir / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": images[:3].numpy()})[0].shape == (3, SPACE.num_classes)


def test_a_quantized_model_that_loses_too_much_is_not_shipped(tmp_path, model, digits, monkeypatch):
    import hwaware.export as export_module

    images, labels = digits
    report = {"val": {"float_top1": 0.9, "quantized_top1": 0.88, "drop_points": 2.0, "agreement": 0.97, "n": 80}}
    monkeypatch.setattr(export_module, "compare_accuracy", lambda *args: report)
    with pytest.raises(HwawareError, match=r"int8 top-1 on val is 88.00 % against 90.00 % in float, a drop of "
                                           r"2.00 points, more than the allowed 0.5; nothing was exported"):
        export_model(model, ARCH, SPACE, tmp_path / "e", formats="onnx", precision="int8",
                     calibration_inputs=images[:16], accuracy_batches={"val": [(images, labels)]},
                     max_accuracy_drop=0.5)
    assert list(tmp_path.iterdir()) == []
    check_accuracy_drop(report, 2.0, "int8")  # exactly at the limit ships


def test_quantized_export_bad_input_is_one_line(tmp_path, model, digits):
    images, labels = digits
    with pytest.raises(HwawareError, match="static int8 needs calibration images"):
        export_model(model, ARCH, SPACE, tmp_path / "a", formats="onnx", precision="int8", quantize_mode="static")
    with pytest.raises(HwawareError, match="int8 is checked on real images; pass sample_inputs"):
        export_model(model, ARCH, SPACE, tmp_path / "a", formats="onnx", precision="int8")  # dynamic: the CPU default
    with pytest.raises(HwawareError, match=r"calibration data: expected shape \[N, 1, 8, 8\]"):
        export_model(model, ARCH, SPACE, tmp_path / "b", formats="onnx", precision="int8", quantize_mode="static",
                     calibration_inputs=torch.zeros(4, 3, 8, 8))
    with pytest.raises(HwawareError, match="a maximum accuracy drop needs labelled batches"):
        export_model(model, ARCH, SPACE, tmp_path / "c", formats="onnx", precision="int8",
                     calibration_inputs=images[:8], max_accuracy_drop=0.5)
    with pytest.raises(HwawareError, match="fp32 is not quantized"):
        export_model(model, ARCH, SPACE, tmp_path / "d", formats="onnx", max_accuracy_drop=0.5)
    with pytest.raises(HwawareError, match="fp32 is not quantized; a quantize mode needs int8 or fp8"):
        export_model(model, ARCH, SPACE, tmp_path / "d", formats="onnx", quantize_mode="dynamic")
    with pytest.raises(HwawareError, match="int8 ships as a quantized ONNX model .* add the onnx format"):
        preflight(tmp_path / "d", "timm", precision="int8")
    with pytest.raises(HwawareError, match="TensorRT takes explicit Q/DQ graphs only"):
        check_mode("int8", "dynamic", for_tensorrt=True)
    with pytest.raises(HwawareError, match="fp8 runs only with tensorrt on a GPU"):
        preflight(tmp_path / "e", "onnx", precision="fp8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not TRT_MISSING, reason="TensorRT and a GPU are present here")
def test_fp8_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(HwawareError, match="fp8 runs only there, so nothing was exported"):
        preflight(tmp_path / "e", "onnx,tensorrt", precision="fp8")


# ---- TensorRT (GPU) --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(bool(TRT_MISSING), reason=f"needs TensorRT and a CUDA GPU: {TRT_MISSING}")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_quantized_engine_from_qdq_onnx(tmp_path, model, digits, precision):
    from hwaware.tensorrt_build import build_plan, present_environment

    images, labels = digits
    capability = tuple(int(p) for p in present_environment()["compute_capability"].split("."))
    if precision == "fp8" and capability < (8, 9):
        with pytest.raises(HwawareError, match="fp8 needs compute capability 8.9 or higher"):
            preflight(tmp_path / "e", "onnx,tensorrt", precision="fp8")
        return
    result = export_model(model, ARCH, SPACE, tmp_path / "e", formats="tensorrt,triton", precision=precision,
                          batch_sizes=(1, 8), calibration_inputs=images[:64], sample_inputs=images[64:96],
                          accuracy_batches={"val": [(images, labels)]})
    card = result.card["tensorrt"]
    assert card["precision"] == precision and card["sample_top1_agreement"] >= 0.9
    with pytest.raises(HwawareError, match="needs an explicitly quantized"):
        build_plan(result.out_dir / "model.onnx", precision, (1,))
