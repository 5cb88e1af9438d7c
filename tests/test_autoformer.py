"""Importing official AutoFormer checkpoints (`hwaware import autoformer`), checked against the official code.

The golden fixture `fixtures/autoformer_tiny.{safetensors,json}` was made once with the official code
(microsoft/Cream, `AutoFormer/model/supernet_transformer.py` and `model/module/*`, its `torch._six` import
patched to `collections.abc`, torch 2.14 on CPU), outside this repository:
`Vision_TransformerSuper(img_size=16, patch_size=4, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0,
num_classes=10, qkv_bias=True, gp=True, relative_position=True, change_qkv=True, max_relative_position=2)`,
every parameter redrawn at random (weights N(0, 0.1); biases, LayerNorm biases N(0, 0.2); LayerNorm weights
1 + N(0, 0.2)) and rounded to float16, so the stored float16 tensors are exactly what it ran with.
`model.*` is its state dict in the official layout (interleaved qkv rows, `attn_layer_norm`, `fc1`, ...),
`images` three random 16x16 inputs, `logits.i` the official eval-mode logits (float32) of subnet i of the
JSON's `subnets` (embed 64/96/128, depth 1/2, one and two heads mixed, so the qkv bias slice differs).
A grid of 4x4 patches with max distance 2 also exercises the clipping of relative distances.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hwaware.autoformer import import_autoformer
from hwaware.cli import main
from hwaware.errors import HwawareError
from hwaware.evaluation import load_supernet
from hwaware.space import BUILTIN_SPACES, Arch, load_space

FIXTURES = Path(__file__).parent / "fixtures"
SPACE_FILE = FIXTURES / "autoformer_tiny_space.yaml"


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(FIXTURES / "autoformer_tiny.safetensors")
    meta = json.loads((FIXTURES / "autoformer_tiny.json").read_text())
    weights = {name.removeprefix("model."): t.float() for name, t in tensors.items() if name.startswith("model.")}
    subnets = [Arch(s["embed_dim"], s["num_heads"], s["mlp_ratio"]) for s in meta["subnets"]]
    logits = [tensors[f"logits.{i}"] for i in range(len(subnets))]
    return {"weights": weights, "args": meta["args"], "images": tensors["images"].float(), "subnets": subnets,
            "logits": logits}


def official_checkpoint(path: Path, weights, args: dict | None, **extra) -> Path:
    """Saved as supernet_train.py saves (optimizer, scheduler, scaler states and the argparse Namespace)."""
    state = {"model": weights, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0]}]},
             "lr_scheduler": {"t_initial": 500}, "epoch": 499, "scaler": {"scale": 65536.0}, **extra}
    if args is not None:
        state["args"] = argparse.Namespace(**args)
    torch.save(state, path)
    return path


def test_import_reproduces_the_official_logits_of_every_subnet(golden, tmp_path, capsys):
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth", golden["weights"], golden["args"])
    out = tmp_path / "imported"
    assert main(["import", "autoformer", str(ckpt), "--space", str(SPACE_FILE), "--out", str(out)]) == 0
    assert "relative_position=True" in capsys.readouterr().out
    model, meta = load_supernet(out / "last.pt")
    assert len({a.num_heads for a in golden["subnets"]}) > 2
    with torch.no_grad():
        for arch, want in zip(golden["subnets"], golden["logits"]):
            assert (model(golden["images"], arch) - want).abs().max() < 1e-5, arch.short()
            static = model.extract(arch).eval()
            assert (static(golden["images"]) - want).abs().max() < 1e-5, arch.short()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["source"]["flags"]["relative_position"] and state["source"]["settings_from"] == "args"
    assert state["source"]["file"] == "checkpoint.pth" and len(state["source"]["sha256"]) == 64
    assert meta["epoch"] == 499 and meta["arch"] is None and meta["complete"]


def test_imported_rpe_subnet_exports_to_onnx_matching_pytorch(golden, tmp_path):
    from hwaware.export import export_model, load_model, onnx_runner

    ckpt = official_checkpoint(tmp_path / "c.pth", golden["weights"], golden["args"])
    import_autoformer(ckpt, load_space(SPACE_FILE), tmp_path / "imported")
    model, _ = load_supernet(tmp_path / "imported" / "last.pt")
    arch = golden["subnets"][1]
    static = model.extract(arch).eval()
    result = export_model(static, arch, model.space, tmp_path / "export", formats="timm,onnx", batch_sizes=(1, 3))
    images = golden["images"]
    with torch.no_grad():
        want = static(images)
        assert (want - golden["logits"][1]).abs().max() < 1e-5
        assert (load_model(result.out_dir)(images) - want).abs().max() == 0
    assert (onnx_runner(result.out_dir / "model.onnx")(images) - want).abs().max() < 1e-5


def _refused(args: list[str], capsys, *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_checkpoints_are_one_line_and_write_nothing(golden, tmp_path, capsys):
    out = tmp_path / "out"
    good = official_checkpoint(tmp_path / "good.pth", golden["weights"], golden["args"])
    # another space: the first tensor whose shape disagrees is named
    _refused(["import", "autoformer", str(good), "--space", "autoformer-t", "--out", str(out)], capsys,
             "has shape", "space autoformer-t needs")
    # a Python object other than AutoFormer's Namespace
    foreign = official_checkpoint(tmp_path / "foreign.pth", golden["weights"], golden["args"],
                                  extra=zipfile.ZipInfo("x"))
    _refused(["import", "autoformer", str(foreign), "--space", str(SPACE_FILE), "--out", str(out)], capsys,
             "pickled objects other than AutoFormer's", "zipfile.ZipInfo")
    # truncated
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(["import", "autoformer", str(truncated), "--space", str(SPACE_FILE), "--out", str(out)], capsys,
             "truncated")
    # a missing tensor
    partial = dict(golden["weights"])
    del partial["blocks.1.attn.rel_pos_embed_v.embeddings_table_h"]
    short = official_checkpoint(tmp_path / "short.pth", partial, golden["args"])
    _refused(["import", "autoformer", str(short), "--space", str(SPACE_FILE), "--out", str(out)], capsys,
             "lacks blocks.1.attn.rel_pos_embed_v.embeddings_table_h")
    assert not out.exists()
    # an --out that exists is refused before the checkpoint is read
    out.mkdir()
    _refused(["import", "autoformer", str(good), "--space", str(SPACE_FILE), "--out", str(out)], capsys, "exists")
    assert not any(out.iterdir())


def test_settings_come_from_the_checkpoint_and_must_match_the_space(golden, tmp_path):
    space = load_space(SPACE_FILE)
    cls_pooled = official_checkpoint(tmp_path / "cls.pth", golden["weights"], {**golden["args"], "gp": False})
    with pytest.raises(HwawareError, match="global_pool is 'avg' but the checkpoint was trained with 'token'"):
        import_autoformer(cls_pooled, space, tmp_path / "a")
    plain_qkv = official_checkpoint(tmp_path / "qkv.pth", golden["weights"], {**golden["args"], "change_qkv": False})
    with pytest.raises(HwawareError, match="--change_qkv"):
        import_autoformer(plain_qkv, space, tmp_path / "b")
    far = dataclasses.replace(space, max_relative_position=3)
    with pytest.raises(HwawareError, match="max_relative_position is 3 but the checkpoint was trained with 2 \\(args\\)"):
        import_autoformer(official_checkpoint(tmp_path / "far.pth", golden["weights"], golden["args"]), far,
                          tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_bare_state_dict_is_read_with_the_readme_flags(golden, tmp_path):
    """Released files may hold only the weights: AutoFormer's README flags, RPE reach read off the tables."""
    bare = tmp_path / "bare.pth"
    torch.save(golden["weights"], bare)
    source = import_autoformer(bare, load_space(SPACE_FILE), tmp_path / "imported")
    assert source["settings_from"] == "README flags" and source["flags"]["max_relative_position"] == 2
    model, _ = load_supernet(tmp_path / "imported" / "last.pt")
    with torch.no_grad():
        for arch, want in zip(golden["subnets"], golden["logits"]):
            assert (model(golden["images"], arch) - want).abs().max() < 1e-5


def test_retrained_subnet_needs_its_config_and_becomes_the_checkpoint_arch(golden, tmp_path):
    space = load_space(SPACE_FILE)
    ckpt = official_checkpoint(tmp_path / "retrain.pth", golden["weights"], {**golden["args"], "mode": "retrain"})
    with pytest.raises(HwawareError, match="--config"):
        import_autoformer(ckpt, space, tmp_path / "a")
    config = tmp_path / "AutoFormer-tiny.yaml"
    config.write_text("SUPERNET: {MLP_RATIO: 1.0, NUM_HEADS: 2, EMBED_DIM: 128, DEPTH: 2}\n"
                      "SEARCH_SPACE: {MLP_RATIO: [0.5, 1.0], NUM_HEADS: [1, 2], DEPTH: [1, 2], EMBED_DIM: [64, 96, 128]}\n"
                      "RETRAIN: {MLP_RATIO: [0.5, 1.0], NUM_HEADS: [1, 2], DEPTH: 2, EMBED_DIM: 128}\n")
    source = import_autoformer(ckpt, space, tmp_path / "b", config=config)
    retrained = golden["subnets"][1]
    assert source["retrained_arch"] == retrained.to_dict()
    model, meta = load_supernet(tmp_path / "b" / "last.pt")
    assert Arch.from_dict(meta["arch"]) == retrained
    with torch.no_grad():
        assert (model(golden["images"], retrained) - golden["logits"][1]).abs().max() < 1e-5
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("EMBED_DIM: [64, 96, 128]", "EMBED_DIM: [64, 128]"))
    with pytest.raises(HwawareError, match="embed_dims"):
        import_autoformer(ckpt, space, tmp_path / "c", config=other)


def test_evaluate_takes_the_imported_checkpoint(golden, tmp_path, capsys):
    ckpt = official_checkpoint(tmp_path / "c.pth", golden["weights"], golden["args"])
    import_autoformer(ckpt, load_space(SPACE_FILE), tmp_path / "imported")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "imported" / "last.pt"), "--data", "synthetic",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["space"] == "autoformer-tiny" and 0 <= result["top1"] <= 1


def test_builtin_autoformer_spaces_take_the_readme_trained_checkpoints():
    """The built-ins compute as AutoFormer's README trains; the -timm variants as hwaware did before."""
    t, timm = BUILTIN_SPACES["autoformer-t"], BUILTIN_SPACES["autoformer-t-timm"]
    assert (t.relative_position, t.global_pool, t.norm_eps, t.qkv_layout) == (True, "avg", 1e-5, "autoformer")
    assert (timm.relative_position, timm.global_pool, timm.norm_eps, timm.qkv_layout) == (False, "token", 1e-6, "timm")
    assert t.grid_size == 14 and t.max_relative_position == 14
