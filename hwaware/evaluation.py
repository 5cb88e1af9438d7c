"""Trained supernets as a user meets them: load a checkpoint, score a subnet's top-1 on a split.

Search, export and `hwaware evaluate` import this, not the training module.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hwaware.checkpoint import check_finite, read_checkpoint
from hwaware.data import dataloader, mix_seed
from hwaware.errors import HwawareError
from hwaware.space import Arch, SearchSpace
from hwaware.supernet import SuperViT

__all__ = ["evaluate", "build_scorer", "Scorer", "ImageSet", "held_out_scorer", "autocast_dtype", "load_supernet",
           "evaluate_checkpoint", "dataset_of", "checkpoint_arch"]


@torch.no_grad()
def evaluate(model: nn.Module, arch: Arch, loader, device: str | torch.device = "cpu",
             distributed: bool | None = None) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) of subnet `arch`, as fractions in 0..1, plus the count `n`.

    Under torch.distributed (auto-detected) each rank evaluates its shard of `loader` and the
    counts are summed over ranks, so every rank returns the whole-set numbers.
    """
    model = getattr(model, "module", model)  # a DDP wrapper's module: evaluation needs no gradient sync
    was_training = model.training
    model.eval()
    try:
        totals = _tally(model, arch, loader, torch.device(device))
    finally:
        model.train(was_training)
    return _summary(totals, model.space.num_classes > 5, distributed)


def _tally(model: nn.Module, arch: Arch, batches, device: torch.device, autocast: torch.dtype | None = None,
           normalize: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(top-1 hits, top-5 hits, loss sum, n) of `arch` over `batches`, on `device`.

    uint8 batches (decoded images) are made float on the device with `normalize` (mean, std).
    """
    top5 = model.space.num_classes > 5
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, targets in batches:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            mean, std = normalize
            images = images.float().div_(255).sub_(mean).div_(std)  # ToTensor + Normalize, on the device, in place
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(images, arch)
        logits = logits.float()
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
    return totals


def _summary(totals: torch.Tensor, top5: bool, distributed: bool | None = None) -> dict[str, float]:
    """Sum `_tally`'s counts over ranks (under torch.distributed) and turn them into fractions."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(totals)
    n = int(totals[3])
    if n == 0:
        raise HwawareError("evaluate: the loader yielded no images")
    result = {"top1": float(totals[0] / n), "loss": float(totals[2] / n), "n": n}
    if top5:
        result["top5"] = float(totals[1] / n)
    return result


# ---- the scorer --------------------------------------------------------------------------------

DEFAULT_SCORING_IMAGES = 10_000  # ImageNet: 10,000 of val's 50,000 (SE of a top-1 near 75 %: 0.43 points)
DEFAULT_CACHE_MIB = 2048  # ImageNet at 224 px: 147 KiB per decoded image, so 10,000 images fit in 1.4 GiB
SCORE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMAGE_PARTS = ("selection", "remainder")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32).

    auto: bf16 on GPUs that compute it natively (compute capability 8.0+; `is_bf16_supported()` is
    also True on a V100, which emulates it), fp16 on older GPUs, fp32 on the CPU (CPU bf16 autocast
    pays only where the CPU has bf16 instructions: ask for it, and measure with
    benchmarks/scoring_throughput.py).
    """
    if precision not in SCORE_PRECISIONS:
        raise HwawareError(f"score precision: {precision!r} is not one of {', '.join(SCORE_PRECISIONS)}")
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "auto":
        return None if device.type != "cuda" else torch.bfloat16 if native_bf16 else torch.float16
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise HwawareError("score precision: fp16 autocast runs on CUDA only; on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not native_bf16:
        name = torch.cuda.get_device_name(device)
        raise HwawareError(f"score precision: {name} has no native bf16 (compute capability below 8.0); use fp16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def join_compute_device(spec: str | torch.device = "auto") -> tuple[int, int, torch.device, bool]:
    """`setup_distributed` for the device scoring runs on, with a GPU index that is not there refused in
    one line first (CUDA would raise "invalid device ordinal" deep inside)."""
    from hwaware.distributed import parse_device, setup_distributed

    spec = str(spec)
    if spec != "auto":
        device = parse_device(spec)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and count and device.index is not None and device.index >= count:
            raise HwawareError(f"device: {spec} asked for, but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return setup_distributed(spec)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a cluster job narrows), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(dataset) -> int:
    """Loader processes for `dataset`: up to 8 for image files (this node's CPUs shared among its ranks, one
    left for the rank itself), none for the datasets held in memory."""
    if not hasattr(dataset, "normalize"):  # set by the image-file datasets only (see hwaware.data)
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, available_cpus() // local_ranks - 1))


@dataclass(frozen=True)
class ImageSet:
    """Which images a scorer scores: a seeded, class-stratified draw from one split of a dataset.

    `images`: how many ("all"; None: all, up to `DEFAULT_SCORING_IMAGES`). `part`: "selection" is the draw
    itself, what a search selects subnets on; "remainder" draws as many (or all that are left) from
    the split's images the selection left out, for an accuracy the selection never saw.
    """

    data: str
    split: str = "val"
    images: int | str | None = None
    seed: int = 0
    part: str = "selection"

    def choose(self, dataset) -> np.ndarray:
        """The indices into `dataset` (the split) this set names, sorted."""
        from hwaware.data import dataset_targets, stratified_sample

        if self.part not in IMAGE_PARTS:
            raise HwawareError(f"images: part {self.part!r} is not one of {', '.join(IMAGE_PARTS)}")
        total = len(dataset)
        if self.images == "all":
            count = total
        elif self.images is None:
            count = min(DEFAULT_SCORING_IMAGES, total)
        elif isinstance(self.images, int) and 1 <= self.images <= total:
            count = self.images
        else:
            raise HwawareError(f"images: {self.images!r} asked, but {self.data} {self.split} has {total} "
                               "(a count from 1 up, or all)")
        if self.part == "selection" and count == total:
            return np.arange(total)
        targets = dataset_targets(dataset)
        selected = np.arange(total) if count == total else stratified_sample(targets, count, self.seed)
        if self.part == "selection":
            return selected
        left = np.setdiff1d(np.arange(total), selected)
        if len(left) == 0:
            raise HwawareError(f"images: the selection is all {total} {self.split} images; none is left out")
        if len(left) <= count:
            return left
        return stratified_sample(targets, count, mix_seed(self.seed, 1), among=left)


class Scorer:
    """Top-1 of subnets on one fixed image set, streamed through a loader, on the device asked for.

    Calling it with an Arch gives top-1 in 0..1 (`measure` gives top-5, loss and n too). Under
    torch.distributed each rank scores every world-th image of the set and the counts are summed,
    so every rank returns the whole set's figure, identical to one process's. Decoded images
    (uint8 at the model's resolution) of image folders are kept up to `cache_mib` after the first
    pass, so a search decodes each image once; the rest streams through the loader each time.
    Built by `build_scorer`.
    """

    def __init__(self, model: nn.Module, dataset, image_set: ImageSet, indices: np.ndarray, *, device: torch.device,
                 autocast: torch.dtype | None, batch_size: int, workers: int, cache_mib: float,
                 rank: int = 0, world_size: int = 1):
        from hwaware.data import image_ids

        self.model, self.dataset, self.image_set, self.indices = model, dataset, image_set, indices
        self.device, self.autocast, self.batch_size, self.workers = device, autocast, batch_size, workers
        self.cache_bytes = int(cache_mib * 2**20)
        self.mine = indices[rank::world_size]  # this rank's shard: no padding, every image counted once
        ids = "\n".join(image_ids(dataset, indices)).encode()
        self.ids_sha256 = hashlib.sha256(ids).hexdigest()
        normalize = getattr(dataset, "normalize", None)
        self.normalize = None if normalize is None else tuple(
            torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in normalize)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # filled by the first whole pass
        self._tail = None  # the loader over what the cache could not hold

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Exactly which images are scored (not where or in which batches: that changes float noise only)."""
        s = self.image_set
        return {"data": s.data, "split": s.split, "part": s.part, "images": len(self.indices),
                "of": len(self.dataset), "seed": s.seed, "stratified": "class", "ids_sha256": self.ids_sha256}

    def describe(self) -> str:
        """One line for results and cards, e.g. "val: 10000 of 50000 images, class-stratified, seed 0"."""
        s, n, total = self.image_set, len(self.indices), len(self.dataset)
        if s.part == "remainder":
            return f"{s.split} remainder: {n} {s.split} images the selection left out, class-stratified, seed {s.seed}"
        if n == total:
            return f"{s.split}: all {total} images"
        return f"{s.split}: {n} of {total} images, class-stratified, seed {s.seed}"

    def _loader(self, indices: np.ndarray):
        from torch.utils.data import Subset

        return dataloader(Subset(self.dataset, indices.tolist()), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers, persistent_workers=self.workers > 0,
                          pin_memory=self.device.type == "cuda")

    def _raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches as the dataset gives them: from the cache, then streamed."""
        if self._cache is not None:
            yield from self._cache
            if self._tail is not None:
                yield from self._tail
            return
        cache, used, caching = [], 0, self.cache_bytes > 0
        for images, labels in self._loader(self.mine) if len(self.mine) else ():
            size = images.numel() * images.element_size()
            caching = caching and images.dtype == torch.uint8 and used + size <= self.cache_bytes  # never float
            if caching:
                cache.append((images, labels))
                used += size
            yield images, labels
        cached = sum(len(labels) for _, labels in cache)
        self._tail = self._loader(self.mine[cached:]) if cached < len(self.mine) else None
        self._cache = cache

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's images as normalised float32 on the CPU, with labels (for ONNX accuracy checks)."""
        for images, labels in self._raw_batches():
            if images.dtype == torch.uint8:
                mean, std = (v.cpu() for v in self.normalize)
                images = images.float().div_(255).sub_(mean).div_(std)
            yield images, labels

    @torch.no_grad()
    def measure(self, arch: Arch) -> dict[str, float]:
        """top1 (and top5 with more than 5 classes), loss and n of `arch` on the whole set (all ranks)."""
        model = getattr(self.model, "module", self.model)
        model.eval()
        totals = _tally(model, arch, self._raw_batches(), self.device, self.autocast, self.normalize)
        return _summary(totals, model.space.num_classes > 5)

    def __call__(self, arch: Arch) -> float:
        return self.measure(arch)["top1"]


def build_scorer(model: nn.Module, data: str, *, split: str = "val", images: int | str | None = None, seed: int = 0,
                 part: str = "selection", device: str | torch.device = "auto", precision: str = "auto",
                 batch_size: int = 256, workers: int | None = None, threads: int | None = None,
                 cache_mib: float = DEFAULT_CACHE_MIB) -> Scorer:
    """A `Scorer` of `model`'s subnets on `ImageSet(data, split, images, seed, part)`.

    `device`: auto (this rank's GPU when there is one, else the CPU), cpu, cuda or cuda:N; under
    torchrun the process group is joined (NCCL on GPUs, gloo on the CPU). `precision`: see
    `autocast_dtype`. `workers`: loader processes (default: up to 8 for image files, shared among
    this node's ranks; 0 for in-memory datasets). `threads`: torch's CPU threads for this process
    (default: torch's; torchrun sets 1 per rank). `cache_mib`: decoded images kept in memory, per rank.
    The model is moved to the device.
    """
    from hwaware.data import build_dataset

    if batch_size < 1:
        raise HwawareError(f"batch size: must be at least 1, got {batch_size}")
    if not (cache_mib >= 0 and math.isfinite(cache_mib)):
        raise HwawareError(f"cache: must be a size in MiB >= 0, got {cache_mib!r}")
    cpus = available_cpus()
    if workers is not None and not 0 <= workers <= cpus:
        raise HwawareError(f"workers: {workers} loader processes asked, but this machine lets this process use "
                           f"{cpus} CPUs")
    if threads is not None and not 1 <= threads <= cpus:
        raise HwawareError(f"threads: {threads} asked, but this machine lets this process use {cpus} CPUs")
    rank, world, device, _ = join_compute_device(device)
    autocast = autocast_dtype(device, precision)
    image_set = ImageSet(data, split, images, seed, part)
    dataset = build_dataset(data, getattr(model, "module", model).space, split, decoded=True)
    indices = image_set.choose(dataset)
    workers = default_workers(dataset) if workers is None else workers
    if threads is not None:
        torch.set_num_threads(threads)
    return Scorer(model.to(device), dataset, image_set, indices, device=device, autocast=autocast,
                  batch_size=batch_size, workers=workers, cache_mib=cache_mib, rank=rank, world_size=world)


def held_out_scorer(model: nn.Module, selection: Scorer, **options: Any) -> Scorer | None:
    """A scorer on images `selection` never scored: the rest of its split (as many images), else the
    test split when the selection is all of val and there is one; None when neither exists."""
    from hwaware.data import has_split

    s = selection.image_set
    if len(selection.indices) < len(selection.dataset):
        return build_scorer(model, s.data, split=s.split, images=s.images, seed=s.seed, part="remainder", **options)
    if s.split != "test" and has_split(s.data, "test"):
        return build_scorer(model, s.data, split="test", seed=s.seed, **options)
    return None


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
                        data: str | None = None, images: int | None = None, seed: int = 0,
                        **scoring: Any) -> dict[str, Any]:
    """Evaluate one subnet of a trained supernet on the run's data (or `data`): what `hwaware evaluate` prints.

    `arch` defaults to the subnet a fixed-subnet run trained, else the largest. All of `split` is
    scored unless `images` asks for a class-stratified subset; `scoring` takes `build_scorer`'s
    device, precision, batch_size, workers and threads (one pass: nothing is cached).
    """
    from hwaware.space import resolve_arch

    _, _, _, owned = join_compute_device(scoring.get("device", "auto"))  # a missing GPU: refused before loading
    try:
        model, meta = load_supernet(checkpoint)
        check_finite(model.state_dict(), str(checkpoint))
        space = model.space
        if arch is None:
            arch = checkpoint_arch(meta, space) or space.largest()
        arch = space.validate(arch) if isinstance(arch, Arch) else resolve_arch(arch, space)
        data = dataset_of(meta, data)
        scorer = build_scorer(model, data, split=split, images="all" if images is None else images, seed=seed,
                              **{**scoring, "cache_mib": 0})
        result = scorer.measure(arch)
        return {**result, "arch": arch.to_dict(), "split": split, "data": data, "space": space.name,
                "images": scorer.describe(), "epoch": meta["epoch"], "checkpoint": str(checkpoint)}
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
