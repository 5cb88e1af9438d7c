"""One fleet search against one search per target, side by side, and the accuracy cache reused by a later search.

    .venv/bin/python benchmarks/fleet_search.py --checkpoint runs/animals/last.pt \
        --targets cpu,cpu:int8,cpu:b8,cpu:int8:b8 --tables latency_tables --seeds 0,1,2

Per seed it runs (a) one search of every target x budget cell at once and (b) for each target its
own search of that target's budgets, with the same settings, and reports:
- evaluations: the fleet search's unique subnets scored against one single-target search's
  (the mean over targets), the issue's aim being <= 1.5x;
- accuracy: per cell, the fleet's val top-1 minus the single-target search's, mean over seeds
  (aim: within 0.3 points).
Budgets are fractions (--fractions) of the way from each target's cheapest subnet to its largest,
so they bind on every table. Scores are memoised across the runs of this script (evaluation is
deterministic), which only saves benchmark time: each search counts its own evaluations.

Then the cache: a search of all targets but the last writes a real accuracy cache (in a temporary
folder), and a search of the last target alone reads it; it reports how many of that search's
evaluations the cache served (aim: at least half).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from hwaware.accuracy_cache import AccuracyCache, CachedScorer
from hwaware.evaluation import build_scorer, dataset_of, load_supernet
from hwaware.search import EvolutionSearch, cost_key, parse_budgets
from hwaware.targets import resolve_targets


def budgets_for(targets, space, fractions) -> dict[str, list[float]]:
    """Per target, budgets a given fraction of the way from its cheapest subnet to its largest."""
    out = {}
    for t in targets:
        cheapest, _ = t.table.cheapest(space)
        largest = t.table.predict(space.largest())
        out[t.name] = [round(cheapest + f * (largest - cheapest), 5) for f in fractions]
    return out


def search(space, fitness, targets, limits, settings, seed, warm_start=None):
    names = [t.name for t in targets]
    spec = ",".join(f"{name}={limit}" for name in names for limit in limits[name])
    cells = parse_budgets({"latency_ms": spec}, names)
    # latency only: the budgets bound nothing else, and counting FLOPs for every candidate would dominate
    costs = {cost_key("latency_ms", t.name) if len(targets) > 1 else "latency_ms": t.table.predict for t in targets}
    return EvolutionSearch(space, fitness, costs, cells, seed=seed, progress=False, warm_start=warm_start,
                           **settings).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--targets", default="cpu,cpu:int8,cpu:b8,cpu:int8:b8")
    parser.add_argument("--tables", default="latency_tables")
    parser.add_argument("--fractions", default="0.2,0.4,0.7", help="budgets between cheapest (0) and largest (1)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--population", type=int, default=50)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--fleet-population", dest="fleet_population", type=int,
                        help="the fleet search's population (default --population: equal evaluations; the aim "
                             "allows up to 1.5x)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for scoring (default 1)")
    args = parser.parse_args(argv)
    model, meta = load_supernet(args.checkpoint)
    space = model.space
    scorer = build_scorer(model, dataset_of(meta, None), split="val", device="cpu", threads=args.threads)
    memo: dict = {}

    def fitness(arch):
        if arch not in memo:
            memo[arch] = scorer(arch)
        return memo[arch]

    targets = resolve_targets(space, args.targets, tables_root=args.tables)
    limits = budgets_for(targets, space, [float(f) for f in args.fractions.split(",")])
    def settings_for(population: int) -> dict:
        return dict(population=population, generations=args.generations, parents=max(2, args.population // 5),
                    mutation_children=population // 2, crossover_children=population // 2)

    settings = settings_for(args.population)
    fleet_settings = settings_for(args.fleet_population or args.population)
    print(f"space {space.name}, {scorer.describe()}; targets {', '.join(t.name for t in targets)}; "
          f"budgets (ms) {limits}; population {args.population} (fleet {fleet_settings['population']}) x "
          f"{args.generations} generations", flush=True)
    ratios, gaps = [], {}
    started = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        fleet = search(space, fitness, targets, limits, fleet_settings, seed)
        singles = {t.name: search(space, fitness, [t], limits, settings, seed) for t in targets}
        single_evals = statistics.mean(len(r.evaluations) for r in singles.values())
        ratios.append(len(fleet.evaluations) / single_evals)
        for cell in fleet.cells:
            name = cell.targets[0]
            alone = singles[name]
            # the same budget in the single-target search is named without the target
            label = cell.label.replace(f"[{name}]", "")
            gaps.setdefault(cell.label, []).append(100 * (fleet.best[cell.label].top1 - alone.best[label].top1))
        print(f"seed {seed}: fleet {len(fleet.evaluations)} evaluations for {len(fleet.cells)} cells; single-target "
              f"searches {single_evals:.0f} each (mean); ratio {ratios[-1]:.2f}; {len(memo)} subnets scored so far, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    print("\nper cell: fleet val top-1 minus its target's own search, points (mean over seeds; per seed)")
    for label, values in gaps.items():
        print(f"  {label:28s} {statistics.mean(values):+.2f}  ({', '.join(f'{v:+.2f}' for v in values)})")
    worst = min(statistics.mean(v) for v in gaps.values())
    print(f"\nevaluations: fleet / single-target = {statistics.mean(ratios):.2f}x (aim <= 1.5x); worst cell mean gap "
          f"{worst:+.2f} points (aim >= -0.3); cells within 0.3 points: "
          f"{sum(statistics.mean(v) >= -0.3 for v in gaps.values())}/{len(gaps)}")

    with tempfile.TemporaryDirectory() as folder:
        earlier, later = targets[:-1], targets[-1:]
        cache = AccuracyCache(args.checkpoint, scorer.fingerprint, space, folder=folder)
        cached = CachedScorer(fitness, cache)
        search(space, cached, earlier, limits, settings, 0, warm_start=cached.known)
        reread = CachedScorer(fitness, cache)
        result = search(space, reread, later, limits, settings, 0, warm_start=reread.known)
        share = reread.hits / max(1, reread.hits + reread.misses)
        print(f"cache: a later search for {later[0].name} after one for {', '.join(t.name for t in earlier)}: "
              f"{reread.hits} of {reread.hits + reread.misses} evaluations served by the cache ({100 * share:.0f} %, "
              f"aim >= 50 %); best {', '.join(f'{k} {100 * e.top1:.2f} %' for k, e in result.best.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
