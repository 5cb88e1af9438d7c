"""Evolutionary search on the `digits` space with synthetic fitness and latency, real FLOPs/params."""

import json
import math
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hwaware import search_results as results_module
from hwaware.errors import HwawareError
from hwaware.pipeline import standard_costs
from hwaware.search import STATE_FILE, Budget, Constraints, EvolutionSearch, file_fingerprint, parse_budgets
from hwaware.search_results import best_file, summary_table, write_results
from hwaware.space import Arch, get_space, load_arch

SPACE = get_space("digits")
# Each layer has a preferred head count and MLP ratio; only evolution finds them all in few evaluations.
PREFERRED_HEADS, PREFERRED_RATIOS = (1, 4, 2, 4), (4.0, 2.0, 3.0, 2.0)


def synthetic_latency(arch: Arch) -> float:
    """ms; grows with depth, heads and MLP width, like a latency table's sum of pieces."""
    blocks = sum(0.04 + 0.03 * h + 0.002 * arch.embed_dim * r for h, r in arch.layers())
    return 0.1 + 0.002 * arch.embed_dim + blocks


def synthetic_top1(arch: Arch) -> float:
    matches = sum((h == PREFERRED_HEADS[i]) + (r == PREFERRED_RATIOS[i]) for i, (h, r) in enumerate(arch.layers()))
    noise = (zlib.crc32(arch.to_json().encode()) % 1000) / 1e6  # deterministic, breaks ties
    return 0.5 + 0.02 * arch.depth + 0.05 * matches / 8 + 0.001 * arch.embed_dim / 64 + noise


class CountingFitness:
    """Records every call; raises after `fail_after` calls to simulate a kill in the middle of a generation."""

    def __init__(self, fail_after: int | None = None):
        self.calls: Counter = Counter()
        self.fail_after = fail_after

    def __call__(self, arch: Arch) -> float:
        if self.fail_after is not None and sum(self.calls.values()) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls[arch] += 1
        return synthetic_top1(arch)


@pytest.fixture(scope="module")
def costs():
    return standard_costs(SPACE, latency_ms=synthetic_latency)


SMALL = dict(population=12, generations=5, parents=4, mutation_children=5, crossover_children=5, progress=False)


def make_search(costs, budgets, fitness=synthetic_top1, **overrides):
    return EvolutionSearch(SPACE, fitness, costs, budgets, **{**SMALL, **overrides})


def trace(result):
    return [(e.arch, e.top1, e.generation, e.cell) for e in result.evaluations], result.best


# ---- budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"latency_ms": "0"}, "budget latency_ms: must be positive, got 0"),
        ({"latency_ms": -1}, "budget latency_ms: must be positive, got -1"),
        ({"flops_g": "abc"}, "budget flops_g: must be a positive number, got 'abc'"),
        ({"params_m": "1,,2"}, "budget params_m: must be a positive number or a comma list"),
        ({"params_m": "nan"}, "budget params_m: must be a positive number"),
        ({"min_params_m": float("inf")}, "budget min_params_m: must be a positive number"),
        ({"latency_ms": True}, "budget latency_ms: must be a positive number"),
        ({"latency_ms": None}, "give at least one budget"),
        ({"watts": 3}, "unknown budget 'watts'"),
        ({"params_m": 0.1, "min_params_m": 0.2}, "budget min_params_m: 0.2 is above budget params_m 0.1"),
        ({"latency_ms": "t4=5"}, "budget latency_ms: names target 't4', which is not in this search"),
    ],
)
def test_bad_budgets_are_rejected_naming_the_budget(values, message):
    with pytest.raises(HwawareError, match=message.replace("(", r"\(").replace(",", ",")):
        parse_budgets(values)


def test_each_combination_of_budget_values_is_one_target():
    targets = parse_budgets({"latency_ms": "1, 2,5", "flops_g": None, "params_m": 0.1})
    assert [t.label for t in targets] == [
        "latency_ms<=1 & params_m<=0.1", "latency_ms<=2 & params_m<=0.1", "latency_ms<=5 & params_m<=0.1",
    ]
    assert targets[0].slug == "latency_ms-1_params_m-0.1"
    assert Constraints.of(Budget("min_params_m", 0.05)).fits({"params_m": 0.06})
    assert not Constraints.of(Budget("min_params_m", 0.05)).fits({"params_m": 0.04})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"population": 0}, "search population: must be an integer >= 1"),
        ({"population": 8}, "search population: 8 is smaller than mutation_children 5 \\+ crossover_children 5"),
        ({"layer_mutation_prob": 1.5}, "search layer_mutation_prob: must be a probability"),
        ({"strategy": "greedy"}, "search strategy: must be 'evolution' or 'random'"),
        ({"generations": 2.5}, "search generations: must be an integer"),
    ],
)
def test_bad_search_settings_are_rejected(costs, overrides, message):
    with pytest.raises(HwawareError, match=message):
        make_search(costs, [Budget("latency_ms", 1)], **overrides)


def test_a_budget_without_its_cost_function_is_rejected():
    with pytest.raises(HwawareError, match="budget latency_ms: no cost function for latency_ms"):
        EvolutionSearch(SPACE, synthetic_top1, {"params_m": lambda a: 1.0}, [Budget("latency_ms", 1)])


# ---- feasibility -----------------------------------------------------------------------------


def test_infeasible_budget_raises_at_once_with_the_cheapest_cost(costs):
    cheapest = synthetic_latency(SPACE.smallest())
    search = make_search(costs, parse_budgets({"latency_ms": "0.1,1"}), fitness=CountingFitness(fail_after=0))
    with pytest.raises(HwawareError) as info:
        search.run()
    assert str(info.value) == (f"budget latency_ms<=0.1: no subnet of space digits fits; the cheapest reaches "
                               f"{cheapest:.4g} ms ({SPACE.smallest().short()})")


def test_infeasible_lower_bound_names_the_largest(costs):
    largest_params = costs["params_m"](SPACE.largest())
    with pytest.raises(HwawareError, match=f"budget params_m>=5: .*the largest reaches {largest_params:.4g} M params"):
        make_search(costs, [Budget("min_params_m", 5)]).run()


def test_cheapest_cost_is_searched_not_assumed_at_the_smallest_arch():
    # A cost that is not monotone: the smallest Arch (embed 32) is not the cheapest (embed 48 is).
    odd = {"latency_ms": lambda a: abs(a.embed_dim - 48) + a.depth}
    search = EvolutionSearch(SPACE, synthetic_top1, odd, [Budget("latency_ms", 1)], progress=False)
    with pytest.raises(HwawareError, match="the cheapest reaches 2 ms \\(d48-L2-"):
        search.check_feasible()


def test_cheapest_cost_is_found_where_random_sampling_would_miss_it():
    # Cheapest only with depth 4 and every layer at (2 heads, ratio 3): one Arch in 19683 samples.
    odd = {"latency_ms": lambda a: 0.1 + (4 - a.depth) + sum(h != 2 or r != 3.0 for h, r in a.layers())}
    with pytest.raises(HwawareError, match=r"budget latency_ms<=0.05: .* the cheapest reaches 0.1 ms \(d32-L4-h2222-r3/3/3/3\)"):
        EvolutionSearch(SPACE, synthetic_top1, odd, [Budget("latency_ms", 0.05)], progress=False).check_feasible()
    witnesses = EvolutionSearch(SPACE, synthetic_top1, odd, [Budget("latency_ms", 0.1)]).check_feasible()
    assert [a.short() for a in witnesses["latency_ms<=0.1"]] == ["d32-L4-h2222-r3/3/3/3", "d48-L4-h2222-r3/3/3/3",
                                                                  "d64-L4-h2222-r3/3/3/3"]


def test_budgets_feasible_alone_but_not_together_raise(costs):
    target = Constraints.of(Budget("latency_ms", 0.6), Budget("min_params_m", 0.15))
    with pytest.raises(HwawareError, match="no subnet of space digits meets latency_ms<=0.6 & params_m>=0.15"):
        make_search(costs, [target]).run()


def test_a_budget_only_the_smallest_meets_still_returns_it(costs):
    # Random sampling hits the smallest Arch once in 729 draws; the feasibility probe's witness supplies it.
    only_smallest = synthetic_latency(SPACE.smallest())
    result = make_search(costs, [Budget("latency_ms", only_smallest)], max_tries=1).run()
    assert [e.arch for e in result.evaluations] == [SPACE.smallest()]


# ---- the search ------------------------------------------------------------------------------


def test_every_candidate_fits_the_budgets_of_the_run_that_bred_it(costs):
    targets = parse_budgets({"latency_ms": "0.8,1.5", "min_params_m": 0.03})
    result = make_search(costs, targets).run()
    by_label = {t.label: t for t in targets}
    assert len(result.evaluations) > SMALL["population"]
    for e in result.evaluations:
        assert by_label[e.cell].fits(result.costs[e.arch]), e
        assert result.costs[e.arch]["latency_ms"] == synthetic_latency(e.arch)
    for target in targets:
        assert target.fits(result.costs[result.best[target.label].arch])


def test_same_seed_same_result_other_seed_other_result(costs):
    targets = parse_budgets({"latency_ms": "1,1.5"})
    first, again = make_search(costs, targets, seed=3).run(), make_search(costs, targets, seed=3).run()
    assert trace(first) == trace(again)
    assert trace(first)[0] != trace(make_search(costs, targets, seed=4).run())[0]


def test_fitness_is_called_once_per_unique_arch_across_generations_and_budgets(costs):
    fitness = CountingFitness()
    targets = parse_budgets({"latency_ms": "1.5,1.6,1.7"})
    result = make_search(costs, targets, fitness=fitness, generations=8).run()
    assert set(fitness.calls.values()) == {1}
    assert result.fitness_calls == len(fitness.calls) == len(result.evaluations)
    visits = len(targets) * SMALL["population"] * 8
    assert len(result.evaluations) < visits  # the later budgets reused the earlier ones' evaluations


def test_random_strategy_uses_the_same_number_of_evaluations(costs):
    evolution = make_search(costs, [Budget("latency_ms", 2)]).run()
    random_search = make_search(costs, [Budget("latency_ms", 2)], strategy="random").run()
    assert len(evolution.evaluations) == len(random_search.evaluations) == SMALL["population"] * SMALL["generations"]


def test_evolution_beats_random_search_on_average():
    latency = {"latency_ms": synthetic_latency}
    settings = dict(population=20, generations=10, parents=5, mutation_children=10, crossover_children=10)
    best = {
        strategy: [
            make_search(latency, [Budget("latency_ms", 1.5)], strategy=strategy, seed=seed, **settings)
            .run().best["latency_ms<=1.5"].top1
            for seed in range(5)
        ]
        for strategy in ("evolution", "random")
    }
    assert statistics.mean(best["evolution"]) > statistics.mean(best["random"]) + 0.005, best


def test_non_finite_fitness_is_an_error(costs):
    with pytest.raises(HwawareError, match="fitness: returned nan for d"):
        make_search(costs, [Budget("latency_ms", 2)], fitness=lambda a: math.nan).run()


# ---- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kill_after_calls", [0, 30, 45])  # before the first save, in generation 2, in the last
def test_killed_and_rerun_ends_like_an_uninterrupted_run(tmp_path, costs, kill_after_calls):
    targets = parse_budgets({"latency_ms": "1.5,1"})
    reference = make_search(costs, targets, seed=7).run()
    state = tmp_path / STATE_FILE
    with pytest.raises(KeyboardInterrupt):
        make_search(costs, targets, seed=7, fitness=CountingFitness(fail_after=kill_after_calls)).run(checkpoint=state)
    saved = json.loads(state.read_text()) if state.exists() else {"evaluations": []}
    assert state.exists() == (kill_after_calls >= SMALL["population"] // 2)  # saved after the first cell's share
    fitness = CountingFitness()
    resumed = make_search(costs, targets, seed=7, fitness=fitness).run(checkpoint=state)
    assert trace(resumed) == trace(reference)
    assert len(fitness.calls) == len(reference.evaluations) - len(saved["evaluations"])  # nothing scored twice
    assert not set(fitness.calls) & {Arch.from_dict(item["arch"]) for item in saved["evaluations"]}


KILLED_SEARCH = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_search import SMALL, synthetic_latency, synthetic_top1
from hwaware.search import EvolutionSearch, parse_budgets
from hwaware.space import get_space

def slow_top1(arch):
    time.sleep(0.01)
    return synthetic_top1(arch)

search = EvolutionSearch(get_space("digits"), slow_top1, {"latency_ms": synthetic_latency},
                         parse_budgets({"latency_ms": "1.5"}), **{**SMALL, "generations": 40}, seed=5)
search.run(checkpoint=sys.argv[1])
"""


def test_sigkilled_process_resumes_to_the_uninterrupted_result(tmp_path):
    latency = {"latency_ms": synthetic_latency}
    settings = dict(generations=40, seed=5)
    reference = make_search(latency, parse_budgets({"latency_ms": "1.5"}), **settings).run()
    state = tmp_path / STATE_FILE
    child = subprocess.Popen([sys.executable, "-c", KILLED_SEARCH, str(state), str(Path(__file__).parent)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if state.exists() and json.loads(state.read_text())["runs"]["latency_ms<=1.5"]["generation"] >= 3:
            break
        time.sleep(0.02)
    assert child.poll() is None, "the search ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = json.loads(state.read_text())["runs"]["latency_ms<=1.5"]["generation"]
    assert 3 <= saved < 40
    fitness = CountingFitness()
    resumed = make_search(latency, parse_budgets({"latency_ms": "1.5"}), fitness=fitness, **settings).run(checkpoint=state)
    assert trace(resumed) == trace(reference)
    assert len(fitness.calls) < len(reference.evaluations)


def test_a_checkpoint_of_another_search_is_refused(tmp_path, costs):
    state = tmp_path / STATE_FILE
    make_search(costs, [Budget("latency_ms", 1)], generations=1).run(checkpoint=state)
    with pytest.raises(HwawareError, match="written by a different search \\(differs in seed\\)"):
        make_search(costs, [Budget("latency_ms", 1)], generations=1, seed=1).run(checkpoint=state)
    weights = tmp_path / "supernet.pt"
    weights.write_bytes(b"retrained")
    with pytest.raises(HwawareError, match="differs in fingerprint"):
        make_search(costs, [Budget("latency_ms", 1)], generations=1, fingerprint=file_fingerprint(checkpoint=weights)
                    ).run(checkpoint=state)
    state.write_text("{not json")
    with pytest.raises(HwawareError, match="not a readable search checkpoint"):
        make_search(costs, [Budget("latency_ms", 1)], generations=1).run(checkpoint=state)


# ---- outputs ---------------------------------------------------------------------------------


def test_output_files_parse_and_match_the_result(tmp_path, costs):
    targets = parse_budgets({"latency_ms": "1,1.5"})
    result = make_search(costs, targets).run()
    written = write_results(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == sorted(
        ["best_latency_ms-1.yaml", "best_latency_ms-1.5.yaml", "candidates.csv", "pareto.csv", "pareto.png",
         "matrix.csv", "matrix.md"]
    )
    for target in targets:
        best = result.best[target.label]
        path = tmp_path / best_file(target)
        assert load_arch(path, SPACE) == best.arch
        extra = yaml.safe_load(path.read_text())
        assert extra["top1"] == best.top1 and extra["budget"] == target.label and extra["space"] == "digits"
        assert extra["costs"]["latency_ms"] == pytest.approx(synthetic_latency(best.arch))

    candidates = pd.read_csv(tmp_path / "candidates.csv")
    assert len(candidates) == len(result.evaluations)
    archs = [Arch.from_dict(json.loads(text)) for text in candidates["arch"]]
    assert archs == [e.arch for e in result.evaluations]
    assert candidates["top1"].tolist() == pytest.approx([synthetic_top1(a) for a in archs])
    assert candidates["params_m"].tolist() == pytest.approx([costs["params_m"](a) for a in archs])
    assert candidates["fits[latency_ms<=1]"].tolist() == [synthetic_latency(a) <= 1 for a in archs]

    front = pd.read_csv(tmp_path / "pareto.csv")
    assert set(front["arch"]) <= set(candidates["arch"])
    for _, row in front.iterrows():  # nothing in the candidates dominates a front point
        dominated = (candidates["latency_ms"] <= row["latency_ms"]) & (candidates["top1"] >= row["top1"]) & (
            (candidates["latency_ms"] < row["latency_ms"]) | (candidates["top1"] > row["top1"]))
        assert not dominated.any()
    best_anywhere = candidates.loc[candidates["top1"].idxmax()]
    assert best_anywhere["arch"] in set(front["arch"])
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = summary_table(result)
    for target in targets:
        assert target.label in table and result.best[target.label].arch.short() in table


def test_a_failure_while_rendering_writes_nothing(tmp_path, costs, monkeypatch):
    result = make_search(costs, [Budget("latency_ms", 1)], generations=1).run()

    def broken(*args):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(results_module, "pareto_figure_png", broken)
    with pytest.raises(RuntimeError):
        write_results(result, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_narrow_window_of_lower_and_upper_bounds_is_decided_by_enumeration(costs):
    """--min-params-m 0.059 --params-m 0.06: no probe lands inside, two of digits' 22,113 subnets do."""
    target = Constraints.of(Budget("params_m", 0.06), Budget("min_params_m", 0.059))
    witnesses = make_search(costs, [target]).check_feasible()[target.label]
    assert sorted(a.short() for a in witnesses) == ["d48-L2-h44-r3/4", "d48-L2-h44-r4/3"]
    assert all(0.059 <= costs["params_m"](a) <= 0.06 for a in witnesses)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["evaluations"][0].update(top1=7.5), "7.5 is not a number in 0..1"),
    (lambda s: s["evaluations"][0].update(generation=-5), "-5 is not a number"),
    (lambda s: s["runs"][next(iter(s["runs"]))]["visited"].append(-1), "-1 is not a number"),
    (lambda s: s["runs"][next(iter(s["runs"]))].update(generation=-5), "-5 is not a number"),
])
def test_an_edited_search_state_is_refused_not_trusted(tmp_path, costs, edit, message):
    state = tmp_path / STATE_FILE
    make_search(costs, [Budget("latency_ms", 1)], generations=2).run(checkpoint=state)
    data = json.loads(state.read_text())
    edit(data)
    state.write_text(json.dumps(data))
    with pytest.raises(HwawareError, match=f"not a readable search checkpoint .*{message}"):
        make_search(costs, [Budget("latency_ms", 1)], generations=2).run(checkpoint=state)
    state.write_text(state.read_text().replace('"top1": 0.', '"top1": NaN, "x": 0.', 1))
    with pytest.raises(HwawareError, match="NaN is not a number"):
        make_search(costs, [Budget("latency_ms", 1)], generations=2).run(checkpoint=state)


def test_fingerprint_is_by_content_so_a_touched_or_copied_checkpoint_resumes(tmp_path):
    weights = tmp_path / "last.pt"
    weights.write_bytes(b"weights")
    before = file_fingerprint(checkpoint=weights)
    copy = tmp_path / "copy" / "last.pt"
    copy.parent.mkdir()
    copy.write_bytes(weights.read_bytes())
    weights.touch()
    assert file_fingerprint(checkpoint=weights) == before == file_fingerprint(checkpoint=copy)
    weights.write_bytes(b"retrained")
    assert file_fingerprint(checkpoint=weights) != before
