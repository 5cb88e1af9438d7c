"""Import AutoFormer's own checkpoints (microsoft/Cream, `AutoFormer/supernet_train.py`) as hwaware supernets.

An official checkpoint is `{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}`
with `args` an `argparse.Namespace`. It is read with `weights_only=True`, admitting that one class and
no other. The settings the supernet was trained with come from `args` (relative position encoding,
`--gp` pooling, `--change_qkv`); the weights keep AutoFormer's qkv layout, which the space's
`qkv_layout: autoformer` reads as AutoFormer does, so every subnet computes what the official code computes.
The result is an ordinary hwaware checkpoint (`DIR/last.pt`) that `evaluate`, `search` and `export` take.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from hwaware.checkpoint import CHECKPOINT_FILE, load_torch_file, save_checkpoint, versions
from hwaware.errors import HwawareError
from hwaware.io import file_sha256
from hwaware.space import AUTOFORMER_COMPUTE, Arch, SearchSpace, _read_yaml, save_arch

__all__ = ["read_autoformer_checkpoint", "checkpoint_settings", "check_supported", "check_space", "convert_state_dict", "import_autoformer"]

ARCH_FILE = "arch.yaml"
# What AutoFormer's README passes to every training and evaluation command; assumed for a checkpoint that
# carries no `args` (a bare state dict).
README_FLAGS = {"relative_position": True, "gp": True, "change_qkv": True, "max_relative_position": 14}
# argparse defaults of supernet_train.py, for a Namespace written before a flag existed.
ARG_DEFAULTS = {"relative_position": False, "gp": False, "change_qkv": False, "max_relative_position": 14,
                "no_abs_pos": False, "mode": "super", "input_size": 224, "patch_size": 16, "nb_classes": 1000,
                "drop_path": 0.1}
# AutoFormer's module names -> timm's (the rest are the same in both).
_RENAMES = ((re.compile(r"^patch_embed_super\."), "patch_embed."),
            (re.compile(r"^(blocks\.\d+)\.attn_layer_norm\."), r"\1.norm1."),
            (re.compile(r"^(blocks\.\d+)\.ffn_layer_norm\."), r"\1.norm2."),
            (re.compile(r"^(blocks\.\d+)\.(fc[12])\."), r"\1.mlp.\2."))


def checkpoint_size_limits(space: SearchSpace) -> tuple[int, int]:
    """(largest entry, total) in bytes an AutoFormer checkpoint of `space` can hold: one supernet tensor in
    fp64 at most, and the fp32 weights five times over (model, EMA, AdamW's two moments, slack), plus 64 MiB
    for the rest. Counted on a meta-device supernet: nothing is allocated."""
    from hwaware.supernet import SuperViT

    with torch.device("meta"):
        sizes = [p.numel() for p in SuperViT(space).parameters()]
    return max(sizes) * 8, 5 * sum(sizes) * 4 + (64 << 20)


def read_autoformer_checkpoint(path: str | Path, space: SearchSpace | None = None) -> dict[str, Any]:
    """The checkpoint as a dict with "model" (a state dict) and "args" (a dict, or None when absent). With
    `space`, an archive declaring more data than that space's checkpoint holds is refused unread."""
    path = Path(path)
    limits = checkpoint_size_limits(space) if space is not None else None
    state = load_torch_file(path, admit=(argparse.Namespace,), refused="other than AutoFormer's", size_limits=limits)
    if isinstance(state, dict) and "model" in state:
        weights, args = state["model"], state.get("args")
    else:  # a bare state dict
        weights, args = state, None
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise HwawareError(f"checkpoint: {path} holds no state dict of tensors under 'model'; "
                           "it is not an AutoFormer checkpoint")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise HwawareError(f"checkpoint: {path}: 'args' is a {type(args).__name__}, not AutoFormer's argparse.Namespace")
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return {"model": weights, "args": vars(args) if args is not None else None,
            "epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None}


def checkpoint_settings(args: dict[str, Any] | None, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The flags the checkpoint was trained with: from `args`, else the README's (RPE and its max distance
    read off the tensors)."""
    if args is None:
        tables = [t for name, t in weights.items() if name.endswith(".embeddings_table_v") and t.dim() == 2]
        rpe = {"relative_position": bool(tables)}
        if tables:  # a table has a row per clipped distance -m..m plus the class token's: 2m + 2
            rpe["max_relative_position"] = max(tables[0].shape[0] // 2 - 1, 1)
        return {**ARG_DEFAULTS, **README_FLAGS, **rpe, "from": "README flags"}
    settings = {"from": "args"}
    for name, default in ARG_DEFAULTS.items():
        value = args.get(name, default)
        if type(value) is not type(default) and not (isinstance(default, float) and isinstance(value, int)):
            raise HwawareError(f"checkpoint: args.{name} is {value!r}, expected a {type(default).__name__}")
        settings[name] = value
    return settings


def check_supported(settings: dict[str, Any]) -> None:
    """Refuse the AutoFormer variants hwaware's supernet cannot compute."""
    if not settings["change_qkv"]:
        raise HwawareError("checkpoint: trained without --change_qkv (head dim = embed dim / heads); hwaware's "
                           "spaces keep a fixed head dim, as AutoFormer's README trains (--change_qkv)")
    if settings["no_abs_pos"]:
        raise HwawareError("checkpoint: trained with --no_abs_pos; hwaware's ViT always has absolute position embeddings")


def check_space(settings: dict[str, Any], space: SearchSpace) -> None:
    """Check that `space` computes as the checkpoint was trained, and has its image and class geometry."""
    wanted = {**AUTOFORMER_COMPUTE, "relative_position": settings["relative_position"],
              "max_relative_position": settings["max_relative_position"],
              "global_pool": "avg" if settings["gp"] else "token"}
    if not wanted["relative_position"]:
        wanted["max_relative_position"] = space.max_relative_position
    for name, value in wanted.items():
        if getattr(space, name) != value:
            fields = ", ".join(f"{k}: {v}" for k, v in wanted.items())
            raise HwawareError(f"space {space.name}: {name} is {getattr(space, name)!r} but the checkpoint was trained "
                               f"with {value!r} ({settings['from']}); use a space with {fields}")
    for name, arg in (("img_size", "input_size"), ("patch_size", "patch_size"), ("num_classes", "nb_classes")):
        if settings["from"] == "args" and getattr(space, name) != settings[arg]:
            raise HwawareError(f"space {space.name}: {name} is {getattr(space, name)} but the checkpoint's "
                               f"args.{arg} is {settings[arg]}")


def convert_state_dict(weights: dict[str, torch.Tensor], space: SearchSpace) -> dict[str, torch.Tensor]:
    """AutoFormer's names mapped to hwaware's (timm's), every tensor checked against `space`'s supernet."""
    from hwaware.supernet import SuperViT

    with torch.device("meta"):
        expected = {k: v.shape for k, v in SuperViT(space).state_dict().items()}
    converted = {}
    for name, tensor in weights.items():
        target = name
        for pattern, replacement in _RENAMES:
            target = pattern.sub(replacement, target)
        if target not in expected:
            raise HwawareError(f"checkpoint: tensor {name} has no place in space {space.name}'s supernet "
                               f"(another space, depth or settings?)")
        if tensor.shape != expected[target]:
            raise HwawareError(f"checkpoint: tensor {name} has shape {list(tensor.shape)} but space {space.name} "
                               f"needs {list(expected[target])}; the checkpoint is of another space or size")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise HwawareError(f"checkpoint: tensor {name} is not finite floating point")
        converted[target] = tensor.detach().to(torch.float32).contiguous()
    missing = [name for name in expected if name not in converted]
    if missing:
        raise HwawareError(f"checkpoint: lacks {missing[0]} that space {space.name}'s supernet needs "
                           f"({len(missing)} missing)")
    return converted


def _config_arch(config: str | Path, space: SearchSpace) -> Arch | None:
    """The RETRAIN subnet of an AutoFormer config YAML, after checking its supernet and choices are the space's."""
    data = _read_yaml(config)
    described = SearchSpace.from_dict(data, source=str(config))
    for name in ("embed_dims", "depths", "num_heads", "mlp_ratios", "max_embed_dim", "max_depth", "max_heads",
                 "max_mlp_ratio"):
        if getattr(described, name) != getattr(space, name):
            raise HwawareError(f"{config}: {name} is {getattr(described, name)} but space {space.name} has "
                               f"{getattr(space, name)}")
    if not isinstance(data, dict) or "RETRAIN" not in data:
        return None
    return space.validate(Arch.from_dict(data["RETRAIN"], source=f"{config}: RETRAIN"))


def import_autoformer(checkpoint: str | Path, space: SearchSpace, out: str | Path,
                      config: str | Path | None = None) -> dict[str, Any]:
    """Write `out/last.pt`, a hwaware supernet checkpoint holding the official weights; return its `source` record.

    `config` is the AutoFormer YAML a retrained subnet was trained with (`--mode retrain`): its RETRAIN
    subnet becomes the checkpoint's fixed arch (what `evaluate` runs by default), also written to
    `out/arch.yaml`. Everything is checked before anything is written.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists():
        raise HwawareError(f"out: {out} exists; choose a new folder")
    state = read_autoformer_checkpoint(checkpoint, space)
    settings = checkpoint_settings(state["args"], state["model"])
    check_supported(settings)
    # Shapes first (naming the first tensor that disagrees), with the checkpoint's own RPE so a wrong
    # space or size is reported as such; then the settings, which shapes cannot tell apart.
    shaped_as_trained = dataclasses.replace(space, relative_position=settings["relative_position"],
                                            max_relative_position=settings["max_relative_position"])
    weights = convert_state_dict(state["model"], shaped_as_trained)
    check_space(settings, space)
    arch = _config_arch(config, space) if config is not None else None
    if settings["mode"] == "retrain" and arch is None:
        raise HwawareError("checkpoint: a retrained subnet (args.mode retrain); give --config with the AutoFormer "
                           "YAML it was trained with (its RETRAIN block names the subnet)")
    source = {
        "importer": "hwaware import autoformer",
        "file": checkpoint.name,
        "sha256": file_sha256(checkpoint),
        "settings_from": settings["from"],
        "flags": {k: settings[k] for k in ("relative_position", "gp", "change_qkv", "max_relative_position", "mode")},
        "epoch": state["epoch"],
        "config": Path(config).name if config is not None else None,
        "retrained_arch": arch.to_dict() if arch is not None else None,
    }
    save_checkpoint(out / CHECKPOINT_FILE, {
        "space": space.to_dict(), "config": {"drop_path": float(settings["drop_path"])}, "data": None,
        "model": weights, "ema": None, "arch": arch.to_dict() if arch is not None else None,
        "epoch": state["epoch"], "step": 0, "complete": True, "history": [], "versions": versions(),
        "source": source,
    })
    if arch is not None:
        save_arch(arch, out / ARCH_FILE, space=space.name, source=f"RETRAIN of {source['config']}")
    return source

