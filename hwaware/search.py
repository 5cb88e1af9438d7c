"""Evolutionary search for the most accurate Arch under latency, FLOPs and parameter budgets.

The search knows nothing of how an Arch is scored or priced: it takes a `fitness` callable
(Arch -> validation top-1, 0..1) and named `costs` callables (Arch -> float), so a notebook, a
test with a synthetic landscape and the CLI with a supernet checkpoint and a latency table all
drive the same code. Pure Python (no torch): every cost and score arrives through a callable.

Several budgets at once (``--latency-ms 1,2,5``) run one evolution per budget, one after the
other, sharing one evaluation cache. Why not one population for all budgets: each budget keeps
exactly AutoFormer's algorithm (parents are the best Archs that fit *that* budget), and each
budget's trajectory draws from its own RNG stream seeded by (seed, budget), so it is the same
trajectory whether the budget is searched alone or beside others. The sharing is where the
saving is: an Arch evaluated for the 5 ms budget is free for the 2 ms run, and the reported
best for every budget is the best fitting Arch in the whole cache, so no evaluation is wasted.

Constraints are enforced by rejection with a bounded number of tries, so a tight budget gives
a short generation, never a hang; a budget no subnet can meet is refused before anything runs,
with the cheapest cost the space reaches.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hwaware.errors import HwawareError
from hwaware.io import atomic_write, atomic_write_text
from hwaware.progress import progress
from hwaware.space import Arch, SearchSpace, save_arch

__all__ = [
    "BUDGET_KINDS", "STATE_FILE", "Budget", "Constraints", "Evaluation", "EvolutionSearch", "SearchResult",
    "parse_budgets", "standard_costs", "file_fingerprint", "candidates_frame", "pareto_metric", "pareto_frame", "pareto_figure_png",
    "best_file", "summary_table", "write_results",
]

# budget name -> (the cost it bounds, True if it is a lower bound, unit shown to the user)
BUDGET_KINDS: dict[str, tuple[str, bool, str]] = {
    "latency_ms": ("latency_ms", False, "ms"),
    "flops_g": ("flops_g", False, "GFLOPs"),
    "params_m": ("params_m", False, "M params"),
    "min_params_m": ("params_m", True, "M params"),
}
STATE_FILE = "search_state.json"
ENUMERATE_UP_TO = 100_000  # subnets: below this a window's feasibility is decided by enumeration
_STATE_FORMAT = "hwaware-search-state/1"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- budgets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """One bound on one cost: `latency_ms <= 2`, or `params_m >= 0.05` for `min_params_m`."""

    name: str
    limit: float

    def __post_init__(self):
        if self.name not in BUDGET_KINDS:
            raise HwawareError(f"budget: unknown budget {self.name!r} (known: {', '.join(BUDGET_KINDS)})")
        limit = self.limit
        if isinstance(limit, str):
            try:
                limit = float(limit.strip())
            except ValueError:
                raise HwawareError(f"{self.flag}: budget must be a positive number, got {self.limit!r}") from None
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise HwawareError(f"{self.flag}: budget must be a positive number, got {self.limit!r}")
        if limit <= 0:
            raise HwawareError(f"{self.flag}: budget must be positive, got {limit:g}")
        object.__setattr__(self, "limit", float(limit))

    @property
    def flag(self) -> str:
        return _flag(self.name)

    @property
    def metric(self) -> str:
        return BUDGET_KINDS[self.name][0]

    @property
    def lower(self) -> bool:
        return BUDGET_KINDS[self.name][1]

    @property
    def unit(self) -> str:
        return BUDGET_KINDS[self.name][2]

    @property
    def label(self) -> str:
        return f"{self.metric}{'>=' if self.lower else '<='}{self.limit:g}"

    def fits(self, value: float) -> bool:
        return value >= self.limit if self.lower else value <= self.limit


@dataclass(frozen=True)
class Constraints:
    """Budgets that must all hold for one search target; the search returns one best Arch per target."""

    budgets: tuple[Budget, ...]

    def __post_init__(self):
        budgets = tuple(self.budgets)
        if not budgets:
            raise HwawareError("search: give at least one budget (" + ", ".join(map(_flag, BUDGET_KINDS)) + ")")
        names = [b.name for b in budgets]
        if len(set(names)) != len(names):
            raise HwawareError(f"search: budget {names[0]} given twice in one target")
        by_name = {b.name: b for b in budgets}
        if "min_params_m" in by_name and "params_m" in by_name and by_name["min_params_m"].limit > by_name["params_m"].limit:
            raise HwawareError(
                f"--min-params-m: {by_name['min_params_m'].limit:g} is above --params-m {by_name['params_m'].limit:g}"
            )
        object.__setattr__(self, "budgets", budgets)

    @classmethod
    def of(cls, *budgets: Budget) -> Constraints:
        return cls(tuple(budgets))

    @property
    def label(self) -> str:
        return " & ".join(b.label for b in self.budgets)

    @property
    def slug(self) -> str:
        """File-name friendly label: `latency_ms-2_params_m-0.5`."""
        return "_".join(f"{b.name}-{b.limit:g}" for b in self.budgets)

    def fits(self, costs: Mapping[str, float]) -> bool:
        return all(b.fits(costs[b.metric]) for b in self.budgets)


def parse_budgets(values: Mapping[str, Any]) -> list[Constraints]:
    """CLI budget values -> search targets.

    `values` maps a budget name to None (flag not given), a number, or a comma list such as
    "1,2,5". Each combination of one value per given flag is one target, so
    `--latency-ms 1,2,5 --params-m 0.1` gives three targets, each also bounded to 0.1 M params.
    """
    per_flag: list[list[Budget]] = []
    for name, value in values.items():
        if value is None:
            continue
        if name not in BUDGET_KINDS:
            raise HwawareError(f"budget: unknown budget {name!r} (known: {', '.join(BUDGET_KINDS)})")
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        if not items or any(isinstance(item, str) and not item.strip() for item in items):
            raise HwawareError(f"{_flag(name)}: budget must be a positive number or a comma list of them, got {value!r}")
        budgets = [Budget(name, item) for item in items]
        per_flag.append(list(dict.fromkeys(budgets)))
    if not per_flag:
        raise HwawareError("search: give at least one budget (" + ", ".join(map(_flag, BUDGET_KINDS)) + ")")
    return [Constraints(combo) for combo in itertools.product(*per_flag)]


def standard_costs(space: SearchSpace, latency_ms: Callable[[Arch], float] | None = None) -> dict[str, Callable]:
    """The costs every search reports: exact FLOPs (G) and params (M) from `hwaware.costs`, plus latency if given.

    `latency_ms` is typically `LatencyTable.predict`. torch is imported here, not at module import.
    """
    from hwaware.costs import arch_cost

    @functools.lru_cache(maxsize=1 << 16)
    def counted(arch: Arch):  # one count serves both FLOPs and params
        return arch_cost(arch, space)

    costs: dict[str, Callable[[Arch], float]] = {}
    if latency_ms is not None:
        costs["latency_ms"] = latency_ms
    costs["flops_g"] = lambda arch: counted(arch).flops / 1e9
    costs["params_m"] = lambda arch: counted(arch).params / 1e6
    return costs


def all_subnets(space: SearchSpace) -> Iterator[Arch]:
    """Every subnet the space's choices make (`space.num_subnets()` of them)."""
    layers = list(itertools.product(space.num_heads, space.mlp_ratios))
    for embed_dim in space.embed_dims:
        for depth in space.depths:
            for combo in itertools.product(layers, repeat=depth):
                yield Arch(embed_dim, tuple(h for h, _ in combo), tuple(r for _, r in combo))


def file_fingerprint(**paths: str | Path | None) -> dict[str, Any]:
    """SHA-256 of each file scores or costs come from: a `fingerprint` for the search's resume state.

    By content, not path or time: a copied run folder or a touched checkpoint resumes; a retrained
    checkpoint or a re-measured table does not reuse cached scores.
    """
    from hwaware.io import file_sha256

    return {key: {"sha256": file_sha256(path)} for key, path in paths.items() if path is not None}


# ---- the search -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One scored Arch and where it was first met: the generation and the target whose run evaluated it."""

    arch: Arch
    top1: float
    generation: int
    target: str


@dataclass
class _Run:
    """The resumable state of one target's evolution: completed generations, what it visited, its RNG."""

    generation: int
    visited: list[Arch]
    rng: random.Random
    seen: set[Arch] = field(default_factory=set)

    def __post_init__(self):
        self.seen = set(self.visited)


@dataclass
class SearchResult:
    space: SearchSpace
    targets: list[Constraints]
    strategy: str
    seed: int
    evaluations: list[Evaluation]  # every unique Arch scored, in evaluation order
    costs: dict[Arch, dict[str, float]]  # every cost of every evaluated Arch
    best: dict[str, Evaluation]  # target label -> best fitting Arch in the whole cache
    fitness_calls: int  # cache misses in this process (evaluations restored from a checkpoint are not counted)


class EvolutionSearch:
    """AutoFormer's evolution (or random search at equal evaluations) under budgets.

    Generation 0 samples `population` fitting Archs at random. Each later generation keeps the
    `parents` best Archs seen so far in this target's run, breeds `mutation_children` by mutation
    (per layer with `layer_mutation_prob`, depth/embed dim with `global_mutation_prob`) and
    `crossover_children` by crossover, and fills the rest of `population` at random. A child is
    kept only if it fits the budgets and was not visited before, within `max_tries` attempts per
    wanted child. `strategy="random"` samples every generation at random: the same number of
    evaluations, the baseline.

    `fingerprint` (JSON-able, e.g. checkpoint and table paths with their sizes and mtimes) is
    stored in the resume checkpoint; a checkpoint with another fingerprint is refused, so cached
    scores of one supernet are never reused for another.
    """

    def __init__(
        self,
        space: SearchSpace,
        fitness: Callable[[Arch], float],
        costs: Mapping[str, Callable[[Arch], float]],
        budgets: Sequence[Constraints | Budget],
        *,
        population: int = 50,
        generations: int = 20,
        parents: int = 10,
        mutation_children: int = 25,
        crossover_children: int = 25,
        layer_mutation_prob: float = 0.2,
        global_mutation_prob: float = 0.4,
        max_tries: int = 10,
        feasibility_samples: int = 500,
        strategy: str = "evolution",
        seed: int = 0,
        progress: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
    ):
        self.space, self.fitness, self.costs = space, fitness, dict(costs)
        self.targets = [b if isinstance(b, Constraints) else Constraints.of(b) for b in budgets]
        if not self.targets:
            raise HwawareError("search: give at least one budget (" + ", ".join(map(_flag, BUDGET_KINDS)) + ")")
        labels = [t.label for t in self.targets]
        if len(set(labels)) != len(labels):
            raise HwawareError(f"search: budget {labels[0]} given twice")
        for budget in (b for t in self.targets for b in t.budgets):
            if budget.metric not in self.costs:
                raise HwawareError(
                    f"{budget.flag}: no cost function for {budget.metric} (have: {', '.join(self.costs) or 'none'})"
                )
        for name, value, low in (
            ("population", population, 1), ("generations", generations, 1), ("parents", parents, 1),
            ("mutation_children", mutation_children, 0), ("crossover_children", crossover_children, 0),
            ("max_tries", max_tries, 1), ("feasibility_samples", feasibility_samples, 0), ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise HwawareError(f"{_flag(name)}: must be an integer >= {low}, got {value!r}")
        if mutation_children + crossover_children > population:
            raise HwawareError(
                f"--population: {population} is smaller than --mutation-children {mutation_children} "
                f"+ --crossover-children {crossover_children}"
            )
        for name, value in (("layer_mutation_prob", layer_mutation_prob), ("global_mutation_prob", global_mutation_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise HwawareError(f"{_flag(name)}: must be a probability in 0..1, got {value!r}")
        if strategy not in ("evolution", "random"):
            raise HwawareError(f"--strategy: must be 'evolution' or 'random', got {strategy!r}")
        self.population, self.generations, self.parents = population, generations, parents
        self.mutation_children, self.crossover_children = mutation_children, crossover_children
        self.layer_mutation_prob, self.global_mutation_prob = float(layer_mutation_prob), float(global_mutation_prob)
        self.max_tries, self.feasibility_samples = max_tries, feasibility_samples
        self.strategy, self.seed, self.progress = strategy, seed, progress
        # What the scores and costs come from (checkpoint, table): a resumed cache must come from the same.
        self.fingerprint = dict(fingerprint or {})
        self._cost_memo: dict[Arch, dict[str, float]] = {}

    # ---- costs and feasibility ----------------------------------------------------------
    def arch_costs(self, arch: Arch) -> dict[str, float]:
        """Every named cost of `arch`, computed once per Arch (costs are deterministic)."""
        costs = self._cost_memo.get(arch)
        if costs is None:
            costs = {}
            for name, cost in self.costs.items():
                value = cost(arch)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise HwawareError(f"cost {name}: returned {value!r} for {arch.short()}, expected a finite number")
                costs[name] = float(value)
            self._cost_memo[arch] = costs
        return costs

    def check_feasible(self) -> dict[str, list[Arch]]:
        """Refuse at once a budget no subnet meets; return, per target, probed Archs that meet it.

        The cheapest reachable cost is not assumed to be the smallest subnet's (a measured block
        with more heads can be faster): it is the minimum over the smallest and largest subnets,
        a per-layer descent for every budget (exact for costs that add up per layer, as latency
        tables, FLOPs and params do), and a random sample for costs that do not.
        """
        rng = random.Random(f"{self.seed}:feasibility")
        metrics = dict.fromkeys((b.metric, b.lower) for t in self.targets for b in t.budgets)
        probes = list(dict.fromkeys(
            [self.space.smallest(), self.space.largest()]
            + [arch for metric, lower in metrics for arch in self._layerwise_extremes(metric, lower)]
            + [self.space.sample(rng) for _ in range(self.feasibility_samples)]
        ))
        witnesses = {}
        for target in self.targets:
            for budget in target.budgets:
                pick = max if budget.lower else min
                extreme = pick(probes, key=lambda a, m=budget.metric: self.arch_costs(a)[m])
                value = self.arch_costs(extreme)[budget.metric]
                if not budget.fits(value):
                    reach = "the largest reaches" if budget.lower else "the cheapest reaches"
                    raise HwawareError(
                        f"{budget.flag} {budget.limit:g}: no subnet of space {self.space.name} fits; "
                        f"{reach} {value:.4g} {budget.unit} ({extreme.short()})"
                    )
            fitting = [a for a in probes if target.fits(self.arch_costs(a))]
            if not fitting:
                fitting = self._find_in_window(target, probes)
            witnesses[target.label] = fitting
        return witnesses

    def _find_in_window(self, target: Constraints, probes: list[Arch]) -> list[Arch]:
        """Fitting Archs for a target whose bounds are each reachable but not together (a window such as
        --min-params-m 0.059 --params-m 0.06): every subnet where the space is small enough to enumerate
        (exact), else a descent from the nearest probes; refused in one line when none is found."""
        count = self.space.num_subnets()
        if count <= ENUMERATE_UP_TO:
            fitting = [a for a in all_subnets(self.space) if target.fits(self.arch_costs(a))]
            if fitting:
                return fitting
            raise HwawareError(f"search: no subnet of space {self.space.name} meets {target.label} "
                               f"(all {count:,} enumerated)")
        found = self._descend_into(target, sorted(probes, key=lambda a: self._violation(target, a))[:8])
        if found is None:
            raise HwawareError(
                f"search: found no subnet of space {self.space.name} meeting {target.label} among {len(probes)} "
                f"probes and a descent from the nearest; the space ({count:.3g} subnets) is too large to "
                "enumerate, so one may exist: widen the window")
        return [found]

    def _violation(self, target: Constraints, arch: Arch) -> float:
        """How far `arch` is outside `target`'s budgets, relative to each limit (0 when it fits)."""
        costs = self.arch_costs(arch)
        return sum(max(0.0, (b.limit - costs[b.metric]) if b.lower else (costs[b.metric] - b.limit)) / b.limit
                   for b in target.budgets)

    def _descend_into(self, target: Constraints, starts: list[Arch], max_steps: int = 200) -> Arch | None:
        """A fitting Arch reached by greedy single changes (a layer's heads or ratio, depth, embed dim) that
        shrink the violation; for a window of lower and upper bounds, which the per-budget extremes
        above cannot prove empty or not. None if every start gets stuck outside."""
        space = self.space
        for arch in starts:
            for _ in range(max_steps):
                if target.fits(self.arch_costs(arch)):
                    return arch
                moves = [Arch(d, arch.num_heads, arch.mlp_ratios) for d in space.embed_dims]
                for depth in space.depths:
                    extra = depth - arch.depth
                    moves.append(Arch(arch.embed_dim, (arch.num_heads + arch.num_heads[-1:] * extra)[:depth],
                                      (arch.mlp_ratios + arch.mlp_ratios[-1:] * extra)[:depth]))
                for i, (h, r) in itertools.product(range(arch.depth), itertools.product(space.num_heads, space.mlp_ratios)):
                    moves.append(Arch(arch.embed_dim, arch.num_heads[:i] + (h,) + arch.num_heads[i + 1:],
                                      arch.mlp_ratios[:i] + (r,) + arch.mlp_ratios[i + 1:]))
                best = min(moves, key=lambda a: self._violation(target, a))
                if self._violation(target, best) >= self._violation(target, arch):
                    break
                arch = best
        return None

    def _layerwise_extremes(self, metric: str, highest: bool) -> list[Arch]:
        """Per embed dim and depth, the Arch whose every layer takes the (heads, ratio) that minimises `metric`
        (maximises it with `highest`), chosen one layer at a time."""
        sign = -1.0 if highest else 1.0
        space = self.space
        choices = list(itertools.product(space.num_heads, space.mlp_ratios))
        extremes = []
        for embed_dim in space.embed_dims:
            for depth in space.depths:
                arch = Arch(embed_dim, (space.num_heads[0],) * depth, (space.mlp_ratios[0],) * depth)
                for i in range(depth):
                    trials = [
                        Arch(embed_dim, arch.num_heads[:i] + (h,) + arch.num_heads[i + 1:],
                             arch.mlp_ratios[:i] + (r,) + arch.mlp_ratios[i + 1:])
                        for h, r in choices
                    ]
                    arch = min(trials, key=lambda a: sign * self.arch_costs(a)[metric])
                extremes.append(arch)
        return extremes

    # ---- running ------------------------------------------------------------------------
    def run(self, checkpoint: str | Path | None = None, save_checkpoint: bool = True) -> SearchResult:
        """Search every target; with `checkpoint`, resume from it if it exists and save it every generation.

        Under torchrun every rank runs the same deterministic search (the fitness all-reduces),
        reads the same checkpoint, and only rank 0 passes `save_checkpoint=True`.
        """
        witnesses = self.check_feasible()
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        evaluations: dict[Arch, Evaluation] = {}
        runs: dict[str, _Run] = {}
        if checkpoint is not None and checkpoint.exists():
            evaluations, runs = self._load_state(checkpoint)
        fitness_calls = 0
        for target in self.targets:
            run = runs.setdefault(target.label, _Run(0, [], random.Random(f"{self.seed}:{target.label}")))
            bar = progress(total=self.generations, initial=run.generation, desc=f"{self.strategy} {target.label}",
                           unit="gen", file=sys.stderr, disable=not self.progress, dynamic_ncols=True, every=1)
            with bar:
                while run.generation < self.generations:
                    children = self._next_generation(target, run, witnesses[target.label], evaluations)
                    for arch in children:
                        if arch not in evaluations:
                            evaluations[arch] = Evaluation(arch, self._score(arch), run.generation, target.label)
                            fitness_calls += 1
                    run.visited.extend(children)
                    run.seen.update(children)
                    run.generation += 1
                    if checkpoint is not None and save_checkpoint:
                        self._save_state(checkpoint, evaluations, runs)
                    if run.visited:
                        bar.set_postfix(best=f"{max(evaluations[a].top1 for a in run.visited):.4f}",
                                        evaluated=len(run.visited), refresh=False)
                    bar.update()
        ordered = list(evaluations.values())
        return SearchResult(
            space=self.space, targets=list(self.targets), strategy=self.strategy, seed=self.seed,
            evaluations=ordered, costs={e.arch: self.arch_costs(e.arch) for e in ordered},
            best={t.label: self._best(ordered, t) for t in self.targets}, fitness_calls=fitness_calls,
        )

    def _score(self, arch: Arch) -> float:
        value = self.fitness(arch)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HwawareError(f"fitness: returned {value!r} for {arch.short()}, expected a finite number")
        return float(value)

    def _best(self, evaluations: list[Evaluation], target: Constraints) -> Evaluation:
        """Highest top-1 among cached Archs that fit; ties go to the lower first-budget cost, then the earlier."""
        metric = target.budgets[0].metric
        fitting = [e for e in evaluations if target.fits(self.arch_costs(e.arch))]
        return min(fitting, key=lambda e: (-e.top1, self.arch_costs(e.arch)[metric]))

    def _next_generation(
        self, target: Constraints, run: _Run, witnesses: list[Arch], evaluations: Mapping[Arch, Evaluation]
    ) -> list[Arch]:
        """The Archs this generation evaluates: new to this run, fitting the target, at most `population`."""
        rng, space = run.rng, self.space
        children: list[Arch] = []
        taken = set(run.seen)

        def breed(make: Callable[[], Arch], wanted: int) -> None:
            goal = len(children) + wanted
            for _ in range(wanted * self.max_tries):
                if len(children) >= goal:
                    return
                child = make()
                if child not in taken and target.fits(self.arch_costs(child)):
                    children.append(child)
                    taken.add(child)

        if self.strategy == "evolution" and run.visited:
            # Stable sort: ties keep visit order, so the parents are deterministic.
            parents = sorted(run.visited, key=lambda a: -evaluations[a].top1)[: self.parents]

            def mutate() -> Arch:
                return space.mutate(rng.choice(parents), rng, self.layer_mutation_prob, self.global_mutation_prob)

            def cross() -> Arch:
                a, b = rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
                return space.crossover(a, b, rng)

            breed(mutate, self.mutation_children)
            breed(cross, self.crossover_children)
        breed(lambda: space.sample(rng), self.population - len(children))
        # Random sampling rarely hits a tight budget; the probed Archs known to fit top the generation up.
        for arch in witnesses:
            if len(children) >= self.population:
                break
            if arch not in taken:
                children.append(arch)
                taken.add(arch)
        return children

    # ---- checkpoint ---------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        config = {
            "space": self.space.to_dict(), "strategy": self.strategy, "seed": self.seed,
            "population": self.population, "generations": self.generations, "parents": self.parents,
            "mutation_children": self.mutation_children, "crossover_children": self.crossover_children,
            "layer_mutation_prob": self.layer_mutation_prob, "global_mutation_prob": self.global_mutation_prob,
            "max_tries": self.max_tries, "feasibility_samples": self.feasibility_samples,
            "targets": [t.label for t in self.targets], "costs": list(self.costs), "fingerprint": self.fingerprint,
        }
        return json.loads(json.dumps(config))

    def _save_state(self, path: Path, evaluations: dict[Arch, Evaluation], runs: dict[str, _Run]) -> None:
        index = {arch: i for i, arch in enumerate(evaluations)}
        state = {
            "format": _STATE_FORMAT,
            "config": self._config(),
            "evaluations": [
                {"arch": e.arch.to_dict(), "top1": e.top1, "generation": e.generation, "target": e.target}
                for e in evaluations.values()
            ],
            "runs": {
                label: {"generation": run.generation, "visited": [index[a] for a in run.visited],
                        "rng": _rng_to_json(run.rng)}
                for label, run in runs.items()
            },
        }
        atomic_write_text(path, json.dumps(state))

    def _load_state(self, path: Path) -> tuple[dict[Arch, Evaluation], dict[str, _Run]]:
        from hwaware.io import loads_strict, read_text_file

        try:
            state = loads_strict(read_text_file(path, "search state"))
            if state.get("format") != _STATE_FORMAT:
                raise ValueError(f"format is {state.get('format')!r}, expected {_STATE_FORMAT!r}")
            saved = state["config"]
            if saved != self._config():
                differs = sorted(k for k in set(saved) | set(self._config()) if saved.get(k) != self._config().get(k))
                raise HwawareError(
                    f"{path}: written by a different search (differs in {', '.join(differs)}); "
                    f"use another output folder or delete it"
                )
            labels = {t.label for t in self.targets}
            evaluations = {}
            for item in state["evaluations"]:
                arch = self.space.validate(Arch.from_dict(item["arch"], source=str(path)))
                top1, generation = _number(item["top1"], 0.0, 1.0), int(_number(item["generation"], 0, self.generations))
                if item["target"] not in labels:
                    raise ValueError(f"evaluation for unknown target {str(item['target'])[:40]!r}")
                evaluations[arch] = Evaluation(arch, top1, generation, item["target"])
            archs = list(evaluations)
            runs = {}
            for label, r in state["runs"].items():
                if label not in labels:
                    raise ValueError(f"run for unknown target {str(label)[:40]!r}")
                visited = [archs[int(_number(i, 0, len(archs) - 1))] for i in r["visited"]]
                runs[label] = _Run(int(_number(r["generation"], 0, self.generations)), visited, _rng_from_json(r["rng"]))
        except HwawareError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise HwawareError(f"{path}: not a readable search checkpoint ({exc})") from None
        return evaluations, runs


def _number(value: Any, low: float, high: float) -> float:
    """`value` if it is a finite number in low..high (an edited or corrupted state is refused, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{str(value)[:20]} is not a number in {low:g}..{high:g}")
    return value


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng


# ---- outputs ----------------------------------------------------------------------------------


def candidates_frame(result: SearchResult) -> pd.DataFrame:
    """One row per evaluated Arch: the Arch, top-1, every cost, where it was found, and whether it fits each target."""
    rows = []
    for e in result.evaluations:
        costs = result.costs[e.arch]
        row = {"arch": e.arch.to_json(), "short": e.arch.short(), "top1": e.top1, **costs,
               "generation": e.generation, "found_by": e.target}
        row.update({f"fits[{t.label}]": t.fits(costs) for t in result.targets})
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_metric(result: SearchResult) -> str:
    """The cost the trade-off is drawn against: latency when the search priced it, else the first budget's."""
    names = next(iter(result.costs.values())).keys() if result.costs else ()
    return "latency_ms" if "latency_ms" in names else result.targets[0].budgets[0].metric


def pareto_frame(candidates: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The non-dominated rows: no other Arch is at least as accurate and at most as costly (one strictly)."""
    ordered = candidates.sort_values([metric, "top1"], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for index, top1 in ordered["top1"].items():
        if top1 > best:
            keep.append(index)
            best = top1
    return ordered.loc[keep].reset_index(drop=True)


def pareto_figure_png(result: SearchResult, candidates: pd.DataFrame, front: pd.DataFrame, metric: str) -> bytes:
    """Accuracy against `metric`: every candidate, the front, each budget on that metric, each chosen Arch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = ax.scatter(candidates[metric], candidates["top1"] * 100, c=candidates["generation"], cmap="viridis",
                        s=10, alpha=0.55, linewidths=0, label=f"candidates ({len(candidates)})")
    fig.colorbar(points, ax=ax, label="generation")
    ax.step(front[metric], front["top1"] * 100, where="post", color="black", lw=1.2, label="Pareto front")
    budget_limits = dict.fromkeys(b.limit for t in result.targets for b in t.budgets if b.metric == metric)
    for i, limit in enumerate(budget_limits):
        ax.axvline(limit, color="tab:red", ls="--", lw=1, label="budget" if i == 0 else None)
    for label, e in result.best.items():
        x = result.costs[e.arch][metric]
        ax.scatter([x], [e.top1 * 100], marker="*", s=180, color="tab:red", edgecolors="black", zorder=5)
        ax.annotate(label, (x, e.top1 * 100), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(metric.replace("_", " "))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{result.space.name}: {result.strategy} search, seed {result.seed}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def best_file(target: Constraints) -> str:
    return f"best_{target.slug}.yaml"


def write_results(result: SearchResult, out_dir: str | Path) -> list[Path]:
    """Write best_<budget>.yaml per target, candidates.csv, pareto.csv and pareto.png, each atomically.

    Everything is rendered in memory first, so a failure while plotting or formatting leaves
    no new file behind; each write is temp-then-rename, so none is ever half there.
    """
    out_dir = Path(out_dir)
    metric = pareto_metric(result)
    candidates = candidates_frame(result)
    front = pareto_frame(candidates, metric)
    rendered = {
        "candidates.csv": candidates.to_csv(index=False).encode(),
        "pareto.csv": front.to_csv(index=False).encode(),
        "pareto.png": pareto_figure_png(result, candidates, front, metric),
    }
    written = []
    for target in result.targets:
        e = result.best[target.label]
        path = out_dir / best_file(target)
        save_arch(e.arch, path, space=result.space.name, budget=target.label, top1=e.top1,
                  costs=result.costs[e.arch], strategy=result.strategy, seed=result.seed)
        written.append(path)
    for name, data in rendered.items():
        atomic_write(out_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
        written.append(out_dir / name)
    return written


def summary_table(result: SearchResult) -> str:
    """The terminal summary: one line per target with its best Arch, top-1 and costs."""
    names = list(next(iter(result.costs.values())).keys())
    header = ["budget", "best arch", "top1", *names]
    rows = [
        [label, e.arch.short(), f"{e.top1 * 100:.2f}%", *(f"{result.costs[e.arch][n]:.4g}" for n in names)]
        for label, e in result.best.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{result.strategy} search, seed {result.seed}: {len(result.evaluations)} Archs evaluated "
                 f"({result.fitness_calls} fitness calls in this run)")
    return "\n".join(lines)
