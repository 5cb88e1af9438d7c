"""The TensorRT path as far as a machine without TensorRT can check it.

The builder, bench and export run here against a stand-in `tensorrt` module that records what hwaware
asks of it (its names are checked against the real bindings by test_tensorrt_conformance.py); the
precision audit reads the engine inspector's JSON in the format TensorRT documents.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors import safe_open

from hwaware import tensorrt_build
from hwaware.cli import main
from hwaware.errors import HwawareError
from hwaware.export import export_model, read_card
from hwaware.latency import backends, host
from hwaware.latency.devices import MeasureSettings
from hwaware.space import BUILTIN_SPACES, Arch
from hwaware.supernet import SuperViT
from hwaware.tensorrt_build import (
    audit_precision,
    build_plan,
    metadata_path,
    profile_shapes,
    trtexec_command,
)

SPACE = BUILTIN_SPACES["digits"]
ARCH = Arch(48, (4, 1, 2), (2.0, 4.0, 3.0))
H200 = {"index": 0, "gpu": "NVIDIA H200", "compute_capability": "9.0", "gpu_memory_mib": 143771,
        "driver": "580.00", "gpu_max_sm_mhz": 1980.0, "gpu_power_limit_w": 700.0}


def tensor(name: str, fmt: str, dims=(1, 17, 48)) -> dict:
    """One tensor of a layer as the engine inspector describes it with detailed profiling verbosity."""
    return {"Name": name, "Location": "Device", "Dimensions": list(dims), "Format/Datatype": fmt}


def layer(name: str, kind: str, fmt_in: str, fmt_out: str | None = None) -> dict:
    return {"Name": name, "LayerType": kind, "Inputs": [tensor(f"{name}_in", fmt_in)],
            "Outputs": [tensor(f"{name}_out", fmt_out or fmt_in)], "TacticValue": "0x0", "StreamId": 0}


FP32, FP16, INT8 = "Row major linear FP32", "Row major linear FP16 format", "Row major linear Int8 format"


def engine_information(*layers: dict) -> str:
    return json.dumps({"Layers": list(layers), "Bindings": ["input", "logits"]})


ALL_FP32 = engine_information(layer("Reformatting CopyNode for Input Tensor 0", "Reformat", FP32, FP16),
                              layer("blocks.0.attn.qkv", "CaskGemmMatrixMultiply", FP32),
                              layer("blocks.0.mlp.fc1 + gelu", "CaskGemmMatrixMultiply", FP32))
MIXED = engine_information(layer("patch_embed", "CaskConvolution", FP16),
                           layer("blocks.0.attn.qkv", "CaskGemmMatrixMultiply", FP16),
                           layer("blocks.0.norm1", "Myelin", FP32), layer("reshape", "Shuffle", FP32),
                           layer("head", "CaskGemmMatrixMultiply", FP16))


# ---- the precision audit ------------------------------------------------------------------------------


def test_an_fp16_engine_that_computes_in_fp32_is_refused():
    with pytest.raises(HwawareError, match=r"the engine built for fp16 computes no layer in fp16 \(2 compute "
                                           r"layers: fp32 100%\); TensorRT fell back to fp32"):
        audit_precision(ALL_FP32, "fp16")
    assert audit_precision(ALL_FP32, "fp32") == {"layers": 2, "shares": {"fp32": 1.0}}


def test_mixed_precision_is_recorded_as_shares_of_compute_layers():
    assert audit_precision(MIXED, "fp16") == {"layers": 4, "shares": {"fp16": 0.75, "fp32": 0.25}}
    int8 = engine_information(layer("qkv", "CaskGemmMatrixMultiply", INT8, FP16), layer("norm", "Myelin", FP16))
    assert audit_precision(int8, "int8") == {"layers": 2, "shares": {"int8": 0.5, "fp16": 0.5}}
    with pytest.raises(HwawareError, match="built for int8 computes no layer in int8"):
        audit_precision(MIXED, "int8")


def test_the_audit_reads_the_tensorrt_11_io_tensor_fields_and_refuses_names_only():
    io_tensors = {"Layers": [{"Name": "gemm", "LayerType": "CaskGemmMatrixMultiply",
                              "Inputs": [{"Name": "x", "DataType": "Half", "Format": "Row major linear FP16 format"}],
                              "Outputs": [{"Name": "y", "DataType": "Half"}]}],
                  "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Half"}]}
    assert audit_precision(json.dumps(io_tensors), "fp16")["shares"] == {"fp16": 1.0}
    names_only = json.dumps({"Layers": ["Reformatting CopyNode for Input Tensor 0", "gemm"], "Bindings": []})
    with pytest.raises(HwawareError, match="layer names only"):
        audit_precision(names_only, "fp16")
    with pytest.raises(HwawareError, match="not JSON"):
        audit_precision("{", "fp16")


# ---- one optimisation-profile rule and the trtexec command --------------------------------------------


def test_the_profile_rule_puts_opt_at_the_tables_batch():
    assert profile_shapes((1, 8, 32)) == (1, 8, 32)  # no table: the median batch
    assert profile_shapes((1, 8, 32), opt=1) == (1, 1, 32)  # a batch-1 table prices a plan tuned for batch 1
    assert profile_shapes((1, 64), opt=128) == (1, 128, 128)
    with pytest.raises(HwawareError, match="positive sizes"):
        profile_shapes((0, 4))


METADATA = {"tensorrt_version": "10.4.0", "precision": "fp16", "strongly_typed": False, "input": "input",
            "input_shape": [-1, 1, 8, 8], "batch_min": 1, "batch_opt": 8, "batch_max": 32, "workspace_bytes": 4 << 30}


def test_trtexec_builds_and_times_the_same_engine_for_each_release():
    settings = MeasureSettings(min_repeats=100, min_time_s=1.0, cuda_graph=True)
    weak = trtexec_command(METADATA, "model.onnx", "model.plan", "timing.cache", settings, cuda_graph=True)
    assert weak == ("trtexec --onnx=model.onnx --saveEngine=model.plan --minShapes=input:1x1x8x8 "
                    "--optShapes=input:8x1x8x8 --maxShapes=input:32x1x8x8 --shapes=input:8x1x8x8 --fp16 "
                    "--memPoolSize=workspace:4096 --timingCacheFile=timing.cache --profilingVerbosity=detailed "
                    "--iterations=100 --duration=1 --warmUp=200 --noDataTransfers --useCudaGraph")
    int8 = trtexec_command({**METADATA, "precision": "int8"}, "model.int8.onnx", "model.plan", None, batch=1)
    assert "--int8 --fp16" in int8 and "--shapes=input:1x1x8x8" in int8 and "timingCacheFile" not in int8
    strong10 = trtexec_command({**METADATA, "strongly_typed": True}, "model.onnx", "model.plan", None)
    assert "--stronglyTyped" in strong10 and "--fp16" not in strong10
    # TensorRT 11 removed every precision flag and --stronglyTyped is always on
    strong11 = trtexec_command({**METADATA, "tensorrt_version": "11.4.0.106", "strongly_typed": True},
                               "model.onnx", "model.plan", None)
    assert "--stronglyTyped" not in strong11 and "--fp16" not in strong11


def test_bench_names_a_profile_other_than_the_tables():
    from hwaware.tensorrt_build import profile_differences

    plan = {"batch_min": 1, "batch_opt": 8, "batch_max": 32}
    assert profile_differences(plan, {"min": 1, "opt": 8, "max": 32}, 8) == []
    assert profile_differences(plan, {"min": 1, "opt": 1, "max": 32}, 1) == [
        "served at batch 1, the plan is tuned for batch 8 (its opt shape)",
        "the table's pieces were built with optimisation profile 1/1/32 (min/opt/max batch), the plan with "
        "1/8/32 (min/opt/max batch)"]


# ---- GPU facts ----------------------------------------------------------------------------------------


def test_gpu_facts_are_read_once_per_process(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return types.SimpleNamespace(returncode=0, stdout="0, NVIDIA H200, 9.0, 143771, 580.00, 1980, 700.00\n")

    monkeypatch.setattr(host, "_GPUS", None)
    monkeypatch.setattr(host.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(host.subprocess, "run", fake_run)
    first = host.gpus()
    first[0]["gpu"] = "changed by a caller"
    assert [host.gpus()[0]["gpu"] for _ in range(3)] == ["NVIDIA H200"] * 3
    assert len(calls) == 1


# ---- a stand-in tensorrt module -----------------------------------------------------------------------


def fake_tensorrt(version: str, information: str, calls: list) -> types.ModuleType:
    """Just what hwaware calls, recording it; the engine inspector answers `information`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    weak = int(version.split(".")[0]) < 11
    trt.float32, trt.float16 = "float32", "float16"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="json")
    trt.LayerType = types.SimpleNamespace(QUANTIZE="q", DEQUANTIZE="dq")
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16", "INT8": "INT8", "FP8": "FP8"} if weak else {}),
                                            TF32="TF32")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    network_input = types.SimpleNamespace(name="input", shape=(-1, 1, 8, 8), dtype="float16")
    network = types.SimpleNamespace(get_input=lambda i: network_input, num_layers=0, get_layer=None)

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            return bytes(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing cache")

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, low, opt, high)

    class Builder:
        def __init__(self, logger):
            calls.append(("builder",))

        def create_network(self, flags):
            calls.append(("network flags", flags))
            return network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("verbosity", config.profiling_verbosity))
            return b"serialized engine"

    inspector = types.SimpleNamespace(get_engine_information=lambda fmt: information)
    engine = types.SimpleNamespace(create_engine_inspector=lambda: inspector)
    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    return trt


@pytest.fixture()
def h200(monkeypatch):
    monkeypatch.setattr(host, "_GPUS", [H200])


@pytest.mark.parametrize("version", ["10.13.0.35", "11.4.0.106"])
def test_build_plan_sets_typing_profile_verbosity_and_audits(tmp_path, monkeypatch, h200, version):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, MIXED, calls))
    cache = tmp_path / "timing.cache"
    plan, metadata = build_plan(tmp_path / "model.onnx", "fp16", (1, 8, 32), cache, opt_batch=1)
    assert plan == b"serialized engine" and cache.read_bytes() == b"timing cache"
    assert ("profile", ("input", (1, 1, 8, 8), (1, 1, 8, 8), (32, 1, 8, 8))) in calls
    assert ("verbosity", "detailed") in calls and ("workspace", 4 << 30) in calls
    weak = version.startswith("10")
    assert (("flag", "FP16") in calls) is weak
    assert ("network flags", 0 if weak else 1 << 5) in calls
    assert metadata["layer_precisions"] == {"layers": 4, "shares": {"fp16": 0.75, "fp32": 0.25}}
    assert (metadata["batch_min"], metadata["batch_opt"], metadata["batch_max"]) == (1, 1, 32)
    assert metadata["strongly_typed"] is not weak and metadata["tensorrt_version"] == version


def test_export_of_an_fp16_engine_that_fell_back_to_fp32_writes_nothing(tmp_path, monkeypatch, h200):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35", ALL_FP32, []))
    torch.manual_seed(0)
    model = SuperViT(SPACE).extract(ARCH).eval()
    with pytest.raises(HwawareError, match="built for fp16 computes no layer in fp16"):
        export_model(model, ARCH, SPACE, tmp_path / "m", formats="tensorrt", precision="fp16", batch_sizes=(1, 8))
    assert list(tmp_path.iterdir()) == []


# ---- bench times the plan that ships ------------------------------------------------------------------


@pytest.fixture()
def shipped(tmp_path, monkeypatch, h200):
    """A timm export with a model.plan (and its build metadata) beside it, as `hwaware export` leaves them."""
    torch.manual_seed(0)
    out = tmp_path / "export"
    export_model(SuperViT(SPACE).extract(ARCH).eval(), ARCH, SPACE, out, formats="timm", batch_sizes=(1, 8))
    (out / "model.plan").write_bytes(b"serialized engine")
    built = {**METADATA, "gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35",
             "batch_opt": 1}
    metadata_path(out / "model.plan").write_text(json.dumps(built))
    return out, built


class Builder:
    def __init__(self, logger):
        raise AssertionError("bench called the TensorRT builder")


def test_bench_loads_the_plan_and_never_calls_the_builder(shipped, monkeypatch):
    out, _ = shipped
    trt = fake_tensorrt("10.13.0.35", MIXED, [])
    trt.Builder = Builder
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    timed = []

    def runner(self, engine, example):  # the seam where a CUDA runner would start: record what it was given
        timed.append((engine, tuple(example.shape)))
        return types.SimpleNamespace(time=lambda repeats: [0.5] * repeats)

    monkeypatch.setattr(backends.TensorRTBackend, "runner", runner)
    from hwaware.pipeline import bench_export

    result = bench_export(out, "h200", backend="tensorrt", batch_size=8, tables_root=out / "no-tables")
    assert result["measured_ms"] == 0.5 and result["backend"] == "tensorrt" and result["precision"] == "fp16"
    assert timed[0][1] == (8, 1, 8, 8) and hasattr(timed[0][0], "create_engine_inspector")
    assert result["notes"] == ["served at batch 8, the plan is tuned for batch 1 (its opt shape)"]
    assert "h200-tensorrt-fp16-b8" in read_card(out)["bench"]


@pytest.mark.parametrize("change, message", [
    (None, "no build metadata model.plan.json beside it"),
    ({"tensorrt_version": "10.4.0"}, "built with TensorRT 10.4.0, this machine has 10.13.0.35"),
    ({"compute_capability": "8.0"}, "built with compute capability 8.0, this machine has 9.0"),
    ({"precision": "fp32"}, "built for fp32, not fp16"),
    ({"batch_max": 4}, "serves batch 1 to 4, not 8"),
])
def test_bench_refuses_a_plan_that_cannot_serve_here_in_one_line(shipped, monkeypatch, capsys, change, message):
    out, built = shipped
    trt = fake_tensorrt("10.13.0.35", MIXED, [])
    trt.Builder = Builder
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if change is None:
        metadata_path(out / "model.plan").unlink()
    else:
        metadata_path(out / "model.plan").write_text(json.dumps({**built, **change}))
    card = (out / "card.json").read_text()
    code = main(["bench", str(out), "--device", "h200", "--backend", "tensorrt", "--batch", "8",
                 "--tables", str(out / "no-tables")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert (out / "card.json").read_text() == card  # nothing written


# ---- bf16 ---------------------------------------------------------------------------------------------


def test_bf16_exports_bf16_weights_and_is_refused_where_onnx_cannot_carry_it(tmp_path):
    torch.manual_seed(0)
    model = SuperViT(SPACE).extract(ARCH).eval()
    result = export_model(model, ARCH, SPACE, tmp_path / "bf16", formats="timm", precision="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert result.card["precision"] == "bf16"
    with pytest.raises(HwawareError, match=r"precision: bf16 runs only with torch on a GPU; it exports as timm "
                                           r"weights in bf16 \(format timm\), not as onnx"):
        export_model(model, ARCH, SPACE, tmp_path / "onnx", formats="timm,onnx", precision="bf16")
    assert not (tmp_path / "onnx").exists()


# ---- tables built the way the plan is -----------------------------------------------------------------


def test_a_tensorrt_table_builds_its_pieces_with_the_plans_profile_and_keeps_its_timing_cache(tmp_path, monkeypatch,
                                                                                           h200):
    from hwaware.latency import load_device_profile
    from hwaware.latency import profile as profiling
    from hwaware.latency.profile import Profiler
    from hwaware.onnx_writer import write_onnx

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35", MIXED, calls))
    monkeypatch.setattr(backends.TensorRTBackend, "runner", lambda self, engine, example: engine)
    monkeypatch.setattr(tensorrt_build, "_use_gpu", lambda index: calls.append(("gpu", index)))
    backend = backends.get_backend("tensorrt", device="cuda:0", precision="fp16")
    profiler = Profiler(load_device_profile("h200"), SPACE, backend, 1, MeasureSettings(), tmp_path)
    settings = backend.settings()
    assert settings["optimization_profile"] == {"min": 1, "opt": 1, "max": 32} and settings["cuda_graph"] is False
    assert backend.timing_cache == profiler.csv_path.with_suffix(".timing.cache")
    onnx_path = tmp_path / "piece.onnx"
    write_onnx(torch.nn.Linear(4, 4).half(), torch.randn(1, 4, dtype=torch.float16), onnx_path)
    backend.prepare_onnx(onnx_path, torch.randn(1, 4))
    assert ("profile", ("input", (1, 1, 8, 8), (1, 1, 8, 8), (32, 1, 8, 8))) in calls  # = export at a batch-1 table
    assert ("gpu", 0) in calls
    assert backend.timing_cache.read_bytes() == b"timing cache"
    profiler._prepare(profiler.anchors["pieces"])  # a piece through the table's own path: its audit is kept
    assert profiler.audits == {profiler.anchors["pieces"].key: {"layers": 4, "shares": {"fp16": 0.75, "fp32": 0.25}}}
    assert profiling._layer_shares({**profiler.audits, "other": {"layers": 4, "shares": {"fp32": 1.0}}}) == \
        {"engines": 2, "layers": 8, "shares": {"fp32": 0.625, "fp16": 0.375}}


@pytest.mark.slow
def test_a_tensorrt_table_records_its_profile_and_its_engines_precision_shares(tmp_path, monkeypatch, h200):
    from hwaware.latency import LatencyTable, profile_device

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35", MIXED, []))
    monkeypatch.setattr(tensorrt_build, "_use_gpu", lambda index: None)
    monkeypatch.setattr(backends.TensorRTBackend, "runner",
                        lambda self, engine, example: types.SimpleNamespace(time=lambda n: [0.5] * n))
    settings = MeasureSettings(warmup=0, min_repeats=1, min_time_s=0.0, max_repeats=1, fit_subnets=3,
                               holdout_subnets=0, max_remeasure=0)
    path = profile_device("h200", "digits", batch=1, out=tmp_path, settings=settings, progress=False)
    meta = LatencyTable.load(path).meta
    assert meta["backend_settings"]["optimization_profile"] == {"min": 1, "opt": 1, "max": 32}
    assert meta["backend_settings"]["timing_cache"] == path.with_suffix(".timing.cache").name
    assert path.with_suffix(".timing.cache").is_file()
    shares = meta["layer_precisions"]
    assert shares["shares"] == {"fp16": 0.75, "fp32": 0.25} and shares["layers"] == 4 * shares["engines"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name,
                                                                 path.with_suffix(".timing.cache").name])


def test_cuda_graph_timing_is_a_recorded_setting_refused_where_it_cannot_run(tmp_path, capsys):
    assert MeasureSettings.from_dict({"cuda_graph": True}).to_dict()["cuda_graph"] is True
    with pytest.raises(HwawareError, match="cuda_graph must be true or false"):
        MeasureSettings.from_dict({"cuda_graph": "yes"})
    with pytest.raises(HwawareError, match="timing with CUDA graphs is not available on the CPU"):
        backends.get_backend("torch", device="cpu", cuda_graph=True)
    code = main(["profile", "--device", "cpu", "--space", "digits", "--cuda-graph", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "CUDA graphs is not available on the CPU" in err
    assert list(tmp_path.iterdir()) == []


# ---- on a GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU torch can use")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_times_a_captured_cuda_graph_of_the_same_forward(precision):
    from hwaware.latency import measure_latency
    from hwaware.vit import Piece, build_piece, piece_input

    piece = Piece("block", 48, 4, 2.0)
    module, example = build_piece(SPACE, piece), piece_input(SPACE, piece, 1)
    settings = MeasureSettings(warmup=5, min_repeats=50, min_time_s=0.0)
    eager = measure_latency(module, example, backend="torch", device="cuda", precision=precision, settings=settings)
    graph_backend = backends.get_backend("torch", device="cuda", precision=precision, cuda_graph=True)
    runner = graph_backend.prepare(module, example)
    assert runner.graph is not None and graph_backend.settings()["cuda_graph"] is True
    replayed = measure_latency(module, example, backend=graph_backend, settings=settings)
    assert 0 < replayed["median_ms"] and 0 < eager["median_ms"]
    print(f"{precision} block at batch 1: eager {eager['median_ms']:.4f} ms, CUDA graph {replayed['median_ms']:.4f} ms")


@pytest.mark.gpu
@pytest.mark.skipif(bool(tensorrt_build.tensorrt_unavailable_reason()),
                    reason=f"needs TensorRT and a GPU: {tensorrt_build.tensorrt_unavailable_reason()}")
def test_the_tensorrt_runner_replays_a_captured_execute_async_v3(tmp_path):
    from hwaware.onnx_writer import write_onnx

    onnx_path = tmp_path / "linear.onnx"
    linear = torch.nn.Linear(16, 16).half()
    write_onnx(linear, torch.randn(2, 16, dtype=torch.float16), onnx_path)
    plan, metadata = build_plan(onnx_path, "fp16", (1, 8), opt_batch=8)
    engine = sys.modules["tensorrt"].Runtime(sys.modules["tensorrt"].Logger(2)).deserialize_cuda_engine(plan)
    x = torch.randn(8, 16)
    eager = backends.TensorRTRunner(engine, x.cuda()).outputs()
    replayed = backends.TensorRTRunner(engine, x.cuda(), cuda_graph=True)
    assert replayed.graph is not None and min(replayed.time(20)) > 0
    torch.testing.assert_close(replayed.outputs(), eager)
    assert metadata["layer_precisions"]["shares"].get("fp16", 0) > 0
