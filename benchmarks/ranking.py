"""Does a supernet rank subnets the way training them would? Inherited against standalone top-1.

    .venv/bin/python benchmarks/ranking.py --space animals --data animals \\
        --supernet uniform=runs/animals-uniform/last.pt --supernet sandwich=runs/animals/last.pt \\
        --runs runs/ranking --jobs 2

Picks N subnets spread over the space (a fixed seed: 10 N uniform samples sorted by parameter
count, then N evenly spaced along that order, so small, middle and large subnets all appear),
trains each standalone with `hwaware train --arch` machinery (the data's recipe, or --recipe /
--epochs; runs under --runs resume and are reused when complete), and scores every subnet on
val + test together (the images no training saw) both standalone and with the weights it
inherits from each supernet. Prints a line per subnet, the standalone spread, Kendall tau and
Spearman rho between inherited and standalone top-1, and the mean inherited-minus-standalone gap.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hwaware.errors import HwawareError
from hwaware.pipeline import standard_costs
from hwaware.space import Arch, SearchSpace, get_space

SPLITS = ("val", "test")
POOL_PER_SUBNET = 10


def spread_subnets(space: SearchSpace, count: int, seed: int) -> list[Arch]:
    """`count` distinct subnets evenly spaced in parameter count among 10 x `count` uniform samples."""
    rng = random.Random(seed)
    params = standard_costs(space)["params_m"]
    pool = sorted({space.sample(rng) for _ in range(POOL_PER_SUBNET * count)}, key=lambda a: (params(a), a.to_json()))
    if len(pool) < count:
        raise HwawareError(f"--subnets: space {space.name} gave only {len(pool)} distinct subnets")
    return [pool[round(i * (len(pool) - 1) / (count - 1))] for i in range(count)]


def top1_on_splits(model, arch: Arch, loaders: dict) -> float:
    """Top-1 over all images of `loaders` (val + test), as a fraction."""
    from hwaware.evaluation import evaluate

    hits = images = 0
    for loader in loaders.values():
        result = evaluate(model, arch, loader, distributed=False)
        hits += result["top1"] * result["n"]
        images += result["n"]
    return hits / images


def rank_correlations(inherited: list[float], standalone: list[float]) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    return float(kendalltau(inherited, standalone).statistic), float(spearmanr(inherited, standalone).statistic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="animals")
    parser.add_argument("--data", default="animals")
    parser.add_argument("--supernet", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a trained supernet of --space to rank with (repeatable)")
    parser.add_argument("--runs", default="runs/ranking", help="folder of the standalone runs (one per subnet)")
    parser.add_argument("--subnets", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="picks the subnets")
    parser.add_argument("--recipe", help="standalone recipe (default: the one named like --data)")
    parser.add_argument("--epochs", type=int, help="standalone epochs (default: the recipe's)")
    parser.add_argument("--jobs", type=int, default=2, help="standalone trainings run side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per training and for scoring")
    args = parser.parse_args(argv)
    try:
        import torch

        from hwaware.data import build_loader
        from hwaware.evaluation import load_supernet
        from hwaware.train import make_config, train_supernet

        if args.subnets < 3:
            raise HwawareError("--subnets: need at least 3 for a rank correlation")
        if args.jobs < 1:
            raise HwawareError("--jobs: must be at least 1")
        space = get_space(args.space)
        supernets = {}
        for item in args.supernet:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise HwawareError(f"--supernet: expected NAME=CHECKPOINT, got {item!r}")
            supernets[name] = load_supernet(path, space)[0]
        if args.threads:
            torch.set_num_threads(args.threads)
        loaders = {s: list(build_loader(args.data, space, s, 500, rank=0, world_size=1)) for s in SPLITS}
        archs = spread_subnets(space, args.subnets, args.seed)
        outs = [str(Path(args.runs) / arch.short().replace("/", "_")) for arch in archs]
        configs = [make_config(args.recipe, space=args.space, data=args.data, out=out, arch=arch, epochs=args.epochs,
                               threads=args.threads, progress=False) for arch, out in zip(archs, outs, strict=True)]
        started = time.perf_counter()
        # spawn, not fork: a forked child of a process that already ran autograd deadlocks or refuses to train
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds = [float(row["train_seconds"]) for row in pool.map(train_supernet, configs)]
        print(f"== {len(archs)} subnets of {space.name} trained standalone on {args.data} in "
              f"{time.perf_counter() - started:.0f} s wall ({sum(seconds):.0f} s of training, {args.jobs} side by side)")
        params = standard_costs(space)["params_m"]
        standalone = []
        for arch, out in zip(archs, outs, strict=True):
            model, _ = load_supernet(Path(out) / "last.pt", space)
            standalone.append(top1_on_splits(model, arch, loaders))
        inherited = {name: [top1_on_splits(model, arch, loaders) for arch in archs] for name, model in supernets.items()}
        images = sum(len(b[1]) for batches in loaders.values() for b in batches)
        header = f"{'subnet':34s} {'params M':>8s} {'train s':>7s} {'standalone':>10s}" + "".join(
            f" {name:>10s}" for name in inherited)
        print(f"top-1 % on val + test ({images} images); inherited columns are each supernet's weights as they are")
        print(header)
        for i, arch in enumerate(archs):
            row = f"{arch.short():34s} {params(arch):8.3f} {seconds[i]:7.0f} {standalone[i] * 100:10.2f}"
            print(row + "".join(f" {values[i] * 100:10.2f}" for values in inherited.values()))
        print(f"standalone spread: {min(standalone) * 100:.2f} .. {max(standalone) * 100:.2f} % "
              f"({(max(standalone) - min(standalone)) * 100:.2f} points)")
        for name, values in inherited.items():
            tau, rho = rank_correlations(values, standalone)
            gap = statistics.mean(v - s for v, s in zip(values, standalone, strict=True))
            print(f"{name}: Kendall tau {tau:.3f}  Spearman rho {rho:.3f}  mean inherited - standalone {gap * 100:+.2f} points")
    except HwawareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
