"""The flow from a trained supernet to a served model: search, export, bench, and the whole pipeline.

Each function here joins library pieces that know nothing of each other (the search takes
callables, export takes a model, the latency table prices an Arch); the CLI calls these, and
so can a notebook.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import atomic_write_text, dumps_strict, folder_lock
from hwaware.space import Arch, resolve_arch


def load_table_for(space, device: str | None = None, table: str | Path | None = None,
                   tables_root: str | Path = "latency_tables", precision: str | None = None):
    """The latency table named by `table`, or the one for `device`, this space and `precision` (default:
    the device profile's), checked against the space."""
    from hwaware.latency import LatencyTable, find_table

    if table is None and device is None:
        raise HwawareError("latency: give --device (to find the table in latency_tables/) or --table FILE")
    from hwaware.latency.recalibrate import warn_if_other_host

    path = Path(table) if table is not None else find_table(device, space.name, precision=precision, root=tables_root)
    loaded = LatencyTable.load(path)
    loaded.check_space(space)
    if device is not None and loaded.device != device:
        raise HwawareError(f"latency table: {path} was measured on device {loaded.device!r}, not {device!r}")
    if precision is not None and loaded.precision != precision:
        raise HwawareError(f"latency table: {path} prices {loaded.precision}, not {precision}")
    warn_if_other_host(loaded)
    if loaded.estimated:  # a price from an estimate says how far off it is expected to be
        from hwaware.latency.estimate import expected_error_line

        print(f"hwaware: {expected_error_line(loaded)}", file=sys.stderr)
    return loaded


def search_checkpoint(checkpoint: str | Path, out: str | Path, budgets: Mapping[str, Any], *,
                      device: str | None = None, table: str | Path | None = None,
                      tables_root: str | Path = "latency_tables", data: str | None = None,
                      precision: str | None = None, progress: bool = True, scoring: Mapping[str, Any] | None = None,
                      **search_options: Any):
    """Evolutionary search on a trained supernet under `budgets` ({"latency_ms": "1,2", "params_m": None, ...}).

    Scores are top-1 on a fixed, seeded, class-stratified set of val images (`scoring`: `build_scorer`'s
    images, seed, compute device, precision, batch size, workers, threads, cache), never test; costs
    are the table's predicted latency plus exact FLOPs and params. The scoring set is part of the
    resume fingerprint. Each best subnet is then scored once on images the search never selected on
    (`held_out_scorer`) and `scoring.json` names both sets. Resumes from `out/search_state.json`;
    writes best_*.yaml, candidates.csv, pareto.csv/png and scoring.json into `out`. Under torchrun
    each rank scores its shard on its own device and the counts are all-reduced; only rank 0 writes.
    """
    import torch.distributed as dist

    from hwaware.checkpoint import check_finite
    from hwaware.distributed import setup_distributed
    from hwaware.evaluation import build_scorer, dataset_of, load_supernet
    from hwaware.search import (
        STATE_FILE,
        EvolutionSearch,
        file_fingerprint,
        parse_budgets,
        standard_costs,
        write_results,
    )

    scoring = dict(scoring or {})
    targets = parse_budgets(budgets)  # bad budgets are refused before anything is loaded
    rank, _, _, owned = setup_distributed(str(scoring.get("device", "auto")))  # so is a missing GPU
    try:
        model, meta = load_supernet(checkpoint)
        check_finite(model.state_dict(), str(checkpoint))
        space = model.space
        needs_latency = any(b.metric == "latency_ms" for t in targets for b in t.budgets)
        latency = (load_table_for(space, device, table, tables_root, precision) if (needs_latency or device or table)
                   else None)
        scorer = build_scorer(model, dataset_of(meta, data), split="val", **scoring)
        search = EvolutionSearch(
            space, scorer, standard_costs(space, latency.predict if latency else None), targets,
            progress=progress and rank == 0,
            fingerprint={**file_fingerprint(checkpoint=checkpoint, **({"table": latency.path} if latency else {})),
                         "scoring": scorer.fingerprint},
            **search_options,
        )
        search.check_feasible()  # an infeasible budget is refused before `out` is created
        out = Path(out)
        with folder_lock(out, "search") if rank == 0 else contextlib.nullcontext():
            result = search.run(checkpoint=out / STATE_FILE, save_checkpoint=rank == 0)
            report = _held_out_report(model, scorer, result, scoring)  # every rank: the counts are reduced
            if rank == 0:
                write_results(result, out)
                atomic_write_text(out / SCORING_FILE, dumps_strict(report) + "\n")
        return result
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


SCORING_FILE = "scoring.json"


def _held_out_report(model, scorer, result, scoring: Mapping[str, Any]) -> dict[str, Any]:
    """What the search scored on, and each best subnet's top-1 on images it did not select on."""
    from hwaware.evaluation import held_out_scorer

    report: dict[str, Any] = {"selection": {**scorer.fingerprint, "describe": scorer.describe()}, "held_out": None}
    options = {k: v for k, v in scoring.items() if k not in ("images", "seed")}
    held_out = held_out_scorer(model, scorer, **{**options, "cache_mib": 0})  # one pass per target: no cache
    if held_out is not None:
        report["held_out"] = {**held_out.fingerprint, "describe": held_out.describe(),
                              "top1": {label: held_out(e.arch) for label, e in result.best.items()},
                              "selection_top1": {label: e.top1 for label, e in result.best.items()}}
    return report


def _export_arch(arch: str | Arch | None, meta: Mapping[str, Any], space, checkpoint) -> Arch:
    """The Arch asked for, else the one a fixed-subnet (--arch) run trained; a supernet needs one named."""
    from hwaware.evaluation import checkpoint_arch

    if isinstance(arch, Arch):
        return space.validate(arch)
    if arch is not None:
        return resolve_arch(arch, space)
    trained = checkpoint_arch(meta, space)
    if trained is None:
        raise HwawareError(f"arch: {checkpoint} is a supernet; name the subnet to export with --arch "
                           "(a search's best_*.yaml, released, largest, ...)")
    return trained


def export_checkpoint(checkpoint: str | Path, arch: str | Arch | None, out: str | Path, *,
                      formats: str = "timm,onnx,triton", precision: str = "fp32", batch_sizes: str = "1,8,32",
                      force: bool = False, device: str | None = None, table: str | Path | None = None,
                      tables_root: str | Path = "latency_tables", data: str | None = None,
                      table_optional: bool = False, quantize_mode: str | None = None,
                      max_accuracy_drop: float | None = None, calibration_images: int = 256,
                      scoring: Mapping[str, Any] | None = None):
    """Export one subnet of a trained supernet with its card: top-1, params, FLOPs, predicted latency.

    Export needs no data: with `data` (or a dataset the checkpoint records) the card holds top-1 on
    the scoring set of val a search selects on (`scoring`: `build_scorer`'s options, default 10,000
    images at most), on held-out images (val's remainder, else test) and on test where there is one,
    each named; without, it says there is none. With `table_optional` (the device came from the
    project file, not the user) a missing table means no predicted latency on the card rather than
    an error. A quantized `precision` (int8, fp8) is quantized in the mode its latency table's pieces
    were (else `hwaware.precision.default_mode`), calibrated on `calibration_images` class-stratified
    training images (static mode); its float and quantized top-1 on the same image sets go on the
    card, and it is refused past `max_accuracy_drop` points.
    """
    from hwaware.checkpoint import check_finite
    from hwaware.distributed import setup_distributed
    from hwaware.evaluation import load_supernet
    from hwaware.export import export_model, preflight
    from hwaware.precision import check_mode, get_precision

    wanted, _ = preflight(out, formats, force, precision)  # bad formats, a taken folder: refused before loading
    scoring = dict(scoring or {})
    setup_distributed(str(scoring.get("device", "auto")))  # a missing GPU too
    quantized = get_precision(precision).quantized
    if not quantized:  # each set is scored once: nothing to keep decoded
        scoring["cache_mib"] = 0
    model, meta = load_supernet(checkpoint)
    check_finite(model.state_dict(), str(checkpoint))
    space = model.space
    arch = _export_arch(arch, meta, space, checkpoint)
    data = data or meta.get("data")
    if quantized and data is None and (max_accuracy_drop is not None or quantize_mode == "static"):
        raise HwawareError("data: the checkpoint records no dataset (an imported supernet?), and a quantized "
                           "export's calibration or accuracy limit needs images; pass --data")
    card: dict[str, Any] = {"checkpoint": str(checkpoint), "data": data}
    scorers = _card_scorers(model, data, scoring) if data is not None else {}
    accuracy = {}
    for name, scorer in scorers.items():
        accuracy[name] = {"top1": scorer(arch), "images": scorer.describe(), "n": len(scorer.indices)}
    card["accuracy"] = accuracy or None
    if not accuracy:
        card["accuracy_note"] = "no data given and none recorded by the checkpoint: no accuracy on this card"
    for name, scorer in scorers.items():
        card[f"{name}_top1"] = accuracy[name]["top1"]
        if name == "held_out" and scorer.image_set.split == "test":
            card["test_top1"] = accuracy[name]["top1"]
    latency = None
    if device is not None or table is not None:
        try:
            latency = load_table_for(space, device, table, tables_root, precision)
        except HwawareError as exc:
            if not table_optional:
                raise
            _log(f"hwaware export: no predicted latency on the card ({exc})")
    if latency is not None:
        card.update(predicted_latency_ms=latency.predict(arch), latency_table=str(latency.path),
                    latency_batch_size=latency.batch_size)
    calibration = None
    if quantized:
        quantize_mode = check_mode(precision, quantize_mode or _table_mode(latency, "tensorrt" in wanted),
                                   "tensorrt" in wanted)
        if latency is not None and _table_mode(latency, False) not in (None, quantize_mode):
            _log(f"hwaware export: warning: {latency.path} priced {precision} {_table_mode(latency, False)} pieces; "
                 f"this export is {precision} {quantize_mode}, so its predicted latency is for another graph")
        if quantize_mode == "static":
            if data is None:
                raise HwawareError("data: static quantization calibrates on training images, and the checkpoint "
                                   "records no dataset; pass --data")
            from hwaware.quantize import calibration_images as training_images

            calibration = training_images(data, space, calibration_images)
    sample = next(iter(next(iter(scorers.values())).batches()))[0][:32] if scorers else None
    accuracy_batches = {name: _Rescored(scorer) for name, scorer in scorers.items()} if quantized else None
    with export_lock(out):
        return export_model(model.extract(arch).eval(), arch, space, out, formats, precision, batch_sizes, force,
                            card_extra=card, sample_inputs=sample, quantize_mode=quantize_mode,
                            calibration_inputs=calibration, accuracy_batches=accuracy_batches or None,
                            max_accuracy_drop=max_accuracy_drop, table_batch=latency.batch_size if latency else None,
                            measure_settings=_table_settings(latency))


def _table_settings(table):
    """The measurement settings a table was timed with (None without a table)."""
    from hwaware.latency import MeasureSettings

    return MeasureSettings.from_dict(table.meta.get("settings"), f"{table.path}: settings") if table else None


def _card_scorers(model, data: str, scoring: Mapping[str, Any]) -> dict[str, Any]:
    """The card's image sets: val's scoring set, held-out images, and test where it exists and is not the held-out."""
    from hwaware.data import has_split
    from hwaware.evaluation import build_scorer, held_out_scorer

    scorers = {"val": build_scorer(model, data, split="val", **scoring)}
    held_out = held_out_scorer(model, scorers["val"], **{k: v for k, v in scoring.items() if k not in ("images", "seed")})
    if held_out is not None:
        scorers["held_out"] = held_out
    if has_split(data, "test") and (held_out is None or held_out.image_set.split != "test"):
        scorers["test"] = build_scorer(model, data, split="test", **scoring)
    return scorers


class _Rescored:
    """A scorer's images as (images, labels) batches, streamed afresh on every pass (the ONNX accuracy check
    runs the float and the quantized model over them)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __iter__(self):
        return self.scorer.batches()


def _table_mode(table, for_tensorrt: bool) -> str | None:
    """How the table's pieces were quantized (None for float tables); TensorRT can only take static."""
    mode = table.quantize_mode if table is not None else None
    return "static" if for_tensorrt and mode == "dynamic" else mode


@contextlib.contextmanager
def export_lock(out: str | Path):
    """One writer per export folder (export, or bench updating its card). The lock lies beside the folder,
    which export replaces whole; holding it, staging folders left by killed exports are cleared away."""
    out = Path(out)
    with folder_lock(out.parent, "export", f".{out.name}.hwaware.lock"):
        staging = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")  # tempfile.mkdtemp's names
        for stale in out.parent.iterdir():
            if stale.is_dir() and staging.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        yield


def bench_export(export_dir: str | Path, device: str = "cpu", backend: str | None = None,
                 batch_size: int | None = None, table: str | Path | None = None,
                 tables_root: str | Path = "latency_tables", record: bool = True,
                 precision: str | None = None) -> dict[str, Any]:
    """Time an exported model with the profiling protocol and the table's settings; measured beside predicted.

    Without a table for this device the model is still timed, with the device profile's settings.
    The result goes into card.json under `bench` (and `measured_latency_ms`) when `record`.
    TensorRT times the exported model.plan itself (its metadata checked against this GPU and TensorRT,
    never rebuilt) and notes where the served batch or optimisation profile differs from the table's.
    """
    import torch

    from hwaware.export import load_model, read_card, read_model_config, served_onnx, update_card
    from hwaware.latency import MeasureSettings, load_device_profile, time_runner
    from hwaware.latency.profile import resolve_backend

    export_dir = Path(export_dir)
    card = read_card(export_dir)
    arch, space = read_model_config(export_dir)
    profile = load_device_profile(device)
    try:
        latency = load_table_for(space, device, table, tables_root, precision)
    except HwawareError:
        if table is not None:
            raise
        latency = None
    settings = MeasureSettings.from_dict(latency.meta.get("settings")) if latency else profile.measurement
    backend = backend or (latency.backend if latency else profile.backend)
    precision = latency.precision if latency else (precision or profile.precision)
    batch_size = batch_size or (latency.batch_size if latency else profile.batch_sizes[0])
    runner_backend = resolve_backend(profile, backend, precision, settings.threads,
                                     latency.quantize_mode if latency else None, settings.cuda_graph)
    x = torch.randn(batch_size, space.in_chans, space.img_size, space.img_size)
    notes: list[str] = []
    if backend == "torch":
        runner = runner_backend.prepare(load_model(export_dir), x)
    elif backend == "tensorrt":
        runner, notes = _plan_runner(runner_backend, export_dir, x, latency)
    else:
        _check_quantize_mode(card, precision, latency)
        onnx_path = served_onnx(export_dir, precision)
        if not onnx_path.is_file():
            raise HwawareError(f"bench: {export_dir} has no {onnx_path.name}; export with --format onnx "
                               f"--precision {precision} to bench {backend} {precision}")
        runner = runner_backend.prepare_onnx(onnx_path, x)
    stats = time_runner(runner, settings)
    measured = stats.reading(settings.statistic)
    result: dict[str, Any] = {
        "device": device, "backend": backend, "precision": precision, "batch_size": batch_size,
        "measured_ms": measured, "statistic": settings.statistic, "stats": stats.to_dict(),
        "threads": settings.threads, "cuda_graph": settings.cuda_graph, "arch": arch.to_dict(),
        **({"notes": notes} if notes else {}),
    }
    if latency is not None and latency.batch_size == batch_size and latency.backend == backend:
        predicted = latency.predict(arch)
        result.update(predicted_ms=predicted, error=(predicted - measured) / measured, table=str(latency.path))
    if record:
        with export_lock(export_dir):
            card = read_card(export_dir)  # re-read under the lock: another bench may have added its entry
            fields = {"bench": {**card.get("bench", {}), f"{device}-{backend}-{precision}-b{batch_size}": result}}
            if "predicted_ms" in result:
                fields["measured_latency_ms"] = measured
            update_card(export_dir, **fields)
    return result


def _plan_runner(backend, export_dir: Path, example, table) -> tuple[Any, list[str]]:
    """A runner for the export's model.plan, and why its timing may differ from the table's prediction."""
    from hwaware.export import PLAN_FILE
    from hwaware.tensorrt_build import profile_differences, read_metadata

    plan = export_dir / PLAN_FILE
    if not plan.is_file():
        raise HwawareError(f"bench: {export_dir} has no {PLAN_FILE}; export with --format tensorrt to bench tensorrt")
    runner = backend.prepare_plan(plan, example)
    table_profile = (table.meta.get("backend_settings") or {}).get("optimization_profile") if table else None
    notes = profile_differences(read_metadata(plan), table_profile, int(example.shape[0]))
    for note in notes:
        _log(f"hwaware bench: note: {note}")
    return runner, notes


def _check_quantize_mode(card: dict[str, Any], precision: str, table) -> None:
    """Warn when an export was quantized in another mode than the table's pieces were."""
    shipped = (card.get("quantized") or {}).get("mode")
    priced = table.quantize_mode if table is not None else None
    if shipped and priced and shipped != priced:
        _log(f"hwaware bench: warning: the export is {precision} {shipped}, the table's pieces {precision} {priced}; "
             "the prediction is for another graph")


# ---- the main job -----------------------------------------------------------------------------------


def default_latency_budget(table, space) -> float:
    """Half-way between the cheapest and the largest subnet's predicted latency: a budget that binds."""
    cheapest, _ = table.cheapest(space)
    largest = table.predict(space.largest())
    return round(cheapest + 0.5 * (largest - cheapest), 4)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # beside the progress bars, in order


def run_pipeline(out: str | Path = "runs/pipeline", latency_ms: float | None = None, device: str = "cpu",
                 progress: bool = True, log=_log) -> dict[str, Any]:
    """Train on digits, profile this CPU, search under a latency budget, export, bench, write report.md.

    Every stage finds its output already there and skips, so an interrupted pipeline continues.
    """
    from hwaware.export import CARD_FILE, read_card
    from hwaware.latency import LatencyTable, find_table, profile_device
    from hwaware.search import best_file
    from hwaware.space import get_space, load_arch
    from hwaware.train import make_config, train_supernet

    out = Path(out)
    space = get_space("digits")
    timings: dict[str, float] = {}

    def stage(name: str):
        log(f"== {name}")
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]

    with folder_lock(out, "pipeline"):  # one pipeline per folder; also checks it is writable
        stage("train")
        train_supernet(make_config(space="digits", data="digits", out=str(out / "supernet"), progress=progress))
        done("train")

        stage("profile")
        tables = out / "latency_tables"
        try:
            table_path = find_table(device, space.name, root=tables)  # finished earlier: reuse it
        except HwawareError:
            table_path = profile_device(device, space, out=tables, progress=progress)  # resumes a partial one
        table = LatencyTable.load(table_path)
        done("profile")

        stage("search")
        budget = latency_ms if latency_ms is not None else default_latency_budget(table, space)
        search_dir = out / f"search-{budget:g}ms"  # one folder per budget: another --latency-ms is another search
        checkpoint = out / "supernet" / "last.pt"
        result = search_checkpoint(checkpoint, search_dir, {"latency_ms": budget}, table=table_path, progress=progress)
        target = result.targets[0]
        arch = load_arch(search_dir / best_file(target), space)
        done("search")

        stage("export")
        export_dir = out / f"digits-vit-{budget:g}ms"
        if not (export_dir / CARD_FILE).is_file():
            export_checkpoint(checkpoint, arch, export_dir, table=table_path)
        done("export")

        stage("bench")
        bench = bench_export(export_dir, device, table=table_path)
        done("bench")

        card = read_card(export_dir)
        report = _report(card, bench, table, budget, timings, result, search_dir.relative_to(out) / "pareto.png")
        atomic_write_text(out / "report.md", report)
        log(f"report: {out / 'report.md'}")
    return {"card": card, "bench": bench, "budget_ms": budget, "seconds": timings}


def _report(card, bench, table, budget, timings, result, pareto_png: Path) -> str:
    validation = table.validation

    def pct(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"
    lines = [
        "# hwaware pipeline report",
        "",
        f"Supernet trained on `{card['data']}`; latency table `{Path(table.path).name}`; "
        f"search under {budget:g} ms ({result.strategy}, {len(result.evaluations)} subnets evaluated on val).",
        "",
        f"![accuracy against latency]({pareto_png.as_posix()})",
        "",
        "## Chosen subnet",
        "",
        f"`{card['arch_short']}`: `{json.dumps(card['arch'])}`",
        "",
        "| | |",
        "|---|---|",
        f"| val top-1 | {pct(card.get('val_top1'))} |",
        f"| test top-1 | {pct(card.get('test_top1'))} |",
        f"| params | {card['params']:,} |",
        f"| FLOPs (multiply-adds) | {card['flops']:,} |",
        f"| predicted latency | {bench.get('predicted_ms', float('nan')):.4f} ms |",
        f"| measured latency ({bench['backend']}, {bench['precision']}, batch {bench['batch_size']}, "
        f"{bench['statistic']}) | {bench['measured_ms']:.4f} ms |",
        f"| prediction error | {pct(bench.get('error'))} |",
        "",
        "## Latency table validation (held-out whole subnets)",
        "",
        f"n = {validation.get('n')}, MAPE {pct(validation.get('mape'))}, within 5 % {pct(validation.get('within_5pct'))}, "
        f"within 10 % {pct(validation.get('within_10pct'))}, Kendall tau {validation.get('kendall_tau', float('nan')):.3f}",
        "",
        "## Stage times (this run; stages found done take ~0 s)",
        "",
        *(f"- {name}: {seconds:.1f} s" for name, seconds in timings.items()),
        "",
    ]
    return "\n".join(lines)
