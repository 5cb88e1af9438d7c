"""The scoring flags `search`, `export` and `evaluate` share: which images, where and how they are scored."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hwaware.cli import bounded


def _image_count(text: str) -> int | str:
    if text == "all":
        return text
    return bounded(int, 1, 10**9)(text)


_image_count.__name__ = "count"


def add_scoring_flags(parser: argparse.ArgumentParser, *, images_help: str, batch_default: int = 256,
                      cache: bool = True) -> None:
    """The flags `scoring_options` reads; `cache` for commands that score the same images more than once."""
    group = parser.add_argument_group("scoring")
    group.add_argument("--score-images", dest="score_images", type=_image_count, help=images_help)
    group.add_argument("--score-seed", dest="score_seed", type=bounded(int, 0), default=0,
                       help="seed of the class-stratified draw of scored images (default 0)")
    group.add_argument("--compute-device", dest="compute_device", default="auto",
                       help="torch device that scores: auto (this rank's GPU if any, else cpu), cpu, cuda, cuda:N")
    group.add_argument("--score-precision", dest="score_precision", default="auto",
                       help="autocast while scoring: auto (bf16 on GPUs with native bf16, i.e. compute capability "
                       "8.0+; fp16 on older GPUs; fp32 on the CPU), fp32, bf16 or fp16")
    group.add_argument("--score-batch-size", dest="score_batch_size", type=bounded(int, 1, 65536), default=batch_default,
                       help=f"images per scoring batch (default {batch_default})")
    group.add_argument("--workers", dest="workers", type=bounded(int, 0, 1024),
                       help="image loader processes (default: up to 8 for image folders, 0 for in-memory data)")
    group.add_argument("--threads", type=bounded(int, 1, 4096), help="torch CPU threads (default: torch's)")
    if cache:
        group.add_argument("--score-cache-mib", dest="score_cache_mib", type=bounded(float, 0, 2**24),
                           help="decoded images (uint8) kept in memory per process between subnets (default 2048)")


def scoring_options(args: argparse.Namespace) -> dict[str, Any]:
    """`build_scorer`'s keyword arguments from the parsed flags (those left out keep the library's defaults)."""
    options = {"images": args.score_images, "seed": args.score_seed, "device": args.compute_device,
               "precision": args.score_precision, "batch_size": args.score_batch_size, "workers": args.workers,
               "threads": args.threads, "cache_mib": getattr(args, "score_cache_mib", None)}
    return {key: value for key, value in options.items() if value is not None}


def deprecated_device(args: argparse.Namespace, command: str) -> None:
    """`train --device` and `evaluate --device` (a torch device) predate `--compute-device`: honoured, with one
    warning line."""
    if getattr(args, "torch_device", None) is not None:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one warning
            print(f"hwaware {command}: warning: --device is deprecated here; it names the compute device, which is "
                  "--compute-device now (--device means a latency device profile elsewhere)", file=sys.stderr)
        args.compute_device = args.torch_device
