"""`hwaware train` and `hwaware evaluate`: supernet or fixed-subnet training (DDP under torchrun) and top-1 of a subnet."""

from __future__ import annotations

import argparse
import os

from hwaware.bounds import TRAINING
from hwaware.cli import bounded
from hwaware.io import dumps_strict

_TRAIN_FLAGS = ("space", "data", "out", "strategy", "num_random", "epochs", "batch_size", "global_batch", "lr", "min_lr",
                "warmup_epochs", "weight_decay", "drop_path", "clip_grad", "ema_decay", "amp", "aug_repeats", "seed",
                "checkpoint_every", "num_workers", "val_images", "compute_device", "threads", "init_from", "distill")


def cmd_train(args: argparse.Namespace) -> None:
    from hwaware.cli._scoring import deprecated_device
    from hwaware.space import get_space, resolve_arch
    from hwaware.train import make_config, train_supernet, val_summary

    deprecated_device(args, "train")
    arch = resolve_arch(args.arch, get_space(args.space)) if args.arch else None
    config = make_config(args.recipe, **{k: getattr(args, k) for k in _TRAIN_FLAGS}, arch=arch, progress=not args.quiet)
    _check_open_files(config.num_workers)
    row = train_supernet(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        from pathlib import Path

        from hwaware.project import PROJECT_FILE, remember_after_success

        if remember_after_success("train", space=args.space, checkpoint=Path(config.out) / "last.pt"):
            print(f"{PROJECT_FILE} records space {args.space} and checkpoint {config.out}/last.pt for search and export")
        print(f"{config.out}: epoch {row['epoch']}/{config.epochs}, val top-1 {val_summary(row)}; "
              f"checkpoint {config.out}/last.pt, metrics {config.out}/metrics.csv")


def _check_open_files(workers: int) -> None:
    """Loader workers hand batches over as file descriptors: under a tiny `ulimit -n` they fail with a
    traceback in a worker and the training hangs. Raise the soft limit where the hard one allows, else say so."""
    import resource

    from hwaware.errors import HwawareError

    needed = 24 + 4 * workers  # measured: 2 workers train under 32, not under 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not workers or soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(hard, 4 * needed), hard))
        return
    raise HwawareError(f"workers: {workers} data-loader processes need at least {needed} open files, and the limit "
                       f"(ulimit -n) is {hard}; raise it or train with --workers 0")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import os

    from hwaware.cli._scoring import deprecated_device, scoring_options
    from hwaware.evaluation import evaluate_checkpoint

    deprecated_device(args, "evaluate")
    options = scoring_options(args)
    images, seed = options.pop("images", None), options.pop("seed", 0)
    result = evaluate_checkpoint(args.checkpoint, args.arch, split=args.split, data=args.data, images=images,
                                 seed=seed, **options)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank holds the reduced figures; one prints
        return
    if args.json:
        print(dumps_strict(result))
        return
    top5 = f"  top-5 {result['top5']:.4f}" if "top5" in result else ""
    from hwaware.space import Arch

    print(f"{result['split']} top-1 {result['top1']:.4f}{top5}  ({result['images']} of {result['data']}, "
          f"arch {Arch.from_dict(result['arch']).short()}, epoch {result['epoch']})")


def register(sub) -> None:
    train = sub.add_parser("train", help="train a supernet (resumes when run again; DDP under torchrun)")
    train.add_argument("--space", required=True, help="built-in space name or YAML file")
    train.add_argument("--data", required=True,
                       help="digits, animals, synthetic, imagefolder:PATH, cifar10:PATH or cifar100:PATH")
    train.add_argument("--out", required=True, help="run folder: last.pt, metrics.csv, run.json")
    train.add_argument("--recipe", help="built-in recipe (digits, animals, imagenet) or YAML of settings; default: the "
                       "one named like --data (digits, animals), else imagenet")
    train.add_argument("--arch", help="train this one subnet (an Arch YAML, or largest/smallest/middle) instead of "
                       "the supernet; its checkpoint works with evaluate, search and export")
    train.add_argument("--init-from", dest="init_from", help="with --arch: start from this supernet checkpoint's "
                       "weights (same space) and distil from its largest subnet (see --no-distill)")
    train.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                       help="sandwich: distil smaller subnets from the largest; --arch --init-from: from the "
                       "supernet's largest (default on)")
    train.add_argument("--strategy", choices=["uniform", "sandwich"], help="subnet sampling: uniform = one random "
                       "subnet per step (AutoFormer; the imagenet recipe), sandwich = largest + smallest + --num-random "
                       "random ones (digits, animals), 3.07x uniform's FLOPs per step on autoformer-t; --arch trains "
                       "one subnet")
    train.add_argument("--num-random", dest="num_random", type=bounded(int, *TRAINING["num_random"]), help="sandwich: random subnets per step")
    train.add_argument("--epochs", type=bounded(int, *TRAINING["epochs"]))
    train.add_argument("--batch-size", dest="batch_size", type=bounded(int, *TRAINING["batch_size"]), help="per process and "
                       "micro-batch")
    train.add_argument("--global-batch", dest="global_batch", type=bounded(int, *TRAINING["global_batch"]),
                       help="images per optimizer step over all processes, reached by gradient accumulation (imagenet: "
                       "1024, the batch its --lr is for: 8 GPUs x 128, or 2 x 128 x 4 accumulated); 0 = batch x "
                       "processes. With another global batch, scale --lr by the same factor")
    train.add_argument("--lr", type=bounded(float, *TRAINING["lr"]), help="peak learning rate (AdamW, cosine with warm-up)")
    train.add_argument("--min-lr", dest="min_lr", type=bounded(float, *TRAINING["min_lr"]))
    train.add_argument("--warmup-epochs", dest="warmup_epochs", type=bounded(float, *TRAINING["warmup_epochs"]))
    train.add_argument("--weight-decay", dest="weight_decay", type=bounded(float, *TRAINING["weight_decay"]))
    train.add_argument("--drop-path", dest="drop_path", type=bounded(float, *TRAINING["drop_path"]))
    train.add_argument("--clip-grad", dest="clip_grad", type=bounded(float, *TRAINING["clip_grad"]), help="max gradient norm (0: off)")
    train.add_argument("--ema-decay", dest="ema_decay", type=bounded(float, *TRAINING["ema_decay"]), help="keep an EMA of the weights (0: off)")
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision on CUDA (auto: bf16 on "
                       "compute capability 8.0+, fp16 with a grad scaler before, e.g. V100, T4)")
    train.add_argument("--aug-repeats", dest="aug_repeats", type=bounded(int, *TRAINING["aug_repeats"]), help="repeated augmentation: "
                       "copies of each image per epoch, on different processes (imagenet: 3; 1 = off)")
    train.add_argument("--seed", type=bounded(int, *TRAINING["seed"]))
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=bounded(int, *TRAINING["checkpoint_every"]), help="steps between checkpoints")
    train.add_argument("--workers", dest="num_workers", type=bounded(int, *TRAINING["num_workers"]), help="data loader processes per "
                       "process and loader, started once and kept for the whole run")
    train.add_argument("--val-images", dest="val_images", type=bounded(int, *TRAINING["val_images"]), help="validate each epoch on this "
                       "many val images, a fixed class-stratified draw (imagenet: 10000; 0 = all)")
    train.add_argument("--compute-device", dest="compute_device", help="torch device: auto (this rank's GPU if any, "
                       "else cpu), cpu, cuda, cuda:N (default auto)")
    train.add_argument("--device", dest="torch_device", help=argparse.SUPPRESS)  # deprecated: --compute-device
    train.add_argument("--threads", type=bounded(int, *TRAINING["threads"]), help="CPU threads for torch (default: torch's)")
    train.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="top-1 / top-5 of one subnet of a trained supernet")
    ev.add_argument("--checkpoint", required=True, help="a supernet checkpoint (RUN/last.pt)")
    ev.add_argument("--arch", help="largest, smallest, middle or an Arch YAML (default: the subnet a --arch run "
                    "trained, else largest)")
    ev.add_argument("--split", choices=["val", "test"], default="val")
    ev.add_argument("--data", help="dataset spec (default: the one the supernet was trained on)")
    ev.add_argument("--device", dest="torch_device", help=argparse.SUPPRESS)  # deprecated: --compute-device
    ev.add_argument("--json", action="store_true", help="print one JSON object (top1, top5 as fractions 0..1)")
    from hwaware.cli._scoring import add_scoring_flags

    add_scoring_flags(ev, images_help="score a class-stratified draw of this many images (default: all of the split)",
                      cache=False)
    ev.add_argument("--batch-size", dest="score_batch_size", type=bounded(int, 1, 65536), help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evaluate)
