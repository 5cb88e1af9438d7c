"""Ranges of numeric settings, one table per vocabulary, shared by the CLI's flags and the files that set
the same things (recipe YAML, device profiles, table sidecars): a value refused on the command line is
refused from a file too, so a warm-up of 1e10 or 100,000 threads is never run. Kept free of heavy imports:
the CLI reads it while building its parser."""

from __future__ import annotations

TRAINING: dict[str, tuple[float, float]] = {
    "num_random": (0, 64), "epochs": (1, 100_000), "batch_size": (1, 65536), "eval_batch_size": (1, 65536),
    "lr": (0, 10), "min_lr": (0, 10), "warmup_epochs": (0, 100_000), "weight_decay": (0, 100), "drop_path": (0, 0.99),
    "clip_grad": (0, 1e6), "ema_decay": (0, 0.99999), "seed": (0, 2**32 - 1), "checkpoint_every": (0, 10**9),
    "num_workers": (0, 256), "threads": (0, 1024),  # threads 0: torch's default
    "global_batch": (0, 1 << 24), "aug_repeats": (1, 16), "val_images": (0, 10**9),
}

MEASUREMENT: dict[str, tuple[float, float]] = {
    "warmup": (0, 100_000), "min_repeats": (1, 1_000_000), "min_time_s": (0, 3600), "max_repeats": (1, 10_000_000),
    "threads": (1, 1024), "anchor_every": (1, 100_000), "subnet_rounds": (1, 100), "drift_tolerance": (0, 10),
    "max_remeasure": (0, 100),
    "fit_subnets": (3, 1000), "holdout_subnets": (0, 1000),
}
