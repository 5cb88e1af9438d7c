"""Trained supernets as a user meets them: load a checkpoint, score a subnet's top-1 on a split.

Search, export and `hwaware evaluate` import this, not the training module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hwaware.checkpoint import check_finite, read_checkpoint
from hwaware.data import build_loader
from hwaware.distributed import parse_device
from hwaware.errors import HwawareError
from hwaware.space import Arch, SearchSpace
from hwaware.supernet import SuperViT

__all__ = ["evaluate", "load_supernet", "evaluate_checkpoint", "dataset_of", "checkpoint_arch"]


@torch.no_grad()
def evaluate(model: nn.Module, arch: Arch, loader, device: str | torch.device = "cpu",
             distributed: bool | None = None) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) of subnet `arch`, as fractions in 0..1, plus the count `n`.

    Under torch.distributed (auto-detected) each rank evaluates its shard of `loader` and the
    counts are summed over ranks, so every rank returns the whole-set numbers.
    """
    model = getattr(model, "module", model)  # a DDP wrapper's module: evaluation needs no gradient sync
    device = torch.device(device)
    was_training = model.training
    model.eval()
    num_classes = model.space.num_classes
    top5 = num_classes > 5
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, n
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images, arch).float()
        if not bool(torch.isfinite(logits).all()):
            raise HwawareError(f"evaluate: subnet {arch.short()} gives non-finite logits (NaN or inf); "
                               "its weights are broken: retrain, or evaluate another checkpoint")
        ranked = logits.topk(5 if top5 else 1, dim=-1).indices
        hits = ranked == targets[:, None]
        totals[0] += hits[:, 0].sum()
        if top5:
            totals[1] += hits.any(dim=-1).sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum")
        totals[3] += len(targets)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    n = int(totals[3])
    if n == 0:
        raise HwawareError("evaluate: the loader yielded no images")
    result = {"top1": float(totals[0] / n), "loss": float(totals[2] / n), "n": n}
    if top5:
        result["top5"] = float(totals[1] / n)
    return result


def load_supernet(checkpoint_path: str | Path, space: SearchSpace | None = None,
                  use_ema: bool = True) -> tuple[SuperViT, dict[str, Any]]:
    """The trained supernet (EMA weights when the run kept them) in eval mode on CPU, and the run's metadata.

    The metadata holds "space" (SearchSpace dict), "data" (spec), "config", "arch" (the Arch dict a
    fixed-subnet run trained, else None), "epoch", "step",
    "complete", "history" (metrics rows) and "versions". Passing `space` checks the checkpoint
    was trained for it.
    """
    state = read_checkpoint(checkpoint_path)
    try:
        trained_space = SearchSpace.from_dict(dict(state["space"]), source=f"{checkpoint_path}: space")
        config = dict(state["config"])
        weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    except (KeyError, TypeError) as exc:
        raise HwawareError(f"checkpoint: {checkpoint_path} lacks {exc} (written by another tool?)") from None
    if space is not None and space.to_dict() != trained_space.to_dict():
        raise HwawareError(
            f"checkpoint: {checkpoint_path} was trained for space {trained_space.name!r}, not {space.name!r}"
        )
    model = SuperViT(trained_space, float(config.get("drop_path", 0.0)))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise HwawareError(f"checkpoint: {checkpoint_path}: weights do not fit its space ({str(exc).splitlines()[0]})") from None
    model.eval()
    meta = {key: state.get(key) for key in ("space", "data", "config", "arch", "epoch", "step", "complete", "history",
                                              "versions", "train_seconds")}
    meta["weights"] = "ema" if weights is state.get("ema") else "model"
    return model, meta


def dataset_of(meta: dict[str, Any], data: str | None) -> str:
    """The dataset to score on: `data` if given, else the one the checkpoint records."""
    spec = data or meta.get("data")
    if not spec:
        raise HwawareError("data: the checkpoint records no dataset (an imported supernet?); pass --data")
    return spec


def checkpoint_arch(meta: dict[str, Any], space: SearchSpace) -> Arch | None:
    """The subnet a fixed-subnet run trained (its checkpoint's "arch"), validated; None for a supernet."""
    if meta.get("arch") is None:
        return None
    return space.validate(Arch.from_dict(meta["arch"], source="checkpoint: arch"))


def evaluate_checkpoint(checkpoint: str | Path, arch: str | Arch | None = None, split: str = "val",
                        data: str | None = None, batch_size: int = 256, device: str | torch.device = "cpu",
                        num_workers: int = 0) -> dict[str, Any]:
    """Evaluate one subnet of a trained supernet on the run's data (or `data`): what `hwaware evaluate` prints.

    `arch` defaults to the subnet a fixed-subnet run trained, else the largest.
    """
    from hwaware.space import resolve_arch

    device = parse_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HwawareError(f"device: {device} asked for CUDA but none is available")
    model, meta = load_supernet(checkpoint)
    check_finite(model.state_dict(), str(checkpoint))
    space = model.space
    if arch is None:
        arch = checkpoint_arch(meta, space) or space.largest()
    arch = space.validate(arch) if isinstance(arch, Arch) else resolve_arch(arch, space)
    data = dataset_of(meta, data)
    loader = build_loader(data, space, split, batch_size, num_workers=num_workers, rank=0, world_size=1)
    result = evaluate(model.to(device), arch, loader, device, distributed=False)
    return {**result, "arch": arch.to_dict(), "split": split, "data": data, "space": space.name,
            "epoch": meta["epoch"], "checkpoint": str(checkpoint)}


