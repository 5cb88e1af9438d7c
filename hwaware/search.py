"""Evolutionary search for the most accurate Arch under latency, FLOPs and parameter budgets.

The search knows nothing of how an Arch is scored or priced: it takes a `fitness` callable
(Arch -> validation top-1, 0..1) and named `costs` callables (Arch -> float), so a notebook, a
test with a synthetic landscape and the CLI with a supernet checkpoint and latency tables all
drive the same code. Pure Python (no torch): every cost and score arrives through a callable.

A search has one or more *cells*, each a set of budgets that must hold together: one per
budget value (``latency_ms 1,2,5``), and for a fleet one per (target, budget), where a target's
latency is its own cost (``latency_ms[cpu:int8]``). All cells share one evolution: each
generation of `population` new Archs is split between the cells, and each cell breeds its
share from the best Archs of the whole cache that fit it. Why one population: a subnet's
accuracy does not depend on the target, only its price does, and budgets on correlated
devices select overlapping subnets, so 12 cells cost the evaluations of one search rather
than 12; the reported best for every cell is the best fitting Arch in the whole cache. With one
cell it is exactly AutoFormer's algorithm.

Constraints are enforced by rejection with a bounded number of tries, so a tight budget gives
a short generation, never a hang; a budget no subnet can meet is refused before anything runs,
with the cheapest cost the space reaches. Results are written by `hwaware.search_results`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import atomic_write_text
from hwaware.progress import progress
from hwaware.space import Arch, SearchSpace

__all__ = [
    "BUDGET_KINDS", "STATE_FILE", "Budget", "BudgetKind", "Constraints", "Evaluation", "EvolutionSearch",
    "SearchResult", "parse_budgets", "file_fingerprint", "cost_key",
]


# ---- budgets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget: the cost it bounds, whether it is a floor, its unit, and whether each target
    prices it itself (latency) or every target shares it (FLOPs, params). A new kind is one entry below;
    the CLI's budget flags are made from this list."""

    name: str
    metric: str
    lower: bool
    unit: str
    per_target: bool
    help: str


BUDGET_KINDS: dict[str, BudgetKind] = {k.name: k for k in (
    BudgetKind("latency_ms", "latency_ms", False, "ms", True,
               "latency budget(s) in ms on every target (5 or 1,2,5), or per target (t4=5,cpu:int8=40)"),
    BudgetKind("flops_g", "flops_g", False, "GFLOPs", False, "FLOPs budget(s) in G multiply-adds"),
    BudgetKind("params_m", "params_m", False, "M params", False, "parameter budget(s) in millions"),
    BudgetKind("min_params_m", "params_m", True, "M params", False, "lower bound on parameters (AutoFormer's window)"),
)}
STATE_FILE = "search_state.json"
ENUMERATE_UP_TO = 100_000  # subnets: below this a window's feasibility is decided by enumeration
_STATE_FORMAT = "hwaware-search-state/2"  # /2: one evolution shared by every cell


def cost_key(metric: str, target: str | None) -> str:
    """The name of a cost in a search's cost table: `latency_ms`, or `latency_ms[cpu:int8]` priced on a target."""
    return metric if target is None else f"{metric}[{target}]"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


@dataclass(frozen=True)
class Budget:
    """One bound on one cost: `latency_ms <= 2`, `params_m >= 0.05` for `min_params_m`, or
    `latency_ms[t4] <= 5` when `target` names the target whose table prices it."""

    name: str
    limit: float
    target: str | None = None

    def __post_init__(self):
        if self.name not in BUDGET_KINDS:
            raise HwawareError(f"budget: unknown budget {self.name!r} (known: {', '.join(BUDGET_KINDS)})")
        if self.target is not None and not BUDGET_KINDS[self.name].per_target:
            raise HwawareError(f"budget {self.name}: the same on every target, it cannot name one ({self.target!r})")
        limit = self.limit
        if isinstance(limit, str):
            try:
                limit = float(limit.strip())
            except ValueError:
                raise HwawareError(f"budget {self.name}: must be a positive number, got {self.limit!r}") from None
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise HwawareError(f"budget {self.name}: must be a positive number, got {self.limit!r}")
        if limit <= 0:
            raise HwawareError(f"budget {self.name}: must be positive, got {limit:g}")
        object.__setattr__(self, "limit", float(limit))

    kind = property(lambda self: BUDGET_KINDS[self.name])
    metric = property(lambda self: self.kind.metric)
    lower = property(lambda self: self.kind.lower)
    unit = property(lambda self: self.kind.unit)

    @property
    def cost(self) -> str:
        """The cost this budget bounds, as the search's cost table names it."""
        return cost_key(self.metric, self.target)

    @property
    def label(self) -> str:
        return f"{self.cost}{'>=' if self.lower else '<='}{self.limit:g}"

    @property
    def slug(self) -> str:
        return (f"{_slug(self.target)}_" if self.target else "") + f"{self.name}-{self.limit:g}"

    def fits(self, value: float) -> bool:
        return value >= self.limit if self.lower else value <= self.limit


@dataclass(frozen=True)
class Constraints:
    """Budgets that must all hold together: one cell of the search, which returns one best Arch per cell."""

    budgets: tuple[Budget, ...]

    def __post_init__(self):
        budgets = tuple(self.budgets)
        if not budgets:
            raise HwawareError("search: give at least one budget (" + ", ".join(BUDGET_KINDS) + ")")
        names = [b.cost + ("<" if b.lower else ">") for b in budgets]
        if len(set(names)) != len(names):
            raise HwawareError(f"search: budget {budgets[0].name} given twice in one cell")
        floors = {b.cost: b for b in budgets if b.lower}
        for ceiling in (b for b in budgets if not b.lower and b.cost in floors):
            if floors[ceiling.cost].limit > ceiling.limit:
                floor = floors[ceiling.cost]
                raise HwawareError(f"budget {floor.name}: {floor.limit:g} is above budget {ceiling.name} "
                                   f"{ceiling.limit:g}")
        object.__setattr__(self, "budgets", budgets)

    @classmethod
    def of(cls, *budgets: Budget) -> Constraints:
        return cls(tuple(budgets))

    @property
    def label(self) -> str:
        return " & ".join(b.label for b in self.budgets)

    @property
    def slug(self) -> str:
        """File-name friendly label: `latency_ms-2_params_m-0.5`, `cpu-int8_latency_ms-40`."""
        return "_".join(b.slug for b in self.budgets)

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets whose own costs this cell bounds: none, one, or every target (a subnet for all of them)."""
        return tuple(dict.fromkeys(b.target for b in self.budgets if b.target is not None))

    def fits(self, costs: Mapping[str, float]) -> bool:
        return all(b.fits(costs[b.cost]) for b in self.budgets)


def _values(name: str, value: Any) -> list:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(item, str) and not item.strip() for item in items):
        raise HwawareError(f"budget {name}: must be a positive number or a comma list of them, got {value!r}")
    return items


def parse_budgets(values: Mapping[str, Any], targets: Sequence[str] = (), one_for_all: bool = False
                  ) -> list[Constraints]:
    """Budget values -> the search's cells.

    `values` maps a budget name to None (not given), a number, or a comma list such as "1,2,5".
    Each combination of one value per given budget is one cell, so `latency_ms 1,2,5, params_m 0.1`
    gives three cells, each also bounded to 0.1 M params. With several `targets`, a per-target
    budget (latency) is one cell per target and value; `t4=5,cpu:int8=40` bounds targets one by
    one, a bare value every target not named. `one_for_all` adds, per budget rank, the cell whose
    subnet meets every target's budget at once (one model served on the whole fleet).
    """
    targets = list(targets)
    shared: list[list[Budget]] = []  # one list of choices per budget every cell shares
    per_target: dict[str | None, list[list[Budget]]] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in BUDGET_KINDS:
            raise HwawareError(f"budget: unknown budget {name!r} (known: {', '.join(BUDGET_KINDS)})")
        items = _values(name, value)
        if not BUDGET_KINDS[name].per_target or len(targets) < 2:
            named = [str(i).split("=", 1) for i in items if isinstance(i, str) and "=" in i]
            for target, _ in named:
                if not BUDGET_KINDS[name].per_target:
                    raise HwawareError(f"budget {name}: the same on every target, it cannot name one "
                                       f"({target.strip()[:40]!r})")
                if target.strip() not in targets:
                    raise HwawareError(f"budget {name}: names target {target.strip()!r}, which is not in this search"
                                       + (f" (targets: {', '.join(targets)})" if targets else " (it has no targets)"))
            items = [i.split("=", 1)[1] if isinstance(i, str) and "=" in i else i for i in items]
            shared.append(list(dict.fromkeys(Budget(name, item) for item in items)))
            continue
        bare, named = [], {}
        for item in items:
            if isinstance(item, str) and "=" in item:
                target, limit = (part.strip() for part in item.split("=", 1))
                if target not in targets:
                    raise HwawareError(f"budget {name}: names target {target!r}, which is not in this search "
                                       f"(targets: {', '.join(targets)})")
                named.setdefault(target, []).append(limit)
            else:
                bare.append(item)
        for target in targets:
            limits = named.get(target, bare)
            if limits:
                per_target.setdefault(target, []).append(
                    list(dict.fromkeys(Budget(name, limit, target) for limit in limits)))
    if not shared and not per_target:
        raise HwawareError("search: give at least one budget (" + ", ".join(BUDGET_KINDS) + ")")
    cells = ([Constraints(combo) for choices in per_target.values() for combo in itertools.product(*choices, *shared)]
             if per_target else [Constraints(combo) for combo in itertools.product(*shared)])
    if one_for_all:
        cells += _one_for_all_cells(per_target, shared, targets)
    return cells


def _one_for_all_cells(per_target: dict, shared: list[list[Budget]], targets: list[str]) -> list[Constraints]:
    """Per budget rank (the i-th value of every target), one cell bounding every target at once."""
    if len(targets) < 2 or set(per_target) != set(targets):
        raise HwawareError("search: one subnet for every target needs two or more targets, each with a latency "
                           f"budget (targets: {', '.join(targets) or 'none'})")
    cells = []
    for kind_index in range(len(next(iter(per_target.values())))):
        ranks = {len(choices[kind_index]) for choices in per_target.values()}
        if len(ranks) != 1:
            raise HwawareError("search: one subnet for every target pairs the targets' budgets by rank, so every "
                               "target needs as many budget values")
        for rank in range(ranks.pop()):
            together = tuple(per_target[t][kind_index][rank] for t in targets)
            cells += [Constraints(together + combo) for combo in itertools.product(*shared)]
    return cells


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
    """One scored Arch and where it was first met: the generation and the cell whose share bred it."""

    arch: Arch
    top1: float
    generation: int
    cell: str


@dataclass
class _Run:
    """The resumable state of one cell's share of the evolution: completed generations, what it bred, its RNG."""

    generation: int
    visited: list[Arch]
    rng: random.Random
    seen: set[Arch] = field(default_factory=set)

    def __post_init__(self):
        self.seen = set(self.visited)


@dataclass
class SearchResult:
    space: SearchSpace
    cells: list[Constraints]
    strategy: str
    seed: int
    evaluations: list[Evaluation]  # every unique Arch scored, in evaluation order
    costs: dict[Arch, dict[str, float]]  # every cost of every evaluated Arch
    best: dict[str, Evaluation]  # cell label -> best fitting Arch in the whole cache
    fitness_calls: int  # cache misses in this process (evaluations restored from a checkpoint are not counted)
    cached_scores: int = 0  # of those, scores an accuracy cache served (set by whoever wrapped the fitness)


class EvolutionSearch:
    """AutoFormer's evolution (or random search at equal evaluations) under budgets.

    Each generation's `population` new Archs are shared out between the cells (the remainder
    going round, one more cell per generation). Generation 0 samples each share of fitting Archs
    at random. In each later generation a cell keeps as parents the `parents` best Archs of the
    whole cache that fit it, breeds its share of `mutation_children` by mutation (per layer with
    `layer_mutation_prob`, depth/embed dim with `global_mutation_prob`) and of
    `crossover_children` by crossover, and fills the rest of its share at random. A child is kept
    only if it fits the cell and is new to the cache, within `max_tries` attempts per wanted
    child. `strategy="random"` samples every generation at random: the same number of
    evaluations, the baseline.

    `warm_start` (Arch -> known top-1) puts every known Arch that fits a cell into its generation 0,
    which then samples at random only what is left of its share. `fingerprint` (JSON-able, e.g. checkpoint and table paths with their sizes and mtimes) is
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
        warm_start: Mapping[Arch, float] | None = None,
    ):
        self.space, self.fitness, self.costs = space, fitness, dict(costs)
        self.cells = [b if isinstance(b, Constraints) else Constraints.of(b) for b in budgets]
        if not self.cells:
            raise HwawareError("search: give at least one budget (" + ", ".join(BUDGET_KINDS) + ")")
        labels = [t.label for t in self.cells]
        if len(set(labels)) != len(labels):
            raise HwawareError(f"search: budget {labels[0]} given twice")
        for budget in (b for t in self.cells for b in t.budgets):
            if budget.cost not in self.costs:
                raise HwawareError(
                    f"budget {budget.name}: no cost function for {budget.cost} (have: {', '.join(self.costs) or 'none'})"
                )
        for name, value, low in (
            ("population", population, 1), ("generations", generations, 1), ("parents", parents, 1),
            ("mutation_children", mutation_children, 0), ("crossover_children", crossover_children, 0),
            ("max_tries", max_tries, 1), ("feasibility_samples", feasibility_samples, 0), ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise HwawareError(f"search {name}: must be an integer >= {low}, got {value!r}")
        if mutation_children + crossover_children > population:
            raise HwawareError(
                f"search population: {population} is smaller than mutation_children {mutation_children} "
                f"+ crossover_children {crossover_children}"
            )
        for name, value in (("layer_mutation_prob", layer_mutation_prob), ("global_mutation_prob", global_mutation_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise HwawareError(f"search {name}: must be a probability in 0..1, got {value!r}")
        if strategy not in ("evolution", "random"):
            raise HwawareError(f"search strategy: must be 'evolution' or 'random', got {strategy!r}")
        self.population, self.generations, self.parents = population, generations, parents
        self.mutation_children, self.crossover_children = mutation_children, crossover_children
        self.layer_mutation_prob, self.global_mutation_prob = float(layer_mutation_prob), float(global_mutation_prob)
        self.max_tries, self.feasibility_samples = max_tries, feasibility_samples
        self.strategy, self.seed, self.progress = strategy, seed, progress
        # What the scores and costs come from (checkpoint, table): a resumed cache must come from the same.
        self.fingerprint = dict(fingerprint or {})
        self._cost_memo: dict[Arch, dict[str, float]] = {}
        self._witnesses: dict[str, list[Arch]] | None = None
        # Archs whose score is already known (an accuracy cache): each cell's generation 0 takes all that fit it
        # (free) before sampling at random, so a search for a new target starts from what earlier ones scored.
        self.warm_start = sorted(warm_start or {}, key=lambda a: -warm_start[a])

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
        """Refuse at once a budget no subnet meets; return, per cell, probed Archs that meet it.

        Decided once per search (the answer is kept): every cell is checked before anything runs,
        so one infeasible cell refuses the whole search, naming its budget and the cheapest cost.

        The cheapest reachable cost is not assumed to be the smallest subnet's (a measured block
        with more heads can be faster): it is the minimum over the smallest and largest subnets,
        a per-layer descent for every budget (exact for costs that add up per layer, as latency
        tables, FLOPs and params do), and a random sample for costs that do not.
        """
        if self._witnesses is not None:
            return self._witnesses
        rng = random.Random(f"{self.seed}:feasibility")
        metrics = dict.fromkeys((b.cost, b.lower) for t in self.cells for b in t.budgets)
        probes = list(dict.fromkeys(
            [self.space.smallest(), self.space.largest()]
            + [arch for metric, lower in metrics for arch in self._layerwise_extremes(metric, lower)]
            + [self.space.sample(rng) for _ in range(self.feasibility_samples)]
        ))
        witnesses = {}
        for cell in self.cells:
            for budget in cell.budgets:
                pick = max if budget.lower else min
                extreme = pick(probes, key=lambda a, m=budget.cost: self.arch_costs(a)[m])
                value = self.arch_costs(extreme)[budget.cost]
                if not budget.fits(value):
                    reach = "the largest reaches" if budget.lower else "the cheapest reaches"
                    raise HwawareError(
                        f"budget {budget.label}: no subnet of space {self.space.name} fits; "
                        f"{reach} {value:.4g} {budget.unit} ({extreme.short()})"
                    )
            fitting = [a for a in probes if cell.fits(self.arch_costs(a))]
            if not fitting:
                fitting = self._find_in_window(cell, probes)
            witnesses[cell.label] = fitting
        self._witnesses = witnesses
        return witnesses

    def _find_in_window(self, cell: Constraints, probes: list[Arch]) -> list[Arch]:
        """Fitting Archs for a cell whose bounds are each reachable but not together (a window such as
        --min-params-m 0.059 --params-m 0.06): every subnet where the space is small enough to enumerate
        (exact), else a descent from the nearest probes; refused in one line when none is found."""
        count = self.space.num_subnets()
        if count <= ENUMERATE_UP_TO:
            fitting = [a for a in all_subnets(self.space) if cell.fits(self.arch_costs(a))]
            if fitting:
                return fitting
            raise HwawareError(f"search: no subnet of space {self.space.name} meets {cell.label} "
                               f"(all {count:,} enumerated)")
        found = self._descend_into(cell, sorted(probes, key=lambda a: self._violation(cell, a))[:8])
        if found is None:
            raise HwawareError(
                f"search: found no subnet of space {self.space.name} meeting {cell.label} among {len(probes)} "
                f"probes and a descent from the nearest; the space ({count:.3g} subnets) is too large to "
                "enumerate, so one may exist: widen the window")
        return [found]

    def _violation(self, cell: Constraints, arch: Arch) -> float:
        """How far `arch` is outside `cell`'s budgets, relative to each limit (0 when it fits)."""
        costs = self.arch_costs(arch)
        return sum(max(0.0, (b.limit - costs[b.cost]) if b.lower else (costs[b.cost] - b.limit)) / b.limit
                   for b in cell.budgets)

    def _descend_into(self, cell: Constraints, starts: list[Arch], max_steps: int = 200) -> Arch | None:
        """A fitting Arch reached by greedy single changes (a layer's heads or ratio, depth, embed dim) that
        shrink the violation; for a window of lower and upper bounds, which the per-budget extremes
        above cannot prove empty or not. None if every start gets stuck outside."""
        space = self.space
        for arch in starts:
            for _ in range(max_steps):
                if cell.fits(self.arch_costs(arch)):
                    return arch
                moves = [Arch(d, arch.num_heads, arch.mlp_ratios) for d in space.embed_dims]
                for depth in space.depths:
                    extra = depth - arch.depth
                    moves.append(Arch(arch.embed_dim, (arch.num_heads + arch.num_heads[-1:] * extra)[:depth],
                                      (arch.mlp_ratios + arch.mlp_ratios[-1:] * extra)[:depth]))
                for i, (h, r) in itertools.product(range(arch.depth), itertools.product(space.num_heads, space.mlp_ratios)):
                    moves.append(Arch(arch.embed_dim, arch.num_heads[:i] + (h,) + arch.num_heads[i + 1:],
                                      arch.mlp_ratios[:i] + (r,) + arch.mlp_ratios[i + 1:]))
                best = min(moves, key=lambda a: self._violation(cell, a))
                if self._violation(cell, best) >= self._violation(cell, arch):
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
        """Search every cell; with `checkpoint`, resume from it if it exists and save it after each cell's share.

        Under torchrun every rank runs the same deterministic search (the fitness all-reduces),
        reads the same checkpoint, and only rank 0 passes `save_checkpoint=True`.
        """
        witnesses = self.check_feasible()
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        evaluations: dict[Arch, Evaluation] = {}
        runs: dict[str, _Run] = {}
        if checkpoint is not None and checkpoint.exists():
            evaluations, runs, self.warm_start = self._load_state(checkpoint)
        for cell in self.cells:
            runs.setdefault(cell.label, _Run(0, [], random.Random(f"{self.seed}:{cell.label}")))
        fitness_calls = 0
        done = min(run.generation for run in runs.values())
        what = self.cells[0].label if len(self.cells) == 1 else f"{len(self.cells)} cells"
        with progress(total=self.generations, initial=done, desc=f"{self.strategy} {what}", unit="gen",
                      file=sys.stderr, disable=not self.progress, dynamic_ncols=True, every=1) as bar:
            for generation in range(done, self.generations):
                for cell, share in zip(self.cells, self._shares(generation), strict=True):
                    run = runs[cell.label]
                    if run.generation > generation:  # finished before a kill
                        continue
                    children = self._next_generation(cell, run, share, witnesses[cell.label], evaluations)
                    for arch in children:
                        if arch not in evaluations:
                            evaluations[arch] = Evaluation(arch, self._score(arch), generation, cell.label)
                            fitness_calls += 1
                    run.visited.extend(children)
                    run.seen.update(children)
                    run.generation += 1
                    if checkpoint is not None and save_checkpoint:
                        self._save_state(checkpoint, evaluations, runs)
                if evaluations:
                    bar.set_postfix(best=f"{max(e.top1 for e in evaluations.values()):.4f}",
                                    evaluated=len(evaluations), refresh=False)
                bar.update()
        ordered = list(evaluations.values())
        return SearchResult(
            space=self.space, cells=list(self.cells), strategy=self.strategy, seed=self.seed,
            evaluations=ordered, costs={e.arch: self.arch_costs(e.arch) for e in ordered},
            best={t.label: self._best(ordered, t) for t in self.cells}, fitness_calls=fitness_calls,
        )

    def _shares(self, generation: int) -> list[int]:
        """Each cell's share of a generation's `population`; the remainder goes round the cells generation by
        generation, so with more cells than `population` every cell still gets its turn."""
        count = len(self.cells)
        base, extra = divmod(self.population, count)
        first = (generation * extra) % count
        return [base + ((i - first) % count < extra) for i in range(count)]

    def _score(self, arch: Arch) -> float:
        value = self.fitness(arch)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HwawareError(f"fitness: returned {value!r} for {arch.short()}, expected a finite number")
        return float(value)

    def _best(self, evaluations: list[Evaluation], cell: Constraints) -> Evaluation:
        """Highest top-1 among cached Archs that fit; ties go to the lower first-budget cost, then the earlier."""
        metric = cell.budgets[0].cost
        fitting = [e for e in evaluations if cell.fits(self.arch_costs(e.arch))]
        return min(fitting, key=lambda e: (-e.top1, self.arch_costs(e.arch)[metric]))

    def _next_generation(
        self, cell: Constraints, run: _Run, share: int, witnesses: list[Arch], evaluations: Mapping[Arch, Evaluation]
    ) -> list[Arch]:
        """The Archs this cell adds this generation: new to the cache, fitting the cell, at most `share`."""
        rng, space = run.rng, self.space
        children: list[Arch] = []
        taken = set(evaluations) | run.seen

        def breed(make: Callable[[], Arch], wanted: int) -> None:
            goal = len(children) + wanted
            for _ in range(wanted * self.max_tries):
                if len(children) >= goal:
                    return
                child = make()
                if child not in taken and cell.fits(self.arch_costs(child)):
                    children.append(child)
                    taken.add(child)

        fitting = [a for a in evaluations if cell.fits(self.arch_costs(a))]
        if self.strategy == "evolution" and run.visited and fitting and share:
            # Stable sort: ties keep evaluation order, so the parents are deterministic.
            parents = sorted(fitting, key=lambda a: -evaluations[a].top1)[: self.parents]

            def mutate() -> Arch:
                return space.mutate(rng.choice(parents), rng, self.layer_mutation_prob, self.global_mutation_prob)

            def cross() -> Arch:
                a, b = rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
                return space.crossover(a, b, rng)

            breed(mutate, round(self.mutation_children * share / self.population))
            breed(cross, round(self.crossover_children * share / self.population))
        if not run.visited:  # every known Arch that fits joins generation 0: its score costs nothing
            for arch in self.warm_start:
                if arch not in taken and cell.fits(self.arch_costs(arch)):
                    children.append(arch)
                    taken.add(arch)
        breed(lambda: space.sample(rng), share - len(children))
        # Random sampling rarely hits a tight budget; the probed Archs known to fit top the generation up.
        for arch in witnesses:
            if len(children) >= share:
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
            "cells": [t.label for t in self.cells], "costs": list(self.costs), "fingerprint": self.fingerprint,
        }
        return json.loads(json.dumps(config))

    def _save_state(self, path: Path, evaluations: dict[Arch, Evaluation], runs: dict[str, _Run]) -> None:
        index = {arch: i for i, arch in enumerate(evaluations)}
        state = {
            "format": _STATE_FORMAT,
            "config": self._config(),
            "evaluations": [
                {"arch": e.arch.to_dict(), "top1": e.top1, "generation": e.generation, "cell": e.cell}
                for e in evaluations.values()
            ],
            "warm_start": [arch.to_dict() for arch in self.warm_start],
            "runs": {
                label: {"generation": run.generation, "visited": [index[a] for a in run.visited],
                        "rng": _rng_to_json(run.rng)}
                for label, run in runs.items()
            },
        }
        atomic_write_text(path, json.dumps(state))

    def _load_state(self, path: Path) -> tuple[dict[Arch, Evaluation], dict[str, _Run], list[Arch]]:
        """Evaluations, each cell's run, and the warm start the search began with (a resumed search keeps it,
        though the accuracy cache has grown since)."""
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
            labels = {t.label for t in self.cells}
            evaluations = {}
            for item in state["evaluations"]:
                arch = self.space.validate(Arch.from_dict(item["arch"], source=str(path)))
                top1, generation = _number(item["top1"], 0.0, 1.0), int(_number(item["generation"], 0, self.generations))
                if item["cell"] not in labels:
                    raise ValueError(f"evaluation for unknown cell {str(item['cell'])[:40]!r}")
                evaluations[arch] = Evaluation(arch, top1, generation, item["cell"])
            archs = list(evaluations)
            warm = [self.space.validate(Arch.from_dict(a, source=str(path))) for a in state["warm_start"]]
            runs = {}
            for label, r in state["runs"].items():
                if label not in labels:
                    raise ValueError(f"run for unknown cell {str(label)[:40]!r}")
                visited = [archs[int(_number(i, 0, len(archs) - 1))] for i in r["visited"]]
                runs[label] = _Run(int(_number(r["generation"], 0, self.generations)), visited, _rng_from_json(r["rng"]))
        except HwawareError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise HwawareError(f"{path}: not a readable search checkpoint ({exc})") from None
        return evaluations, runs, warm


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


