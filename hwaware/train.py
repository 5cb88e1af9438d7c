"""Supernet training (uniform or sandwich sampling) and fixed-subnet training, DeiT-style recipe, DDP, exact resume.

A fixed-subnet run (`arch` set) is AutoFormer's retraining: the same SuperViT, trained on one
Arch every step, so its checkpoint is read by evaluate, search and export like a supernet's and
records the Arch under "arch". `init_from` starts it from a trained supernet's weights (OFA's
fine-tuning), optionally distilled from that supernet's largest subnet as a frozen teacher.

Every random choice of a step is drawn from a seed made of (run seed, step): the subnet(s)
from a stream shared by all ranks (so DDP ranks train the same subnet), drop path and mixup
from a per-rank stream, and each image's augmentation from (seed, epoch, index[, copy]) in
`hwaware.data`. A run killed anywhere therefore resumes from its last checkpoint onto exactly
the path the uninterrupted run would have taken (bit-identical on CPU).

Under torchrun, rank 0's checkpoint is the truth: it alone reads and writes the run folder, and
every rank resumes from the state it broadcasts (nodes need no shared filesystem); DDP is built
after that state is loaded. A failure on any rank before training stops every rank with its line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hwaware import bounds
from hwaware.checkpoint import (
    CHECKPOINT_FILE,
    check_finite,
    claim_run_dir,
    first_difference,
    read_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
    versions,
)
from hwaware.data import (
    ResumableSampler,
    build_dataset,
    build_run_loader,
    dataset_targets,
    mix_seed,
    stratified_sample,
)
from hwaware.distributed import from_rank0, on_every_rank, setup_distributed
from hwaware.errors import HwawareError
from hwaware.evaluation import evaluate, load_supernet
from hwaware.io import atomic_write_text, excerpt, file_sha256, folder_lock, read_yaml
from hwaware.progress import progress, write
from hwaware.space import Arch, SearchSpace, get_space
from hwaware.stopping import deferred_stop, stop_here, stop_requested
from hwaware.supernet import SuperViT

__all__ = ["TrainConfig", "RECIPES", "make_config", "train_supernet", "SupernetTrainer", "tracked_archs", "val_summary"]

STRATEGIES = ("uniform", "sandwich", "fixed")  # fixed: one Arch every step (set by `arch`)
INIT_STREAM, ARCH_STREAM, NOISE_STREAM = 0, 1, 2  # seed streams: initial weights, subnets (shared by ranks), per-rank noise
METRICS_FILE = "metrics.csv"
VAL_SUBSET_SEED = 0  # fixed, not the run's seed: every run validates on the same images


@dataclass
class TrainConfig:
    """Everything a supernet run needs. The defaults are the embedded `digits` recipe (minutes on 2 CPU
    cores); `RECIPES["imagenet"]` holds AutoFormer's (DeiT's) ImageNet settings."""

    space: str = "digits"
    data: str = "digits"
    out: str = "runs/digits"
    strategy: str = "sandwich"  # digits: lifts the smallest subnet (0.89 -> 0.94 val) where uniform rarely trains it
    # (sandwich costs the FLOPs of largest + smallest + num_random random subnets per step: on autoformer-t 3.07x
    # uniform's one random subnet, which is why the ImageNet recipe trains AutoFormer's uniform way)
    num_random: int = 1  # sandwich: random subnets per step besides the largest and smallest
    distill: bool = True  # sandwich: smaller subnets learn the largest's soft predictions; fixed: learn init_from's
    arch: str = ""  # fixed-subnet training: the Arch as JSON (make_config takes an Arch); "" = train the supernet
    init_from: str = ""  # fixed: a supernet checkpoint of the same space to start from (and distil from)
    epochs: int = 80
    batch_size: int = 64  # per rank and micro-batch
    global_batch: int = 0  # images per optimizer step over all ranks, reached by gradient accumulation; 0 = batch x ranks
    lr: float = 5e-3  # 2e-3 learns the position embeddings too slowly: smallest subnet alone 0.88 vs 0.94 val
    min_lr: float = 1e-5
    warmup_epochs: float = 2.0
    weight_decay: float = 0.5  # 1257 training images are memorised; 0.05 -> 0.5 took the smallest alone 0.94 -> 0.97
    drop_path: float = 0.0
    clip_grad: float = 5.0  # max grad norm; 0 = off
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str = ""  # timm RandAugment string for image datasets; "" = off
    aug_repeats: int = 1  # repeated augmentation (DeiT, AutoFormer: 3): each image's copies go to different ranks
    reprob: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA
    amp: str = "auto"  # auto (bf16 on GPUs computing it natively, compute capability 8.0+; fp16 before; off on CPU)
    seed: int = 0
    checkpoint_every: int = 100  # steps between mid-epoch checkpoints (0: only at epoch ends)
    num_workers: int = 0
    eval_batch_size: int = 512
    val_images: int = 0  # each epoch's validation scores this many val images (a fixed seeded subset); 0 = all
    compute_device: str = "auto"  # the torch device: auto (the GPU when there is one), cpu, cuda, cuda:N
    threads: int = 0  # CPU threads for torch; 0 = torch's default (set 1 on a machine shared with other jobs)
    progress: bool = True

    # Changing these does not change what is learned, so a resumed run may change them.
    OPERATIONAL = ("out", "checkpoint_every", "num_workers", "eval_batch_size", "compute_device", "threads", "progress")
    # Settings added after runs existed: left out of a run's identity at these values, so those runs still resume.
    ADDED_OFF = {"global_batch": 0, "aug_repeats": 1, "val_images": 0}

    def validate(self) -> TrainConfig:
        if self.strategy not in STRATEGIES:
            raise HwawareError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if (self.strategy == "fixed") != bool(self.arch):
            raise HwawareError("strategy: fixed trains the one subnet given by arch, and arch needs strategy fixed")
        if self.init_from and not self.arch:
            raise HwawareError("init_from: only a fixed-subnet run (--arch) starts from a trained supernet")
        for name in ("epochs", "batch_size", "eval_batch_size", "aug_repeats"):
            if int(getattr(self, name)) < 1:
                raise HwawareError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "smoothing", "mixup", "cutmix",
                     "reprob", "num_random", "checkpoint_every", "num_workers", "threads", "global_batch", "val_images"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise HwawareError(f"{name}: must be a finite number >= 0, got {value}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.ema_decay < 1:
            raise HwawareError("drop_path and ema_decay: must be in [0, 1)")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise HwawareError(f"batch_size: mixup/cutmix need an even batch size, got {self.batch_size}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise HwawareError(f"amp: {self.amp!r} is not one of auto, bf16, fp16, off")
        if self.min_lr > self.lr:
            raise HwawareError(f"min_lr: {self.min_lr:g} is above the peak lr {self.lr:g}")
        if self.seed < 0:
            raise HwawareError(f"seed: must be >= 0, got {self.seed}")
        workers = max(os.cpu_count() or 1, 1) * 4
        if self.num_workers > workers:
            raise HwawareError(f"num_workers: {self.num_workers} data-loader processes on {os.cpu_count()} cores; "
                               f"use at most {workers}")
        if self.compute_device != "auto" and self.compute_device.split(":")[0] not in ("cpu", "cuda"):
            raise HwawareError(f"compute_device: {self.compute_device!r} is not auto, cpu, cuda or cuda:N")
        for name, (low, high) in bounds.TRAINING.items():  # a recipe YAML meets the bounds of the CLI's flags
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise HwawareError(f"{name}: must be in {low}..{high}, got {excerpt(value)}")
        return self

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimizer step that make `global_batch` from `batch_size` on `world` ranks."""
        per_pass = self.batch_size * world
        if not self.global_batch:
            return 1
        if self.global_batch % per_pass:
            raise HwawareError(f"global_batch: {self.global_batch} is not a multiple of batch_size {self.batch_size} "
                               f"x {world} ranks; choose a batch size that divides it")
        return self.global_batch // per_pass

    def fixed_arch(self, space: SearchSpace) -> Arch | None:
        """The subnet a fixed run trains, checked against `space`; None for a supernet run."""
        if not self.arch:
            return None
        try:
            data = json.loads(self.arch)
        except ValueError:
            raise HwawareError(f"arch: not an Arch in JSON ({self.arch[:60]!r})") from None
        return space.validate(Arch.from_dict(data))

    def identity(self, space: SearchSpace) -> dict[str, Any]:
        """What makes two runs the same run: the resolved space, every setting that shapes learning, and the
        SHA-256 of the checkpoint a fine-tuning run starts from (same path, other weights: another run)."""
        learned = {k: v for k, v in asdict(self).items() if k not in self.OPERATIONAL and k != "space"
                   and not (k in self.ADDED_OFF and v == self.ADDED_OFF[k])}
        if self.init_from:
            learned["init_sha256"] = _file_sha256(self.init_from)
        return {"space": space.to_dict(), **learned}


def _file_sha256(path: str | Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise HwawareError(f"init_from: cannot read {path} ({exc.strerror or exc})") from None


RECIPES: dict[str, dict[str, Any]] = {
    # The embedded default: the TrainConfig defaults, sandwich (largest, smallest, 1 random; distilled), 80 epochs,
    # AdamW 5e-3, weight decay 0.5. Val top-1 largest / smallest / middle on this 2-core CPU (--threads 1):
    #   this recipe, 312 s training under load 2-4 (~2.2 s/epoch unloaded): 0.985 / 0.963 / 0.959 (test 0.981 / 0.967 / 0.974)
    #   the same at 60 epochs, 298 s under load ~4: 0.978 / 0.941 / 0.970 (test 0.989 / 0.948 / 0.970)
    #   the old one (uniform, 120 epochs, lr 2e-3, wd 0.05), 220 s: 0.963 / 0.815 / 0.937
    #   uniform at lr 5e-3, wd 0.5, 100 epochs: 0.967 / 0.889 / 0.959 (smallest lags: uniform seldom draws it)
    # Each subnet overfits 1257 images (train loss at the smoothing floor), so weight decay, not more epochs, is
    # what raises val; pixel shifts / small affine jitter slowed learning so much they cost 0.2+ in 60 epochs.
    "digits": {},
    # Animal-MNIST (`--data animals`, space `animals`): sandwich (distilled) as digits, 60 epochs, AdamW 2e-3, weight
    # decay 0.05 (6,000 images are not memorised as digits' 1,257 are, and mirror + 2-pixel shifts augment them).
    # Val top-1 largest / smallest / middle on this 2-core CPU (--threads 1, sharing it with 2-6 other processes):
    #   this recipe, 900 s (27 s/epoch at load ~7, 10 s/epoch at load ~2): 0.938 / 0.657 / 0.804
    #   the same with uniform sampling, 525 s: 0.835 / 0.565 / 0.770
    #   the largest subnet alone (--arch largest), 30 epochs: 0.906 (before duplicates were dropped from the split)
    "animals": {"epochs": 60, "lr": 2e-3, "weight_decay": 0.05},
    # AutoFormer's supernet recipe, which is DeiT's: 500 epochs, AdamW cosine to 1e-5 with 5 warm-up epochs,
    # RandAugment, random erasing, mixup 0.8 / cutmix 1.0, label smoothing 0.1, drop path 0.1, no clipping,
    # repeated augmentation (3 copies), and AutoFormer's uniform sampling: one random subnet per step.
    # Sandwich (--strategy sandwich) costs 3.07x the FLOPs per step on autoformer-t (largest + smallest + one random
    # vs one random: 1.35 + 2.55 + 1.88 vs 1.88 GFLOPs, hwaware.costs over 2,000 sampled subnets): 500 epochs are ~1,535
    # uniform epochs of GPU time, for a gain measured only on digits/animals, so it is not this recipe's default.
    # The peak lr 1e-3 is DeiT's 5e-4 x 1024 / 512 (linear scaling) for the global batch 1024 (8 GPUs x 128); on
    # fewer GPUs gradient accumulation keeps that global batch, so the lr holds. With another --global-batch,
    # scale --lr by the same factor.
    # Each epoch validates the 3 tracked subnets on a fixed class-stratified 10,000 of val (3 x 50,000 otherwise).
    "imagenet": {
        "epochs": 500, "batch_size": 128, "global_batch": 1024, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 5.0,
        "weight_decay": 0.05, "drop_path": 0.1, "clip_grad": 0.0, "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0,
        "strategy": "uniform", "auto_augment": "rand-m9-mstd0.5-inc1", "aug_repeats": 3, "reprob": 0.25,
        "num_workers": 8, "checkpoint_every": 1000, "eval_batch_size": 256, "val_images": 10000,
    },
}


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a recipe (built-in name or YAML file of TrainConfig fields) plus explicit overrides.

    With no recipe, `digits` and `animals` data get their own recipe and everything else the ImageNet one.
    An `arch` (Arch or its JSON) makes it a fixed-subnet run: strategy `fixed`, and distillation only
    when it starts from a supernet (`init_from`), the one teacher it can have.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("arch"), Arch):
        overrides["arch"] = overrides["arch"].to_json()
    if overrides.get("arch"):
        overrides["strategy"] = "fixed"
        if not overrides.get("init_from"):
            overrides["distill"] = False
    if recipe is None:
        data = overrides.get("data", "digits")
        recipe = data if data in ("digits", "animals") else "imagenet"
    if recipe in RECIPES:
        values = dict(RECIPES[recipe])
    else:
        path = Path(recipe)
        if not path.exists():
            raise HwawareError(f"recipe: {excerpt(recipe)} is neither a built-in recipe ({', '.join(RECIPES)}) nor a file")
        values = read_yaml(path, "recipe")
        if not isinstance(values, dict):
            raise HwawareError(f"recipe: {path}: expected a mapping of training settings")
    known = {f.name: f.type for f in fields(TrainConfig)}
    merged = {**values, **overrides}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise HwawareError(f"recipe: unknown setting {unknown[0]!r} (known: {', '.join(known)})")
    defaults = TrainConfig()
    typed = {}
    for key, value in merged.items():
        cast = type(getattr(defaults, key))
        try:
            typed[key] = cast(value) if cast is not bool else bool(value)
        except (TypeError, ValueError):
            raise HwawareError(f"recipe: {key} must be {cast.__name__}, got {value!r}") from None
    return TrainConfig(**typed).validate()


# ---- the training step ----------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU has bf16 tensor cores (compute capability 8.0+: A100, H100, RTX 30xx on), fp16
    with a grad scaler before. Not `torch.cuda.is_bf16_supported()`: it is True on a V100, which emulates bf16."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target_probs * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class SupernetTrainer:
    """One supernet, its optimizer, schedule, scaler and EMA, and the step of either strategy.

    Composable on its own (a notebook can call `train_step` on its own batches); `train_supernet`
    adds data, checkpoints and logging around it.
    """

    def __init__(self, config: TrainConfig, space: SearchSpace, steps_per_epoch: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2, param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler

        self.config, self.space, self.rank = config, space, rank
        self.device = torch.device(device)
        _seed_all(mix_seed(config.seed, INIT_STREAM))  # the seed alone decides the initial weights
        self.model = SuperViT(space, config.drop_path).to(self.device)
        self.fixed = config.fixed_arch(space)
        self.teacher: SuperViT | None = None
        if config.init_from:
            supernet, _ = load_supernet(config.init_from, space)
            self.model.load_state_dict(supernet.state_dict())
            if config.distill:
                self.teacher = supernet.to(self.device).requires_grad_(False)
        self.world_size, self._ddp = world_size, None
        groups = param_groups_weight_decay(self.model, config.weight_decay, no_weight_decay_list=("cls_token", "pos_embed"))
        self.optimizer = create_optimizer_v2(groups, "adamw", lr=config.lr, weight_decay=config.weight_decay)
        total = config.epochs * steps_per_epoch
        asked = int(round(config.warmup_epochs * steps_per_epoch))
        warmup = min(asked, total // 2)  # at most half a short run
        # what the run's first line says when the cap bit
        self.warmup_note = (f"; warm-up {warmup} steps, not the {asked} of --warmup-epochs {config.warmup_epochs:g} "
                            f"(at most half of the run's {total})" if warmup < asked else "")
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(total - warmup, 1), lr_min=config.min_lr, warmup_t=warmup,
            warmup_lr_init=config.lr * 1e-3, warmup_prefix=True, t_in_epochs=False,
        )
        self.scheduler.step_update(0)
        self.amp_dtype = _amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if config.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.ema_decay)
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                               num_classes=space.num_classes)
        self.step = 0

    @property
    def ddp(self) -> nn.Module:
        """The module the step runs: DDP under several ranks, made on first use, so after a resumed state is
        loaded (DDP starts by broadcasting rank 0's weights; rank 0's whole state is loaded everywhere first)."""
        if self._ddp is None:
            self._ddp = self.model
            if self.world_size > 1:  # depth varies, so the deeper blocks are unused in some steps
                self._ddp = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=True,
                )
        return self._ddp

    # -- which subnets a step trains
    def step_archs(self, step: int) -> list[Arch]:
        """Uniform: one random subnet. Sandwich: largest, smallest, then `num_random` random ones. Fixed: its Arch."""
        if self.fixed is not None:
            return [self.fixed]
        rng = random.Random(mix_seed(self.config.seed, ARCH_STREAM, step))
        if self.config.strategy == "uniform":
            return [self.space.sample(rng)]
        randoms = [self.space.sample(rng) for _ in range(self.config.num_random)]
        return [self.space.largest(), self.space.smallest(), *randoms]

    def _hard_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 2:  # mixup / cutmix soft targets
            return soft_cross_entropy(logits, targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.config.smoothing)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer update on one batch; returns the mean loss over the subnets it trained."""
        return self.accumulated_step([(images, targets)])

    def accumulated_step(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One optimizer update on the summed gradients of several micro-batches (gradient accumulation): the
        step's subnet(s) on each, each loss weighted 1 / len(batches), so N micro-batches of B images step as
        one batch of N x B; returns the mean loss."""
        self.model.train()
        _seed_all(mix_seed(self.config.seed, NOISE_STREAM, self.step, self.rank))
        archs = self.step_archs(self.step)
        autocast = {"device_type": self.device.type, "dtype": self.amp_dtype, "enabled": self.amp_dtype is not None}
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for m, (images, targets) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            teacher = None
            if self.teacher is not None:  # fine-tuning: the frozen supernet's largest subnet is the teacher
                with torch.no_grad(), torch.autocast(**autocast):
                    teacher = self.teacher(images, arch=self.space.largest()).float().softmax(dim=-1)
            for i, arch in enumerate(archs):
                # Accumulate locally; DDP all-reduces once, on the very last backward (unused-parameter grads included).
                sync = (m == len(batches) - 1 and i == len(archs) - 1) or self.ddp is self.model
                with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                    with torch.autocast(**autocast):
                        logits = self.ddp(images, arch=arch)
                        if teacher is not None:
                            loss = soft_cross_entropy(logits, teacher)
                        else:
                            loss = self._hard_loss(logits, targets)
                    if i == 0 and len(archs) > 1 and self.config.distill:
                        teacher = logits.detach().float().softmax(dim=-1)
                    self.scaler.scale(loss / len(batches)).backward()
                losses.append(loss.detach())
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return float(torch.stack(losses).mean())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def eval_model(self) -> SuperViT:
        """The weights to evaluate and ship: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.scheduler.step_update(self.step)


def tracked_archs(space: SearchSpace, fixed: Arch | None = None) -> dict[str, Arch]:
    """The subnets each epoch's val top-1 is logged for (metrics columns val_top1_<name>)."""
    if fixed is not None:
        return {"subnet": fixed}
    return {"largest": space.largest(), "smallest": space.smallest(), "middle": space.middle()}


# ---- the run --------------------------------------------------------------------------------------


class _Log:
    """Messages on rank 0 (stderr), progress there unless `progress` is off (a bar on a terminal, plain lines in a
    log: hwaware.progress), TensorBoard when installed."""

    def __init__(self, out: Path, main_rank: bool, progress: bool, step: int):
        self.enabled, self.progress = main_rank, main_rank and progress
        self.tb = None
        if main_rank:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step)
            except ImportError:
                pass

    def say(self, message: str) -> None:
        if self.enabled:
            write(message)

    def bar(self, total: int, initial: int, desc: str):
        return progress(total=total, initial=initial, desc=desc, unit="step", disable=not self.progress,
                        dynamic_ncols=True, leave=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def val_summary(row: dict[str, Any]) -> str:
    """`largest 0.9850 smallest 0.9630 middle 0.9590` (or `subnet 0.8810`) from a metrics row."""
    return " ".join(f"{k.removeprefix('val_top1_')} {v:.4f}" for k, v in row.items() if k.startswith("val_top1_"))


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def train_supernet(config: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train (or resume, or find complete) the supernet run in `config.out`; returns the last epoch's metrics row.

    Callable from a notebook; `hwaware train` and `torchrun ... hwaware train` call it too.
    """
    config = (config or make_config(**overrides)).validate()
    space = get_space(config.space)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device, owned_group = setup_distributed(config.compute_device)
    out = Path(config.out)
    try:
        # Data first: a bad spec must fail (on every rank) before the run folder is claimed.
        train_data, val_data, accumulation = on_every_rank(lambda: _prepare(config, space, world, rank))
        _check_same_settings(config, space, len(train_data), rank)
        with contextlib.ExitStack() as held:
            def claim() -> None:  # rank 0 alone owns the run folder; other nodes' --out is never read
                if rank == 0:
                    held.enter_context(folder_lock(out, "train"))
                    claim_run_dir(out, config.identity(space))

            on_every_rank(claim)
            with deferred_stop():
                return _run(config, space, out, rank, world, device, train_data, val_data, accumulation)
    finally:
        if owned_group:
            dist.destroy_process_group()


def _prepare(config: TrainConfig, space: SearchSpace, world: int, rank: int):
    """The datasets and micro-batches per step, or the HwawareError that stops the run before it claims a folder."""
    train_data = build_dataset(config.data, space, "train", augment=True,
                               auto_augment=config.auto_augment or None, reprob=config.reprob)
    val_data = build_dataset(config.data, space, "val")
    config.fixed_arch(space)  # an Arch outside the space, or a supernet of another, fails here too
    if config.init_from:
        load_supernet(config.init_from, space)
    accumulation = config.accumulation(world)
    if _steps_per_epoch(len(train_data), config, world, rank, accumulation) == 0:
        raise HwawareError(f"batch_size: {config.batch_size} x {world} ranks x {accumulation} accumulated exceeds the "
                           f"{len(train_data)} training images")
    return train_data, val_data, accumulation


def _check_same_settings(config: TrainConfig, space: SearchSpace, train_images: int, rank: int) -> None:
    """Every rank must run rank 0's run: the same learned settings and as many training images (the data path
    may differ between nodes). A node started with other flags stops every rank with one line, not a hang."""
    mine = {**config.identity(space), "train_images": train_images}
    mine.pop("data")
    theirs = from_rank0(lambda: mine)
    difference = first_difference(theirs, mine)

    def compare() -> None:
        if difference:
            raise HwawareError(f"train: rank {rank} was started with other settings than rank 0 ({difference}); "
                               "start every node with the same command")

    on_every_rank(compare)


def _steps_per_epoch(images: int, config: TrainConfig, world: int, rank: int, accumulation: int = 1) -> int:
    """Optimizer steps per epoch: whole accumulated batches of this rank's share."""
    return len(ResumableSampler(images, True, world_size=world, rank=rank)) // config.batch_size // accumulation


def _check_same_run(state: dict[str, Any], config: TrainConfig, space: SearchSpace, path: Path) -> None:
    """Refuse a last.pt that another run wrote (copied into this folder): it must have this run's identity."""
    saved = state.get("config")
    try:
        theirs = TrainConfig(**{k: v for k, v in dict(saved).items() if k in TrainConfig.__dataclass_fields__})
    except (TypeError, ValueError):
        raise HwawareError(f"checkpoint: {path} holds no readable training config") from None
    difference = first_difference(theirs.identity(space), config.identity(space))
    if difference:
        raise HwawareError(f"checkpoint: {path} was written by another run ({difference}); it cannot be resumed here")


def _read_resume_state(path: Path, config: TrainConfig, space: SearchSpace) -> dict[str, Any] | None:
    """Rank 0's last.pt, checked to be this run's, or None for a fresh start."""
    if not path.exists():
        return None
    state = read_checkpoint(path)
    if state.get("space") != space.to_dict():
        raise HwawareError(f"checkpoint: {path} was trained for another space than {space.name!r}")
    _check_same_run(state, config, space, path)
    return state


def validation_subset(dataset, images: int):
    """A fixed class-stratified draw of `images` items of `dataset` (the scorer's), or all of it for 0: the same
    images on every rank, in every epoch and every run, so val curves compare."""
    if not images or images >= len(dataset):
        return dataset
    chosen = stratified_sample(dataset_targets(dataset), images, VAL_SUBSET_SEED)
    return torch.utils.data.Subset(dataset, chosen.tolist())


def _run(config: TrainConfig, space: SearchSpace, out: Path, rank: int, world: int, device: torch.device,
         train_data, val_data, accumulation: int) -> dict:
    checkpoint_path = out / CHECKPOINT_FILE
    state = from_rank0(lambda: _read_resume_state(checkpoint_path, config, space))  # rank 0's file is the truth
    val_subset = validation_subset(val_data, config.val_images)
    pin = device.type == "cuda"
    val_loader = build_run_loader(val_subset, config.eval_batch_size, False, rank=rank, world_size=world,
                                  num_workers=config.num_workers, pin_memory=pin)
    train_loader = build_run_loader(train_data, config.batch_size, True, seed=config.seed, rank=rank, world_size=world,
                                    num_workers=config.num_workers, aug_repeats=config.aug_repeats, pin_memory=pin)
    steps_per_epoch = _steps_per_epoch(len(train_data), config, world, rank, accumulation)
    trainer = SupernetTrainer(config, space, steps_per_epoch, device, rank, world)
    epoch, batch, loss_sum, loss_count, seconds, history = 0, 0, 0.0, 0, 0.0, []
    log = _Log(out, rank == 0, config.progress, step=int(state["step"]) if state else 0)
    if state is not None:
        trainer.load_state_dict(state)
        set_rng_states(state["rng"])
        epoch, batch = int(state["epoch"]), int(state["batch"])
        loss_sum, loss_count = float(state["loss_sum"]), int(state["loss_count"])
        seconds, history = float(state["train_seconds"]), list(state["history"])
        if state.get("complete"):
            log.say(f"{out}: already complete ({config.epochs} epochs); nothing to do")
            return history[-1]
        log.say(f"{out}: resuming at epoch {epoch + 1}, batch {batch}, step {trainer.step}")
        if rank and os.environ.get("LOCAL_RANK", "0") == "0":  # each other node's log says where it went on
            write(f"rank {rank}: resuming from rank 0's checkpoint at epoch {epoch + 1}, step {trainer.step}")
    del state  # on every rank: a checkpoint's worth of memory
    images_per_step = config.batch_size * world * accumulation
    if config.progress:  # --quiet: errors and the stop line only
        log.say(f"{out}: global batch {images_per_step} = {config.batch_size} per rank x {world} ranks x {accumulation} "
                f"accumulated, peak lr {config.lr:g}; {config.strategy} sampling; validation on {len(val_subset)} of "
                f"{len(val_data)} val images{trainer.warmup_note}")

    def checkpoint(complete: bool = False) -> None:
        if rank != 0:
            return
        check_finite(trainer.model.state_dict(), f"step {trainer.step}")  # never overwrite good weights with NaN
        save_checkpoint(checkpoint_path, {
            **trainer.state_dict(), "rng": rng_states(), "space": space.to_dict(), "data": config.data,
            "config": asdict(config), "arch": trainer.fixed.to_dict() if trainer.fixed else None, "versions": versions(), "epoch": epoch, "batch": batch, "complete": complete,
            "loss_sum": loss_sum, "loss_count": loss_count, "train_seconds": seconds, "history": history,
        })
        _write_metrics(out / METRICS_FILE, history)

    while epoch < config.epochs:
        train_loader.sampler.set_epoch(epoch, batch * config.batch_size)
        bar = log.bar(steps_per_epoch, batch // accumulation, f"epoch {epoch + 1}/{config.epochs}")
        started = time.perf_counter()
        micro_batches = iter(train_loader)
        while batch < steps_per_epoch * accumulation:
            tick = time.perf_counter()
            loss = trainer.accumulated_step([next(micro_batches) for _ in range(accumulation)])
            if not math.isfinite(loss):
                raise HwawareError(f"train: the loss became {loss} at step {trainer.step} (epoch {epoch + 1}, batch "
                                   f"{batch + accumulation}); {checkpoint_path} keeps the last good state: lower --lr "
                                   "or set --clip-grad, then run again in a new --out")
            loss_sum, loss_count, batch = loss_sum + loss, loss_count + 1, batch + accumulation
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{trainer.lr:.2e}",
                            img_s=f"{images_per_step / (time.perf_counter() - tick):.0f}", refresh=False)
            log.scalars({"train/loss": loss, "train/lr": trainer.lr}, trainer.step)
            if (config.checkpoint_every and trainer.step % config.checkpoint_every == 0
                    and batch < steps_per_epoch * accumulation):
                seconds += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint()
            if stop_requested():  # SIGTERM/SIGINT (hwaware.stopping): keep this step, then leave
                seconds += time.perf_counter() - started
                checkpoint()
                stop_here(f"{checkpoint_path} at step {trainer.step}")
        del micro_batches  # a persistent loader's iterator: the next epoch's iter() reuses its workers
        bar.close()
        seconds += time.perf_counter() - started
        row: dict[str, Any] = {"epoch": epoch + 1, "step": trainer.step, "lr": trainer.lr,
                               "train_loss": loss_sum / max(loss_count, 1)}
        for name, arch in tracked_archs(space, trainer.fixed).items():
            row[f"val_top1_{name}"] = evaluate(trainer.eval_model, arch, val_loader, device)["top1"]
        row["train_seconds"] = round(seconds, 2)
        history.append(row)
        log.scalars({f"val/{k}": v for k, v in row.items() if k.startswith("val_")}, trainer.step)
        log.say(f"epoch {epoch + 1}/{config.epochs}  loss {row['train_loss']:.4f}  val top-1 {val_summary(row)}"
                f"  ({seconds:.0f} s)")
        epoch, batch, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
        checkpoint(complete=epoch == config.epochs)
    log.close()
    return history[-1]
