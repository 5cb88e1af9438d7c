"""Export: timm round trip, the README's timm-only and ONNX Runtime recipes, ONNX checks, Triton configs,
the card, the atomic output folder, bad input, and TensorRT metadata checks (engines themselves on a GPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import hwaware
from hwaware.costs import arch_cost
from hwaware.errors import HwawareError
from hwaware.export import (
    FORMATS,
    export_model,
    onnx_io,
    parse_batch_sizes,
    parse_formats,
    preflight,
    read_card,
    update_card,
)
from hwaware.space import BUILTIN_SPACES, Arch
from hwaware.supernet import SuperViT
from hwaware.tensorrt_build import (
    engine_mismatches,
    load_engine,
    metadata_path,
    profile_shapes,
    tensorrt_unavailable_reason,
)

SPACE = BUILTIN_SPACES["digits"]
ARCH = Arch(48, (4, 1, 2), (2.0, 4.0, 3.0))  # per-layer heads and MLP ratios differ on purpose
BATCH_SIZES = (1, 4, 16)
README = Path(__file__).resolve().parents[1] / "export" / "README.md"
TRT_MISSING = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return SuperViT(SPACE).extract(ARCH).eval()


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Real inputs: scikit-learn's bundled 8x8 digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:24] / 16.0
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, digits):
    out = tmp_path_factory.mktemp("exports") / "digits-vit"
    return export_model(model, ARCH, SPACE, out, batch_sizes=BATCH_SIZES, sample_inputs=digits,
                        card_extra={"val_top1": 0.5, "predicted_latency_ms": 0.25})


@pytest.fixture(scope="module")
def exported_fp16(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("exports") / "digits-fp16"
    return export_model(model, ARCH, SPACE, out, formats="onnx,triton", precision="fp16", batch_sizes=(1, 8))


# ---- timm ----------------------------------------------------------------------------------


def test_load_model_rebuilds_the_exact_source_model(exported, model):
    loaded = hwaware.load_model(exported.out_dir)
    assert type(loaded) is VisionTransformer
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    chosen = [b for b in blocks if marker in b]
    assert len(chosen) == 1, f"export/README.md needs exactly one python block containing {marker!r}"
    return chosen[0]


def _run_readme_block(marker: str, out_dir: Path) -> dict:
    code = _readme_block(marker)
    assert 'export_dir = "export/digits-vit"' in code, "the README block must start from export_dir"
    namespace: dict = {}
    exec(compile(code.replace('"export/digits-vit"', repr(str(out_dir))), str(README), "exec"), namespace)
    return namespace


def test_readme_loads_the_model_with_timm_alone(exported, model):
    code = _readme_block("VisionTransformer(")
    assert "hwaware" not in code, "the timm-only recipe must not use hwaware"
    namespace = _run_readme_block("VisionTransformer(", exported.out_dir)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(namespace["model"](x), model(x))


def test_readme_runs_the_onnx_file_with_onnxruntime(exported, model):
    namespace = _run_readme_block('/model.onnx"', exported.out_dir)
    with torch.no_grad():
        want = model(torch.from_numpy(namespace["images"])).numpy()
    np.testing.assert_allclose(namespace["logits"], want, atol=1e-4)


def test_readme_runs_the_int8_model_with_onnxruntime(tmp_path, model, digits):
    out = tmp_path / "int8"
    export_model(model, ARCH, SPACE, out, formats="onnx", precision="int8", quantize_mode="dynamic",
                 sample_inputs=digits)
    namespace = _run_readme_block("model.int8.onnx", out)
    with torch.no_grad():
        want = model(torch.from_numpy(namespace["images"])).numpy()
    assert namespace["logits"].dtype == np.float32 and namespace["logits"].shape == want.shape
    cosine = (namespace["logits"] * want).sum() / np.linalg.norm(namespace["logits"]) / np.linalg.norm(want)
    assert cosine > 0.99


# ---- ONNX ----------------------------------------------------------------------------------


def test_onnx_file_is_valid_named_and_batch_dynamic(exported, model):
    path = exported.out_dir / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    io = onnx_io(path)
    assert io["input"] == {"name": "input", "shape": [None, 1, 8, 8], "elem_type": "FLOAT"}
    assert io["output"] == {"name": "logits", "shape": [None, 10], "elem_type": "FLOAT"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 16):  # 3 is none of the export's batch sizes
        x = torch.randn(batch, 1, 8, 8)
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_card_records_the_checks_costs_and_extra_fields(exported):
    card = read_card(exported.out_dir)
    assert card == exported.card
    assert Arch.from_dict(card["arch"]) == ARCH
    cost = arch_cost(ARCH, SPACE)
    assert (card["params"], card["flops"]) == (cost.params, cost.flops)
    assert 0 <= card["onnx"]["max_abs_diff_random"] < 1e-4
    assert 0 <= card["onnx"]["max_abs_diff_sample"] < 1e-4
    assert card["onnx"]["sample_top1_agreement"] == 1.0 and card["onnx"]["sample_count"] == 24
    assert card["val_top1"] == 0.5 and card["predicted_latency_ms"] == 0.25
    assert card["batch_sizes"] == list(BATCH_SIZES)
    if TRT_MISSING:
        assert card["formats"] == ["timm", "onnx", "triton"] and card["tensorrt"] is None
        assert len(exported.warnings) == 1 and exported.warnings[0].startswith("tensorrt: skipped")
        assert card["warnings"] == exported.warnings
        assert not (exported.out_dir / "model.plan").exists()


def test_fp16_onnx_has_half_inputs_and_stays_close(exported_fp16, model):
    io = onnx_io(exported_fp16.out_dir / "model.onnx")
    assert io["input"]["elem_type"] == io["output"]["elem_type"] == "FLOAT16"
    assert exported_fp16.card["onnx"]["max_abs_diff_random"] < 2e-2
    assert exported_fp16.formats == ("onnx", "triton")
    assert not (exported_fp16.out_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_model(tmp_path, model):
    from hwaware.export import export_onnx

    path = tmp_path / "dynamo.onnx"
    export_onnx(model, SPACE, path, dynamo=True)
    assert onnx_io(path)["input"] == {"name": "input", "shape": [None, 1, 8, 8], "elem_type": "FLOAT"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["logits"], {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4)


# ---- Triton --------------------------------------------------------------------------------

# The part of Triton's ModelConfig schema (model_config.proto) that export writes, by message.
TRITON_FIELDS = {
    "config": {"name", "platform", "max_batch_size", "input", "output", "dynamic_batching", "instance_group"},
    "input": {"name", "data_type", "dims"},
    "output": {"name", "data_type", "dims"},
    "dynamic_batching": {"preferred_batch_size", "max_queue_delay_microseconds"},
    "instance_group": {"kind", "count"},
}
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16"}


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format, the subset Triton configs use: every field maps to a list of its values."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', re.sub(r"#.*", "", text))
    position = 0

    def scalar(token: str):
        if token.startswith('"'):
            return json.loads(token)
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", token):
            return float(token)
        return token  # enum value or true/false

    def value():
        nonlocal position
        token = tokens[position]
        position += 1
        return message("}") if token == "{" else scalar(token)

    def message(end: str | None) -> dict:
        nonlocal position
        fields: dict = {}
        while position < len(tokens) and tokens[position] != end:
            name = tokens[position]
            assert re.fullmatch(r"[A-Za-z_]\w*", name), f"bad field name {name!r}"
            position += 1
            if tokens[position] == ":":
                position += 1
            if tokens[position] == "[":
                position += 1
                while tokens[position] != "]":
                    fields.setdefault(name, []).append(value())
                    if tokens[position] == ",":
                        position += 1
                position += 1
            else:
                fields.setdefault(name, []).append(value())
        position += 1
        return fields

    return message(None)


def check_schema(kind: str, fields: dict) -> None:
    unknown = set(fields) - TRITON_FIELDS[kind]
    assert not unknown, f"{kind}: fields not in Triton's ModelConfig: {unknown}"
    for name, values in fields.items():
        if name in TRITON_FIELDS:
            for nested in values:
                check_schema(name, nested)


def test_pbtxt_parser_reads_nesting_lists_and_scalars():
    parsed = parse_pbtxt('name: "m" # comment\nmax_batch_size: 8\ninput [ { name: "x" dims: [ 1, 2 ] } ]\n'
                         "dynamic_batching { preferred_batch_size: [ 4, 8 ] }")
    assert parsed == {"name": ["m"], "max_batch_size": [8], "input": [{"name": ["x"], "dims": [1, 2]}],
                      "dynamic_batching": [{"preferred_batch_size": [4, 8]}]}


@pytest.mark.parametrize("which", ["exported", "exported_fp16"])
def test_triton_config_matches_the_model(which, request):
    result = request.getfixturevalue(which)
    repository = result.out_dir / "triton"
    name = result.out_dir.name
    expected_models = [name] + ([f"{name}_trt"] if "tensorrt" in result.formats else [])
    assert sorted(p.name for p in repository.iterdir()) == sorted(expected_models)
    assert result.card["triton"]["models"] == expected_models
    batch_sizes = result.card["batch_sizes"]
    for model_name in expected_models:
        folder = repository / model_name
        artifact = folder / "1" / ("model.plan" if model_name.endswith("_trt") else "model.onnx")
        source = result.out_dir / artifact.name
        assert artifact.read_bytes() == source.read_bytes()
        config = parse_pbtxt((folder / "config.pbtxt").read_text())
        check_schema("config", config)
        assert config["name"] == [model_name]
        assert config["platform"] == ["tensorrt_plan" if artifact.suffix == ".plan" else "onnxruntime_onnx"]
        assert config["max_batch_size"] == [max(batch_sizes)]
        io = onnx_io(result.out_dir / "model.onnx")
        for kind in ("input", "output"):
            (tensor,) = config[kind]
            assert tensor["name"] == [io[kind]["name"]]
            assert tensor["dims"] == io[kind]["shape"][1:]  # without the batch dim
            assert tensor["data_type"] == [TRITON_TYPES[io[kind]["elem_type"]]]
        assert config["input"][0]["dims"] == [SPACE.in_chans, SPACE.img_size, SPACE.img_size]
        assert config["output"][0]["dims"] == [SPACE.num_classes]
        (batching,) = config["dynamic_batching"]
        assert batching["preferred_batch_size"] == [b for b in batch_sizes if b > 1]


# ---- the output folder and bad input ---------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_existing_folder_is_refused_unless_forced(tmp_path, model):
    out = tmp_path / "m"
    export_model(model, ARCH, SPACE, out, formats="timm", card_extra={"run": 1})
    with pytest.raises(HwawareError, match="already exists; pass --force"):
        export_model(model, ARCH, SPACE, out, formats="timm", card_extra={"run": 2})
    assert read_card(out)["run"] == 1
    export_model(model, ARCH, SPACE, out, formats="timm", force=True, card_extra={"run": 3})
    assert read_card(out)["run"] == 3
    assert _leftovers(tmp_path) == []


def test_force_never_replaces_a_folder_that_is_not_an_export(tmp_path, model):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(HwawareError, match="not an hwaware export folder"):
        export_model(model, ARCH, SPACE, tmp_path / "notes", formats="timm", force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_force_never_deletes_what_a_user_kept_in_an_export_folder(tmp_path, model):
    out = tmp_path / "m"
    export_model(model, ARCH, SPACE, out, formats="timm,onnx")
    (out / "NOTES.txt").write_text("mine")
    (out / "client_code").mkdir()
    with pytest.raises(HwawareError, match="also holds 'NOTES.txt', which export did not write"):
        export_model(model, ARCH, SPACE, out, formats="timm", force=True)
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "client_code").is_dir()


def test_an_export_is_readable_under_the_users_umask(tmp_path, model):
    import os
    import stat

    old = os.umask(0o022)
    try:
        export_model(model, ARCH, SPACE, tmp_path / "m", formats="timm,onnx,triton")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "card.json").stat().st_mode) == 0o644


def test_failure_midway_leaves_no_folder(tmp_path, model, monkeypatch):
    import hwaware.export as export_module

    def broken(*args, **kwargs):
        raise HwawareError("onnx: simulated failure")

    monkeypatch.setattr(export_module, "export_onnx", broken)
    with pytest.raises(HwawareError, match="simulated"):
        export_model(model, ARCH, SPACE, tmp_path / "m", formats="timm,onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_one_clear_error(tmp_path, model):
    with pytest.raises(HwawareError, match="unknown format 'pytorch'; valid formats: timm, onnx, tensorrt, triton"):
        export_model(model, ARCH, SPACE, tmp_path / "a", formats="timm,pytorch")
    with pytest.raises(HwawareError, match="embed_dim 96 is outside"):
        export_model(model, Arch(96, (1,), (2.0,)), SPACE, tmp_path / "b")
    with pytest.raises(HwawareError, match="model: does not match arch"):
        export_model(model, Arch(48, (4, 1), (2.0, 4.0)), SPACE, tmp_path / "c")
    with pytest.raises(HwawareError, match="precision: 'int4' is not one of fp32, fp16, bf16, int8, fp8 for export"):
        export_model(model, ARCH, SPACE, tmp_path / "d", precision="int4")
    with pytest.raises(HwawareError, match=r"sample inputs: expected shape \[N, 1, 8, 8\]"):
        export_model(model, ARCH, SPACE, tmp_path / "e", sample_inputs=torch.zeros(2, 3, 8, 8))
    with pytest.raises(HwawareError, match="'params' is computed by export"):
        export_model(model, ARCH, SPACE, tmp_path / "f", card_extra={"params": 1})
    assert list(tmp_path.iterdir()) == []


def test_parse_formats_and_batch_sizes():
    assert parse_formats("triton, timm") == ("timm", "triton")
    assert parse_formats(FORMATS) == FORMATS
    with pytest.raises(HwawareError, match="no format given"):
        parse_formats(" , ")
    assert parse_batch_sizes("32,1,8,8") == (1, 8, 32)
    for bad in ("1,x", "0,4", ""):
        with pytest.raises(HwawareError, match="batch sizes"):
            parse_batch_sizes(bad)


def test_update_card_merges_atomically_and_protects_computed_fields(tmp_path, model):
    out = tmp_path / "m"
    export_model(model, ARCH, SPACE, out, formats="timm")
    card = update_card(out, measured_latency_ms=1.5, test_top1=0.9)
    assert read_card(out) == card and card["measured_latency_ms"] == 1.5 and card["arch_short"] == ARCH.short()
    with pytest.raises(HwawareError, match="'flops' is computed"):
        update_card(out, flops=0)
    with pytest.raises(HwawareError, match="not plain JSON"):
        update_card(out, note=object())
    assert read_card(out) == card and _leftovers(out) == []


def test_load_model_reports_missing_files(tmp_path):
    with pytest.raises(HwawareError, match="no config.json"):
        hwaware.load_model(tmp_path)


# ---- TensorRT ------------------------------------------------------------------------------

BUILT = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.3.0"}


def test_engine_metadata_comparison():
    assert engine_mismatches(BUILT, dict(BUILT)) == ([], [])
    errors, _ = engine_mismatches(BUILT, {**BUILT, "tensorrt_version": "10.4.0"})
    assert errors == ["built with TensorRT 10.3.0, this machine has 10.4.0"]
    errors, _ = engine_mismatches(BUILT, {**BUILT, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    assert errors == ["built with compute capability 9.0, this machine has 8.0"]
    errors, warnings = engine_mismatches(BUILT, {**BUILT, "gpu": "NVIDIA H200"})
    assert errors == []
    assert warnings == ["built on NVIDIA H100 80GB HBM3, running on NVIDIA H200: rebuild for best speed"]
    errors, _ = engine_mismatches({"gpu": "x"}, BUILT)
    assert errors == ["the build metadata has no tensorrt_version", "the build metadata has no compute_capability"]


def test_profile_covers_every_batch_up_to_the_largest():
    assert profile_shapes((1, 8, 32)) == (1, 8, 32)
    assert profile_shapes((16, 4)) == (1, 4, 16)
    assert profile_shapes((2,)) == (1, 2, 2)


def test_load_engine_needs_its_metadata(tmp_path):
    plan = tmp_path / "model.plan"
    with pytest.raises(HwawareError, match="no such engine file"):
        load_engine(plan)
    plan.write_bytes(b"not an engine")
    with pytest.raises(HwawareError, match="no build metadata model.plan.json"):
        load_engine(plan)
    metadata_path(plan).write_text("{broken")
    with pytest.raises(HwawareError, match="model.plan.json: unreadable"):
        load_engine(plan)


@pytest.mark.skipif(not TRT_MISSING, reason="TensorRT and a GPU are present here")
def test_tensorrt_alone_without_tensorrt_is_an_error(tmp_path, model):
    with pytest.raises(HwawareError, match=f"tensorrt: {re.escape(TRT_MISSING)}; nothing else was asked for"):
        export_model(model, ARCH, SPACE, tmp_path / "m", formats="tensorrt")
    assert list(tmp_path.iterdir()) == []
    formats, warnings = preflight(tmp_path / "m", "tensorrt,timm")
    assert formats == ("timm",) and warnings == [f"tensorrt: skipped, {TRT_MISSING}; the other formats were exported"]


@pytest.mark.gpu
@pytest.mark.skipif(bool(TRT_MISSING), reason=f"needs TensorRT and a CUDA GPU: {TRT_MISSING}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_pytorch_and_refuses_other_machines(tmp_path, model, digits, precision):
    from hwaware.latency.backends import TensorRTRunner
    from hwaware.tensorrt_build import present_environment

    out = tmp_path / f"trt-{precision}"
    cache = tmp_path / "timing.cache"
    result = export_model(model, ARCH, SPACE, out, formats="tensorrt,triton", precision=precision,
                          batch_sizes=(1, 8, 32), sample_inputs=digits, timing_cache=cache)
    assert result.formats == ("onnx", "tensorrt", "triton") and result.warnings == []
    assert cache.stat().st_size > 0
    card = result.card["tensorrt"]
    assert (card["batch_min"], card["batch_opt"], card["batch_max"]) == (1, 8, 32)
    assert card["precision"] == precision and card["max_abs_diff_sample"] < 0.05
    engine = load_engine(out / "model.plan")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(TensorRTRunner(engine, x.cuda()).outputs().float().cpu(), model(x), atol=0.05, rtol=0.05)
    metadata = json.loads(metadata_path(out / "model.plan").read_text())
    assert {k: metadata[k] for k in BUILT} == present_environment()
    metadata_path(out / "model.plan").write_text(json.dumps({**metadata, "tensorrt_version": "0.0.1"}))
    with pytest.raises(HwawareError, match="built with TensorRT 0.0.1"):
        load_engine(out / "model.plan")
