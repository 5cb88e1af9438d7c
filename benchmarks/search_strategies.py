"""Evolution against random search at equal evaluations, and the search machinery's own overhead.

    .venv/bin/python benchmarks/search_strategies.py                       # synthetic digits landscape
    .venv/bin/python benchmarks/search_strategies.py --checkpoint runs/digits/last.pt --device cpu
    .venv/bin/python benchmarks/search_strategies.py --checkpoint runs/animals/last.pt --params-m 0.05 \
        --population 20 --generations 10 --overhead-evaluations 0

Without --checkpoint the fitness is a synthetic landscape shaped like a trained `digits`
supernet (accuracy saturating in capacity, later layers' MLP width mattering most, top-1 in
steps of one validation image with +-1 image of evaluation noise) and the latency a synthetic
CPU model (per-block overhead + per-head overhead + FLOPs at 5 GFLOP/s). With --checkpoint the
fitness is the supernet's val top-1 (hwaware.evaluation.evaluate) and the latency comes from the
device's table (--table or --device), and the test top-1 of each chosen Arch is reported too, with
the mean val-minus-test gap of the chosen subnets (the selection bias of picking the best on val).
--params-m searches under an exact parameter budget instead of latency, for spaces without a table.

Both strategies of one seed start from the same random generation 0 (same RNG stream), so the
per-seed difference is paired. Fitness values are memoised across runs here (evaluation is
deterministic), which only saves benchmark time: each search still counts its own evaluations.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hwaware.errors import HwawareError
from hwaware.pipeline import standard_costs
from hwaware.search import Budget, EvolutionSearch, parse_budgets
from hwaware.search_results import write_results
from hwaware.space import Arch, SearchSpace, get_space


@dataclass
class Provider:
    """Where scores and latencies come from: a synthetic landscape or a trained checkpoint plus a table."""

    name: str
    space: SearchSpace
    fitness: Callable[[Arch], float]
    costs: dict[str, Callable[[Arch], float]]
    test_top1: Callable[[Arch], float] | None = None


def synthetic_latency_ms(space: SearchSpace) -> Callable[[Arch], float]:
    flops_g = standard_costs(space)["flops_g"]

    def latency(arch: Arch) -> float:
        return 0.05 + 0.03 * arch.depth + 0.008 * sum(arch.num_heads) + flops_g(arch) * 1e3 / 5.0

    return latency


def synthetic_top1(arch: Arch, val_images: int = 360) -> float:
    capacity = sum(
        (0.5 + i / arch.depth) * math.log2(arch.embed_dim * ratio / 32) + 0.15 * math.log2(heads)
        for i, (heads, ratio) in enumerate(arch.layers())
    )
    clean = 0.55 + 0.43 * (1 - math.exp(-capacity / 4))
    noise = zlib.crc32(arch.to_json().encode()) % 3 - 1  # -1, 0 or +1 image, fixed per Arch
    return min(val_images, max(0, round(clean * val_images) + noise)) / val_images


def synthetic_provider(space_name: str) -> Provider:
    space = get_space(space_name)
    return Provider("synthetic", space, synthetic_top1, standard_costs(space, synthetic_latency_ms(space)))


def checkpoint_provider(checkpoint: str, table: str | None, device: str | None, batch_size: int) -> Provider:
    """The real fitness: supernet val top-1 through hwaware.train; latency from a measured table."""
    try:
        from hwaware.data import build_loader
        from hwaware.evaluation import evaluate, load_supernet
        from hwaware.latency import LatencyTable, find_table
    except ImportError as exc:
        raise HwawareError(f"--checkpoint: the training/latency modules are not available here ({exc})") from None
    model, meta = load_supernet(checkpoint)
    space = model.space
    # Materialised once: re-running the loader's transforms for every Arch would cost as much as the model.
    loaders = {split: list(build_loader(meta["data"], space, split, batch_size, rank=0, world_size=1))
               for split in ("val", "test")}

    def top1_on(split: str) -> Callable[[Arch], float]:
        return lambda arch: evaluate(model, arch, loaders[split], distributed=False)["top1"]

    latency = None
    if table or device:
        latency_table = LatencyTable.load(table or find_table(device, space.name))
        latency_table.check_space(space)
        latency = latency_table.predict
    else:
        print("no --table/--device: using the synthetic latency model", file=sys.stderr)
        latency = synthetic_latency_ms(space)
    return Provider(f"checkpoint {checkpoint}", space, top1_on("val"), standard_costs(space, latency),
                    test_top1=top1_on("test"))


def memoised(fitness: Callable[[Arch], float]) -> Callable[[Arch], float]:
    scores: dict[Arch, float] = {}

    def score(arch: Arch) -> float:
        if arch not in scores:
            scores[arch] = fitness(arch)
        return scores[arch]

    return score


def compare_strategies(provider: Provider, budget: Budget, seeds: int, settings: dict) -> None:
    fitness = memoised(provider.fitness)
    label = budget.label
    print(f"\n== evolution vs random search: {provider.name}, space {provider.space.name}, {label}, "
          f"{settings['population']} x {settings['generations']} evaluations, seeds 0..{seeds - 1}")
    best: dict[str, list[float]] = {}
    gaps: list[float] = []
    for strategy in ("evolution", "random"):
        best[strategy] = []
        started = time.perf_counter()
        for seed in range(seeds):
            result = EvolutionSearch(provider.space, fitness, provider.costs, [budget], strategy=strategy,
                                     seed=seed, progress=False, **settings).run()
            chosen = result.best[label]
            best[strategy].append(chosen.top1)
            test = ""
            if provider.test_top1:
                test_top1 = provider.test_top1(chosen.arch)
                gaps.append(chosen.top1 - test_top1)
                test = f"  test top-1 {test_top1 * 100:.2f}%"
            print(f"  {strategy:9s} seed {seed}: {len(result.evaluations)} evaluated, best val top-1 "
                  f"{chosen.top1 * 100:.2f}% {chosen.arch.short()} at {result.costs[chosen.arch][budget.metric]:.3f}"
                  f"{test}")
        print(f"  {strategy:9s} {time.perf_counter() - started:.1f} s for {seeds} searches")
    for strategy, values in best.items():
        print(f"  {strategy:9s} best val top-1 mean {statistics.mean(values) * 100:.2f}%  "
              f"std {statistics.stdev(values) * 100:.2f}  min {min(values) * 100:.2f}  max {max(values) * 100:.2f}")
    gains = [e - r for e, r in zip(best["evolution"], best["random"], strict=True)]
    wins = sum(g > 0 for g in gains)
    print(f"  evolution - random (paired by seed): mean {statistics.mean(gains) * 100:+.2f} points, "
          f"std {statistics.stdev(gains) * 100:.2f}; evolution ahead in {wins}/{seeds}, tied in "
          f"{sum(g == 0 for g in gains)}/{seeds}")
    if gaps:
        print(f"  chosen subnets' val - test top-1: mean {statistics.mean(gaps) * 100:+.2f} points, "
              f"max {max(gaps) * 100:+.2f} over {len(gaps)} searches")


def time_overhead(space: SearchSpace, evaluations: int) -> None:
    """Seconds the search itself spends per evaluation with a trivial fitness (hash of the Arch)."""
    costs = standard_costs(space, synthetic_latency_ms(space))
    generations = max(1, evaluations // 50)
    print(f"\n== search overhead: {generations} x 50 = {generations * 50} evaluations, trivial fitness, space {space.name}")

    def trivial(arch: Arch) -> float:
        return zlib.crc32(arch.to_json().encode()) / 2**32

    budget = parse_budgets({"latency_ms": "0.6"})
    with tempfile.TemporaryDirectory() as tmp:
        for what, checkpoint in (("first run (counts each piece's FLOPs once)", None), ("warm, in memory", None),
                                 ("warm, checkpoint every generation", Path(tmp) / "state.json")):
            started = time.perf_counter()
            result = EvolutionSearch(space, trivial, costs, budget, generations=generations, progress=False).run(
                checkpoint=checkpoint)
            seconds = time.perf_counter() - started
            print(f"  {what:42s} {seconds:6.2f} s  ({seconds / len(result.evaluations) * 1e3:.2f} ms per evaluation, "
                  f"{len(result.evaluations)} evaluated)")
        started = time.perf_counter()
        write_results(result, tmp)
        print(f"  {'writing the outputs (CSVs, YAML, PNG)':42s} {time.perf_counter() - started:6.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="digits", help="space of the synthetic landscape")
    parser.add_argument("--checkpoint", help="a trained supernet: score Archs by its val top-1 instead")
    parser.add_argument("--table", help="latency table CSV for --checkpoint")
    parser.add_argument("--device", help="device whose table in latency_tables/ prices latency for --checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for --checkpoint (0: torch's default); the digits model is too small "
                             "to gain from more, and extra threads slow it down on a shared machine")
    parser.add_argument("--latency-ms", type=float, default=0.5, help="the budget both strategies search under")
    parser.add_argument("--params-m", type=float, help="search under this many million parameters instead of latency")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--population", type=int, default=50)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--overhead-evaluations", type=int, default=1000, help="0 skips the overhead timing")
    args = parser.parse_args(argv)
    try:
        if args.seeds < 2:
            raise HwawareError("--seeds: need at least 2 for a spread")
        if args.overhead_evaluations:  # first, so its cold run really is the first to count FLOPs
            time_overhead(get_space(args.space), args.overhead_evaluations)
        if args.checkpoint and args.threads:
            import torch

            torch.set_num_threads(args.threads)
        provider = (checkpoint_provider(args.checkpoint, args.table, args.device, args.batch_size)
                    if args.checkpoint else synthetic_provider(args.space))
        # AutoFormer's proportions: a fifth kept as parents, half the population by mutation, half by crossover.
        settings = dict(population=args.population, generations=args.generations, parents=max(1, args.population // 5),
                        mutation_children=args.population // 2, crossover_children=args.population // 2)
        budget = Budget("params_m", args.params_m) if args.params_m else Budget("latency_ms", args.latency_ms)
        compare_strategies(provider, budget, args.seeds, settings)
    except HwawareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
