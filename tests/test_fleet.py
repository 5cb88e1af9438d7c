"""A fleet: one search over several targets x budgets, the accuracy cache it shares, its matrix, bad input."""

import json
import multiprocessing
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_search import SMALL, CountingFitness, synthetic_latency, synthetic_top1

from hwaware.accuracy_cache import AccuracyCache, CachedScorer, cache_folder
from hwaware.errors import HwawareError
from hwaware.pipeline import standard_costs
from hwaware.search import BUDGET_KINDS, STATE_FILE, EvolutionSearch, parse_budgets
from hwaware.search_results import FLEET_FILE, matrix_frame, write_results
from hwaware.space import Arch, get_space
from hwaware.targets import TargetSpec, resolve_targets

ROOT = Path(__file__).resolve().parents[1]
SPACE = get_space("digits")
ANIMALS = get_space("animals")
FLEET = ["a", "b", "c", "d"]


def fleet_costs():
    """Four targets that price subnets differently (per-block cost, per-head cost, a fixed overhead)."""
    def on(scale, heads, overhead):
        return lambda arch: overhead + scale * synthetic_latency(arch) + heads * sum(arch.num_heads) / 100

    latency = {f"latency_ms[{name}]": on(*args) for name, args in
               zip(FLEET, [(1.0, 0.0, 0.0), (0.6, 1.0, 0.1), (2.0, 0.0, 0.5), (1.3, 0.5, 0.0)], strict=True)}
    return standard_costs(SPACE, latency)


def fleet_cells(one_for_all=False):
    return parse_budgets({"latency_ms": "a=1,a=1.5,b=1,b=1.5,c=2.5,c=3.5,d=1.5,d=2"}, FLEET, one_for_all)


# ---- budgets and cells -----------------------------------------------------------------------


def test_a_budget_kind_is_one_entry_the_cli_flags_are_made_from():
    from hwaware.cli import build_parser

    search = next(a for a in build_parser()._actions if a.dest == "command").choices["search"]
    flags = {o for a in search._actions for o in a.option_strings}
    assert {"--" + name.replace("_", "-") for name in BUDGET_KINDS} <= flags
    assert all(kind.unit and kind.help for kind in BUDGET_KINDS.values())


def test_budgets_per_target_and_for_every_target():
    cells = parse_budgets({"latency_ms": "2,b=5,b=6", "params_m": "0.1"}, ["a", "b"])
    assert [c.label for c in cells] == ["latency_ms[a]<=2 & params_m<=0.1", "latency_ms[b]<=5 & params_m<=0.1",
                                        "latency_ms[b]<=6 & params_m<=0.1"]
    assert cells[0].targets == ("a",) and cells[0].slug == "a_latency_ms-2_params_m-0.1"
    together = parse_budgets({"latency_ms": "a=1,a=2,b=3,b=4"}, ["a", "b"], one_for_all=True)[-2:]
    assert [c.label for c in together] == ["latency_ms[a]<=1 & latency_ms[b]<=3", "latency_ms[a]<=2 & latency_ms[b]<=4"]
    assert together[0].targets == ("a", "b")
    # one target: today's names, so `hwaware search --latency-ms 5` writes what it always wrote
    assert [c.label for c in parse_budgets({"latency_ms": "5"}, ["cpu"])] == ["latency_ms<=5"]
    assert [c.label for c in parse_budgets({"latency_ms": "cpu=5"}, ["cpu"])] == ["latency_ms<=5"]


@pytest.mark.parametrize("values, targets, one_for_all, message", [
    ({"latency_ms": "t4=5"}, ["cpu", "cpu:int8"], False, "names target 't4', which is not in this search"),
    ({"flops_g": "cpu=1"}, ["cpu", "cpu:int8"], False, "the same on every target, it cannot name one"),
    ({"latency_ms": "a=1,a=2,b=3"}, ["a", "b"], True, "every target needs as many budget values"),
    ({"latency_ms": "5"}, ["a"], True, "needs two or more targets"),
])
def test_bad_fleet_budgets_are_one_clear_error(values, targets, one_for_all, message):
    with pytest.raises(HwawareError, match=message):
        parse_budgets(values, targets, one_for_all)


def test_target_specs_parse_and_bad_ones_are_refused():
    assert TargetSpec.parse("cpu:int8:b8") == TargetSpec("cpu", "int8", 8)
    assert TargetSpec.parse("t4", precision="fp16") == TargetSpec("t4", "fp16", None)
    for bad, message in (("cpu:int9", "neither a precision"), (":int8", "no device"), ("cpu:b0", "neither")):
        with pytest.raises(HwawareError, match=message):
            TargetSpec.parse(bad)


# ---- one search, every cell ------------------------------------------------------------------


def test_twelve_cells_cost_the_evaluations_of_one_search_and_each_fits():
    fitness = CountingFitness()
    cells = fleet_cells(one_for_all=True)
    result = EvolutionSearch(SPACE, fitness, fleet_costs(), cells, **SMALL).run()
    alone = EvolutionSearch(SPACE, synthetic_top1, fleet_costs(), cells[:1], **SMALL).run()
    assert len(cells) == 10 and set(fitness.calls.values()) == {1}
    assert len(result.evaluations) <= SMALL["population"] * SMALL["generations"] == len(alone.evaluations)
    for cell in cells:
        assert cell.fits(result.costs[result.best[cell.label].arch])
    by_label = {c.label: result.best[c.label].top1 for c in cells}
    for cell in (c for c in cells if len(c.targets) == 4):  # one subnet for all can't beat a target's own cell
        own = [label for label in by_label if label in cell.label.split(" & ")]
        assert len(own) == 4 and all(by_label[label] >= by_label[cell.label] for label in own)


def test_one_infeasible_target_refuses_the_search_naming_it_and_its_cheapest_cost():
    costs = fleet_costs()
    cells = parse_budgets({"latency_ms": "a=1,b=1,c=0.3"}, ["a", "b", "c"])
    cheapest = costs["latency_ms[c]"](SPACE.smallest())
    with pytest.raises(HwawareError) as info:
        EvolutionSearch(SPACE, CountingFitness(fail_after=0), costs, cells, **SMALL).run()
    assert str(info.value).startswith("budget latency_ms[c]<=0.3: no subnet of space digits fits; the cheapest "
                                      f"reaches {cheapest:.4g} ms")


def test_feasibility_is_decided_once_per_search(monkeypatch):
    search = EvolutionSearch(SPACE, synthetic_top1, fleet_costs(), fleet_cells(), **SMALL)
    calls = []
    original = search._layerwise_extremes
    monkeypatch.setattr(search, "_layerwise_extremes", lambda *a: calls.append(a) or original(*a))
    search.check_feasible()
    first = len(calls)
    search.run()
    assert first > 0 and len(calls) == first


def test_a_killed_fleet_search_resumes_to_the_uninterrupted_result(tmp_path):
    reference = EvolutionSearch(SPACE, synthetic_top1, fleet_costs(), fleet_cells(), **SMALL, seed=2).run()
    state = tmp_path / STATE_FILE
    with pytest.raises(KeyboardInterrupt):
        EvolutionSearch(SPACE, CountingFitness(fail_after=25), fleet_costs(), fleet_cells(), **SMALL, seed=2
                        ).run(checkpoint=state)
    resumed = EvolutionSearch(SPACE, CountingFitness(), fleet_costs(), fleet_cells(), **SMALL, seed=2
                              ).run(checkpoint=state)
    assert [(e.arch, e.cell) for e in resumed.evaluations] == [(e.arch, e.cell) for e in reference.evaluations]
    assert resumed.best == reference.best


def test_matrix_prices_every_cell_on_every_target(tmp_path):
    cells = fleet_cells(one_for_all=True)
    result = EvolutionSearch(SPACE, synthetic_top1, fleet_costs(), cells, **SMALL).run()
    targets = [{"name": n, "cost": f"latency_ms[{n}]", "table": f"/t/{n}.csv"} for n in FLEET]
    written = {p.name for p in write_results(result, tmp_path, targets, extra={"checkpoint": "/c/last.pt"})}
    assert {"matrix.csv", "matrix.md", "fronts.png", FLEET_FILE} <= written
    matrix = pd.read_csv(tmp_path / "matrix.csv")
    assert list(matrix["target"]) == ["a", "a", "b", "b", "c", "c", "d", "d", "all targets", "all targets"]
    for _, row in matrix.iterrows():
        arch = Arch.from_dict(json.loads(row["arch"]))
        for name, cost in zip(FLEET, (f"latency_ms[{n}]" for n in FLEET), strict=True):
            assert row[cost] == pytest.approx(fleet_costs()[cost](arch)), name
    assert list(matrix["short"]) == list(matrix_frame(result, targets)["short"])
    markdown = (tmp_path / "matrix.md").read_text()
    assert markdown.count("\n") == len(cells) + 2 and "ms on c" in markdown and "**" in markdown
    fleet = json.loads((tmp_path / FLEET_FILE).read_text())
    assert fleet["checkpoint"] == "/c/last.pt" and [c["target"] for c in fleet["cells"]] == list(matrix["target"])
    assert (tmp_path / "fronts.png").read_bytes()[:4] == b"\x89PNG"


# ---- the accuracy cache ----------------------------------------------------------------------


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"supernet weights")
    return path


IMAGES = {"data": "digits", "split": "val", "images": 360, "images_sha256": "ab" * 32}


def _append(path, fingerprint, start, count):
    cache = AccuracyCache(path, fingerprint, SPACE)
    archs = [SPACE.sample(random.Random(i)) for i in range(start, start + count)]
    for arch in archs:
        cache.add(arch, synthetic_top1(arch))


def test_the_cache_is_keyed_by_checkpoint_content_and_images(weights):
    arch = SPACE.largest()
    cache = AccuracyCache(weights, IMAGES, SPACE)
    cache.add(arch, 0.75)
    assert cache.path.parent == cache_folder(weights) and AccuracyCache(weights, IMAGES, SPACE).load() == {arch: 0.75}
    assert AccuracyCache(weights, {**IMAGES, "images": 100}, SPACE).load() == {}
    assert AccuracyCache(weights, {**IMAGES, "data": "animals"}, SPACE).load() == {}
    copy = weights.parent / "copy.pt"
    shutil.copy(weights, copy)
    assert AccuracyCache(copy, IMAGES, SPACE, folder=cache.path.parent).load() == {arch: 0.75}  # same content
    weights.write_bytes(b"retrained")
    assert AccuracyCache(weights, IMAGES, SPACE, folder=cache.path.parent).load() == {}


def test_a_torn_or_bad_line_is_skipped_and_an_edited_header_refused(weights, capsys):
    cache = AccuracyCache(weights, IMAGES, SPACE)
    cache.add(SPACE.largest(), 0.5)
    with open(cache.path, "a") as f:
        f.write('{"arch": {"embed_dim": 7}, "top1": 0.5}\n{"arch": {"embed_dim": 64, "num_he')  # bad, then torn
    assert cache.load() == {SPACE.largest(): 0.5}
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    cache.path.write_text(cache.path.read_text().replace("supernet", "x").replace('"digits"', '"animals"', 1))
    with pytest.raises(HwawareError, match="does not hold what its name says"):
        cache.load()


def test_two_writers_at_once_lose_no_score(weights):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append, args=(weights, IMAGES, start, 150)) for start in (0, 1000)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    expected = {SPACE.sample(random.Random(i)) for i in [*range(150), *range(1000, 1150)]}
    loaded = AccuracyCache(weights, IMAGES, SPACE).load()
    assert set(loaded) == expected and all(v == synthetic_top1(a) for a, v in loaded.items())


def test_a_later_search_for_a_new_target_is_served_mostly_by_the_cache(weights):
    costs = fleet_costs()
    first = CachedScorer(CountingFitness(), AccuracyCache(weights, IMAGES, SPACE))
    EvolutionSearch(SPACE, first, costs, parse_budgets({"latency_ms": "a=1,a=1.5,b=1,b=1.5"}, ["a", "b"]),
                    **SMALL).run()
    later = CachedScorer(CountingFitness(), AccuracyCache(weights, IMAGES, SPACE))
    result = EvolutionSearch(SPACE, later, costs, parse_budgets({"latency_ms": "d=1.5,d=2"}, ["a", "b", "d"]),
                             warm_start=later.known, **SMALL).run()
    cold = EvolutionSearch(SPACE, synthetic_top1, costs, parse_budgets({"latency_ms": "d=1.5,d=2"}, ["a", "b", "d"]),
                           **SMALL).run()
    assert later.hits + later.misses == len(result.evaluations) and len(later.scorer.calls) == later.misses
    assert later.hits >= later.misses  # at least half served by the cache
    assert later.misses < len(cold.evaluations)
    assert all(result.best[k].top1 >= cold.best[k].top1 - 0.01 for k in cold.best)


# ---- targets from tables ---------------------------------------------------------------------


def test_targets_come_from_measured_tables_and_bad_ones_are_refused(tmp_path):
    tables = ROOT / "latency_tables"
    targets = resolve_targets(ANIMALS, "cpu,cpu:int8,cpu:b8,cpu:int8:b8", tables_root=tables)
    assert [t.name for t in targets] == ["cpu", "cpu:int8", "cpu:b8", "cpu:int8:b8"]
    assert targets[1].describe()["quantize_mode"] == "dynamic" and targets[2].table.batch_size == 8
    with pytest.raises(HwawareError, match="target cpu: priced by two tables"):
        resolve_targets(ANIMALS, "cpu", [tables / "cpu-onnxruntime-fp32-animals-b1.csv"], tables)
    with pytest.raises(HwawareError, match="unknown device 'tpu'"):
        resolve_targets(ANIMALS, "cpu,tpu", tables_root=tables)
    with pytest.raises(HwawareError, match="create it with: hwaware profile --device t4 --space animals"):
        resolve_targets(ANIMALS, "cpu,t4", tables_root=tables)
    with pytest.raises(HwawareError, match="measured for space 'digits', not 'animals'"):
        resolve_targets(ANIMALS, "cpu", [tables / "cpu-onnxruntime-fp32-digits-b1.csv"], tables)


# ---- through the CLI, on a briefly trained digits supernet and this CPU's fp32 and INT8 tables ----------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from hwaware.train import train_supernet

    root = tmp_path_factory.mktemp("fleet")
    train_supernet(space="digits", data="digits", out=str(root / "digits"), epochs=1, threads=1, progress=False)
    tables = root / "tables"
    tables.mkdir()
    # the committed fp32 table, and an INT8 one measured on this 2-core CPU while others shared it (a fixture)
    for source in (ROOT / "latency_tables", ROOT / "tests" / "fixtures" / "tables"):
        for path in source.glob("cpu-onnxruntime-*-digits-b1.*"):
            shutil.copy(path, tables / path.name)
    return root / "digits" / "last.pt", tables


TINY = ["--population", "8", "--generations", "2", "--parents", "3", "--mutation-children", "3",
        "--crossover-children", "3", "--quiet"]


@pytest.fixture
def cli(run_cli):
    return run_cli


@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu,cpu:int9", "--latency-ms", "1"], "'int9' is neither a precision"),
    (["--device", "cpu,gpu9", "--latency-ms", "1"], "unknown device 'gpu9'"),
    (["--device", "cpu,cpu:b8", "--latency-ms", "1"], "create it with: hwaware profile --device cpu --space digits"),
    (["--device", "cpu,cpu:int8", "--latency-ms", "t4=1"], "names target 't4', which is not in this search"),
    (["--device", "cpu,cpu:int8", "--latency-ms", "cpu=1,cpu:int8=0.001"],
     "budget latency_ms[cpu:int8]<=0.001: no subnet of space digits fits; the cheapest reaches"),
    (["--device", "cpu", "--table", ROOT / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1.csv",
      "--latency-ms", "1"], "target cpu: priced by two tables"),
    (["--device", "cpu", "--table", ROOT / "latency_tables" / "cpu-onnxruntime-fp32-animals-b1.csv",
      "--latency-ms", "1"], "measured for space 'animals', not 'digits'"),
])
def test_bad_fleet_input_is_one_line_and_writes_nothing(cli, digits_run, tmp_path, extra, message):
    checkpoint, tables = digits_run
    out = tmp_path / "search"
    result = cli("search", "--checkpoint", checkpoint, "--tables", tables, *extra, "--out", out, *TINY)
    assert result.returncode == 2, result.stderr
    # the INT8 fixture was measured on one CPU: on another host a (true) warning says so before the one error line
    errors = [line for line in result.stderr.strip().splitlines() if "measured on another host" not in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_fleet_search_export_and_bench(cli, digits_run, tmp_path):
    checkpoint, tables = digits_run
    out = tmp_path / "fleet"
    result = cli("search", "--checkpoint", checkpoint, "--tables", tables, "--device", "cpu,cpu:int8",
                  "--latency-ms", "0.2", "--one-for-all", "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    matrix = pd.read_csv(out / "matrix.csv")
    assert list(matrix["target"]) == ["cpu", "cpu:int8", "all targets"]
    assert (matrix[["latency_ms[cpu]", "latency_ms[cpu:int8]"]] > 0).all().all()
    assert list(cache_folder(checkpoint).glob("*.jsonl"))

    again = cli("search", "--checkpoint", checkpoint, "--tables", tables, "--device", "cpu:int8",
                 "--latency-ms", "0.2", "--out", tmp_path / "int8", *TINY)
    assert again.returncode == 0, again.stderr
    assert "served by the accuracy cache" in again.stdout

    export = tmp_path / "export"
    result = cli("export", "--from-search", out, "--out", export, "--batch-sizes", "1,4")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((export / "fleet_export.json").read_text())
    folders = {c["target"]: export / c["folder"] for c in manifest["cells"]}
    assert (folders["cpu:int8"] / "model.int8.onnx").is_file() and not (folders["cpu"] / "model.int8.onnx").exists()
    assert json.loads((folders["cpu:int8"] / "card.json").read_text())["quantized"]["mode"] == "dynamic"
    models = sorted(p.name for p in (export / "triton").iterdir())
    assert len(models) == 3 and all((export / "triton" / m / "config.pbtxt").is_file() for m in models)

    bench = cli("bench", export, "--json")
    assert bench.returncode == 0, bench.stderr
    ran = json.loads(bench.stdout)["ran"]
    assert {(r["target"], r["precision"]) for r in ran} == {("cpu", "fp32"), ("cpu:int8", "int8")}
    assert all(r["measured_ms"] > 0 and "predicted_ms" in r for r in ran)
    assert json.loads(bench.stdout)["skipped"] == [[f"{folders['all targets'].name} on cpu:int8",
                                                    "the one-for-all export serves fp32, not int8"]]


def test_a_per_gpu_triton_model_picks_its_plan_by_compute_capability(tmp_path):
    from hwaware.export import write_triton_per_gpu_model

    plans = {}
    for capability in ("7.5", "8.0"):
        plans[capability] = tmp_path / f"{capability}.plan"
        plans[capability].write_bytes(capability.encode())
    io = {"input": {"name": "input", "elem_type": "FLOAT", "shape": [None, 1, 8, 8]},
          "output": {"name": "logits", "elem_type": "FLOAT", "shape": [None, 10]}}
    folder = write_triton_per_gpu_model(tmp_path / "triton", "vit_all", plans, io, (1, 8))
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "default_model_filename" not in config
    assert 'key: "7.5"\n    value: "model.sm75.plan"' in config and 'key: "8.0"\n    value: "model.sm80.plan"' in config
    assert (folder / "1" / "model.sm80.plan").read_bytes() == b"8.0"
    with pytest.raises(HwawareError, match="not a compute capability"):
        write_triton_per_gpu_model(tmp_path / "t2", "x", {"sm75": plans["7.5"]}, io, (1,))


def test_a_single_target_search_names_its_target_for_export(tmp_path):
    costs = standard_costs(SPACE, synthetic_latency)
    result = EvolutionSearch(SPACE, synthetic_top1, costs, parse_budgets({"latency_ms": "1,1.5"}, ["cpu:int8"]),
                             **SMALL).run()
    write_results(result, tmp_path, [{"name": "cpu:int8", "cost": "latency_ms", "table": "/t/int8.csv"}])
    fleet = json.loads((tmp_path / FLEET_FILE).read_text())
    assert [c["targets"] for c in fleet["cells"]] == [["cpu:int8"], ["cpu:int8"]]
    assert [c["best_file"] for c in fleet["cells"]] == ["best_latency_ms-1.yaml", "best_latency_ms-1.5.yaml"]
    assert list(pd.read_csv(tmp_path / "matrix.csv")["target"]) == ["cpu:int8", "cpu:int8"]
