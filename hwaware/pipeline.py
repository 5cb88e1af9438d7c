"""The flow from a trained supernet to a served model: search, export, bench, and the whole pipeline.

Each function here joins library pieces that know nothing of each other (the search takes
callables, export takes a model, the latency table prices an Arch); the CLI calls these, and
so can a notebook.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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


def standard_costs(space, latency_ms: Mapping[str, Any] | Any = None) -> dict[str, Any]:
    """The costs every search reports: exact FLOPs (G) and params (M) from `hwaware.costs`, plus latency:
    one callable (`LatencyTable.predict`) named `latency_ms`, or a mapping of cost name to callable, one per
    target of a fleet."""
    import functools

    from hwaware.costs import arch_cost

    @functools.lru_cache(maxsize=1 << 16)
    def counted(arch: Arch):  # one count serves both FLOPs and params
        return arch_cost(arch, space)

    costs: dict[str, Any] = {}
    if callable(latency_ms):
        costs["latency_ms"] = latency_ms
    elif latency_ms is not None:
        costs.update(latency_ms)
    costs["flops_g"] = lambda arch: counted(arch).flops / 1e9
    costs["params_m"] = lambda arch: counted(arch).params / 1e6
    return costs


def _target_costs(targets: list) -> dict[str, Any]:
    """Cost name -> target: `latency_ms` for a search of one target (as before fleets), else one per target."""
    from hwaware.search import cost_key

    if len(targets) == 1:
        return {"latency_ms": targets[0]}
    return {cost_key("latency_ms", t.name): t for t in targets}


def _shared_scores(cache, rank: int) -> dict:
    """Rank 0's reading of the accuracy cache, sent to every rank, so all of them score the same subnets."""
    import torch.distributed as dist

    known = [cache.load() if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(known, src=0)
    return known[0]


def search_checkpoint(checkpoint: str | Path, out: str | Path, budgets: Mapping[str, Any], *,
                      device: str | list[str] | None = None, table: str | Path | list | None = None,
                      tables_root: str | Path = "latency_tables", data: str | None = None,
                      precision: str | None = None, one_for_all: bool = False, accuracy_cache: bool = True,
                      progress: bool = True, scoring: Mapping[str, Any] | None = None, **search_options: Any):
    """Evolutionary search on a trained supernet under `budgets` ({"latency_ms": "1,2", "params_m": None, ...})
    for one target or a fleet of them.

    Targets are latency tables: `device` is one device or several ("cpu,cpu:int8,t4"), each's table
    found in `tables_root`; `table` one or more table files. Scores are top-1 on a fixed, seeded,
    class-stratified set of val images (`scoring`: `build_scorer`'s images, seed, compute device,
    precision, batch size, workers, threads, cache), never test, served from and added to the
    checkpoint's accuracy cache (`hwaware.accuracy_cache`, keyed by the scorer's fingerprint); costs
    are each target's predicted latency plus exact FLOPs and params. One infeasible budget refuses
    the whole search before anything is written. Each best subnet is then scored once on images the
    search never selected on (`held_out_scorer`) and `scoring.json` names both sets. Resumes from
    `out/search_state.json`; writes best_*.yaml, candidates.csv, pareto.csv/png, matrix.csv/md (+
    fronts.png for several targets, fleet.json with targets) and scoring.json into `out`. Under
    torchrun each rank scores its shard on its own device and the counts are all-reduced; only rank
    0 writes.
    """
    import torch.distributed as dist

    from hwaware.accuracy_cache import AccuracyCache, CachedScorer
    from hwaware.checkpoint import check_finite
    from hwaware.evaluation import build_scorer, dataset_of, join_compute_device, load_supernet
    from hwaware.search import BUDGET_KINDS, STATE_FILE, EvolutionSearch, file_fingerprint, parse_budgets
    from hwaware.search_results import write_results
    from hwaware.targets import resolve_targets

    scoring = dict(scoring or {})
    tables = [] if table is None else [table] if isinstance(table, (str, Path)) else list(table)
    rank, _, _, owned = join_compute_device(scoring.get("device", "auto"))  # so is a missing GPU
    try:
        model, meta = load_supernet(checkpoint)
        space = model.space
        targets = resolve_targets(space, device, tables, tables_root, precision) if (device or tables) else []
        by_cost = _target_costs(targets)
        cells = parse_budgets(budgets, [t.name for t in targets], one_for_all)
        if not targets and any(BUDGET_KINDS[b.name].per_target for c in cells for b in c.budgets):
            raise HwawareError("latency budget: no target prices it; name a device (its table is found in the "
                               "tables folder) or a latency table")
        check_finite(model.state_dict(), str(checkpoint))
        data = dataset_of(meta, data)
        scorer = build_scorer(model, data, split="val", **scoring)
        cache = AccuracyCache(checkpoint, scorer.fingerprint, space) if accuracy_cache else None
        fitness = CachedScorer(scorer, cache, rank == 0, _shared_scores(cache, rank)) if cache else scorer
        tables_used = {f"table[{t.name}]" if len(targets) > 1 else "table": t.table.path for t in targets}
        search = EvolutionSearch(
            space, fitness, standard_costs(space, {cost: t.table.predict for cost, t in by_cost.items()}), cells,
            progress=progress and rank == 0,
            fingerprint={**file_fingerprint(checkpoint=checkpoint, **tables_used), "scoring": scorer.fingerprint},
            warm_start=fitness.known if cache else None, **search_options,
        )
        search.check_feasible()  # an infeasible budget is refused before `out` is created
        out = Path(out)
        described = [{**t.describe(), "cost": cost} for cost, t in by_cost.items()]
        with folder_lock(out, "search") if rank == 0 else contextlib.nullcontext():
            result = search.run(checkpoint=out / STATE_FILE, save_checkpoint=rank == 0)
            result.cached_scores = fitness.hits if cache else 0
            report = _held_out_report(model, scorer, result, scoring)  # every rank: the counts are reduced
            if rank == 0:
                write_results(result, out, described, extra={"checkpoint": str(Path(checkpoint).resolve()),
                                                             "data": data, "scorer": scorer.describe()})
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
    from hwaware.checkpoint import check_finite, checkpoint_state, file_identity
    from hwaware.evaluation import join_compute_device, load_supernet
    from hwaware.export import export_model, preflight
    from hwaware.precision import check_mode, get_precision

    wanted, _ = preflight(out, formats, force, precision)  # bad formats, a taken folder: refused before loading
    scoring = dict(scoring or {})
    join_compute_device(scoring.get("device", "auto"))  # a missing GPU too
    quantized = get_precision(precision).quantized
    if not quantized:  # each set is scored once: nothing to keep decoded
        scoring["cache_mib"] = 0
    read_from = file_identity(checkpoint)
    model, meta = load_supernet(checkpoint)
    check_finite(model.state_dict(), str(checkpoint))
    space = model.space
    arch = _export_arch(arch, meta, space, checkpoint)
    data = data or meta.get("data")
    if quantized and data is None and (max_accuracy_drop is not None or quantize_mode == "static"):
        raise HwawareError("data: the checkpoint records no dataset (an imported supernet?), and a quantized "
                           "export's calibration or accuracy limit needs images; pass --data")
    card: dict[str, Any] = {"checkpoint": str(checkpoint), "checkpoint_state": checkpoint_state(checkpoint, meta, read_from),
                            "data": data}
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


# ---- a fleet -------------------------------------------------------------------------------------

FLEET_EXPORT_FILE = "fleet_export.json"
_FORMATS_FOR = {"onnxruntime": "timm,onnx,triton", "tensorrt": "timm,onnx,tensorrt,triton", "torch": "timm"}


def read_fleet(search_dir: str | Path) -> dict[str, Any]:
    """A fleet search's fleet.json, checked: its targets, and per cell the best Arch file it names."""
    from hwaware.io import read_json
    from hwaware.search_results import FLEET_FILE

    search_dir = Path(search_dir)
    fleet = read_json(search_dir / FLEET_FILE, f"export: {search_dir} has no {FLEET_FILE}; is it the folder of a "
                      "search with one or more latency targets?")
    try:
        if fleet.get("format") != "hwaware-fleet/1":
            raise ValueError(f"format {str(fleet.get('format'))[:30]!r}")
        names = {t["name"] for t in fleet["targets"]}
        for t in fleet["targets"]:
            if t["backend"] not in _FORMATS_FOR or not isinstance(t["table"], str):
                raise ValueError(f"target {str(t['name'])[:30]}")
        for cell in fleet["cells"]:
            if not set(cell["targets"]) <= names or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,200}", cell["slug"]):
                raise ValueError(f"cell {str(cell.get('label'))[:60]}")
            if not (search_dir / cell["best_file"]).is_file() or Path(cell["best_file"]).name != cell["best_file"]:
                raise ValueError(f"no {str(cell['best_file'])[:60]}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise HwawareError(f"export: {search_dir / FLEET_FILE} is not a fleet description ({exc})") from None
    return fleet


def _check_fleet_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise HwawareError(f"out: {out} already exists; pass --force to replace it")
        if not (out / FLEET_EXPORT_FILE).is_file():
            raise HwawareError(f"out: {out} is not a fleet export (no {FLEET_EXPORT_FILE}); refusing to replace it")


def export_fleet(search_dir: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
                 batch_sizes: str = "1,8,32", force: bool = False, data: str | None = None,
                 scoring: Mapping[str, Any] | None = None, log=None) -> dict[str, Any]:
    """Export every cell of a fleet search for its target, one folder per cell, plus one Triton repository
    holding them all; the one-subnet-for-all cell also gets one Triton model with a TensorRT plan per GPU kind
    present (chosen by compute capability).

    A cell's artifact follows its target's table: a TensorRT engine for a TensorRT table (where TensorRT runs;
    else the other formats, with the card saying why), the ONNX Runtime INT8 model for `cpu:int8`, timm weights
    for torch. Everything is staged beside `out` and renamed into place at the end, so a failure leaves no
    half-written fleet.
    """
    import tempfile

    from hwaware.export import onnx_io, parse_batch_sizes, served_onnx, write_triton_per_gpu_model
    from hwaware.io import as_user_file, dumps_strict
    from hwaware.precision import EXPORT_PRECISIONS
    from hwaware.space import load_arch

    log = log or _log
    search_dir, out = Path(search_dir), Path(out)
    fleet = read_fleet(search_dir)
    checkpoint = Path(checkpoint or fleet.get("checkpoint") or "")
    if not checkpoint.is_file():
        raise HwawareError(f"export: the fleet's checkpoint {checkpoint} is not there; give the checkpoint it searched")
    _check_fleet_out(out, force)
    sizes = parse_batch_sizes(batch_sizes)
    targets = {t["name"]: t for t in fleet["targets"]}
    for t in targets.values():
        if not Path(t["table"]).is_file():
            raise HwawareError(f"export: target {t['name']}'s table {t['table']} is not there")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    as_user_file(staging, directory=True)
    manifest: dict[str, Any] = {"format": "hwaware-fleet-export/1", "search": str(search_dir.resolve()),
                                "checkpoint": str(checkpoint.resolve()), "targets": fleet["targets"], "cells": []}
    try:
        for cell in fleet["cells"]:
            own = [targets[n] for n in cell["targets"]]
            target = own[0] if len(own) == 1 else None  # None: one subnet for all (or no target priced it)
            arch = load_arch(search_dir / cell["best_file"])
            folder = staging / cell["slug"]
            precision = target["precision"] if target and target["precision"] in EXPORT_PRECISIONS else "fp32"
            formats = _FORMATS_FOR[target["backend"]] if target else "timm,onnx,triton"
            log(f"hwaware export: {cell['label']} -> {cell['slug']}/ ({formats}, {precision})")
            result = export_checkpoint(checkpoint, arch, folder, formats=formats, precision=precision,
                                       batch_sizes=batch_sizes, table=target["table"] if target else None, data=data,
                                       scoring=scoring)
            entry = {"label": cell["label"], "target": cell["target"], "targets": cell["targets"],
                     "folder": cell["slug"], "formats": list(result.formats), "precision": precision,
                     "warnings": list(result.warnings)}
            if len(own) > 1:
                plans, skipped = _plans_per_gpu(folder, own, sizes)
                if plans:
                    write_triton_per_gpu_model(folder / "triton", f"{folder.name}_per_gpu", plans,
                                               onnx_io(served_onnx(folder, "fp32")), sizes)
                entry.update(per_gpu_plans=sorted(plans), per_gpu_skipped=skipped)
            manifest["cells"].append(entry)
        repository = staging / "triton"
        for entry in manifest["cells"]:
            for model in sorted((staging / entry["folder"] / "triton").glob("*/")):
                shutil.copytree(model, repository / model.name)
        manifest["triton"] = sorted(p.name for p in repository.iterdir()) if repository.is_dir() else []
        (staging / FLEET_EXPORT_FILE).write_text(dumps_strict(manifest, indent=1) + "\n")
        _check_fleet_out(out, force)
        retired = None
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, retired)
        os.replace(staging, out)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _plans_per_gpu(folder: Path, targets: list[dict], batch_sizes: tuple[int, ...]) -> tuple[dict, list[str]]:
    """A TensorRT plan of the one-for-all subnet for every TensorRT target whose GPU is here (a plan runs only on
    the GPU kind it was built on); the others are listed, to be built on their own nodes."""
    from hwaware.export import ONNX_FILE
    from hwaware.latency import load_device_profile
    from hwaware.latency.devices import find_present
    from hwaware.precision import get_precision
    from hwaware.tensorrt_build import build_engine, tensorrt_unavailable_reason

    plans, skipped = {}, []
    for target in (t for t in targets if t["backend"] == "tensorrt"):
        reason = tensorrt_unavailable_reason()
        if get_precision(target["precision"]).quantized:
            reason = f"{target['precision']} plans are built from its quantized ONNX; export that target alone"
        if reason is None:
            try:
                present = find_present(load_device_profile(target["device"]))
            except HwawareError as exc:
                reason = str(exc)
        if reason is not None:
            skipped.append(f"{target['name']}: {reason}")
            continue
        capability = ".".join(map(str, present.capability))
        plan = folder / f"model.sm{capability.replace('.', '')}.plan"
        build_engine(folder / ONNX_FILE, plan, target["precision"], batch_sizes, folder / "timing.cache")
        plans[capability] = plan
    return plans, skipped


def bench_fleet(export_dir: str | Path, record: bool = True) -> dict[str, Any]:
    """Bench every cell of a fleet export on its target where that device is here; the rest are skipped, each
    with why. A one-for-all cell is benched on each present target whose precision its fp32 model serves."""
    from hwaware.io import read_json
    from hwaware.latency import load_device_profile
    from hwaware.latency.devices import find_present

    export_dir = Path(export_dir)
    manifest = read_json(export_dir / FLEET_EXPORT_FILE, f"bench: {export_dir} is not a fleet export")
    targets = {t["name"]: t for t in manifest["targets"]}
    ran, skipped = [], []
    for cell in manifest["cells"]:
        for name in cell["targets"]:
            target = targets[name]
            where = f"{cell['folder']} on {name}"
            if len(cell["targets"]) > 1 and target["precision"] != cell["precision"]:
                skipped.append((where, f"the one-for-all export serves {cell['precision']}, not {target['precision']}"))
                continue
            try:
                find_present(load_device_profile(target["device"]))
            except HwawareError as exc:
                skipped.append((where, str(exc).split(";")[0]))
                continue
            result = bench_export(export_dir / cell["folder"], target["device"], table=target["table"],
                                  precision=target["precision"], record=record)
            ran.append({"cell": cell["label"], "folder": cell["folder"], "target": name, **result})
    return {"ran": ran, "skipped": skipped}


# ---- the main job -----------------------------------------------------------------------------------


def default_latency_budget(table, space) -> float:
    """Half-way between the cheapest and the largest subnet's predicted latency: a budget that binds."""
    cheapest, _ = table.cheapest(space)
    largest = table.predict(space.largest())
    return round(cheapest + 0.5 * (largest - cheapest), 4)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # beside the progress bars, in order


def run_pipeline(out: str | Path = "runs/pipeline", latency_ms: float | None = None, device: str = "cpu",
                 progress: bool = True, log=_log, claimed=lambda: None) -> dict[str, Any]:
    """Train on digits, profile this CPU in fp32 and INT8, search both tables in one search under a latency
    budget each, export and bench the fp32 pick, write report.md with the deployment matrix.

    Every stage finds its output already there and skips, so an interrupted pipeline continues.
    `claimed()` runs once `out` is locked, before the first stage (the CLI records the project file there).
    """
    from hwaware.export import CARD_FILE, read_card
    from hwaware.latency import LatencyTable, find_table, load_device_profile, profile_device
    from hwaware.precision import get_precision
    from hwaware.search_results import best_file
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

    def profiled(precision: str | None) -> Path:
        try:
            return find_table(device, space.name, precision=precision, root=tables)  # finished earlier: reuse it
        except HwawareError:
            return profile_device(device, space, precision=precision, out=tables, progress=progress)  # resumes

    with folder_lock(out, "pipeline"):  # one pipeline per folder; also checks it is writable
        claimed()
        stage("train")
        train_supernet(make_config(space="digits", data="digits", out=str(out / "supernet"), progress=progress))
        done("train")

        stage("profile")
        tables = out / "latency_tables"
        profile = load_device_profile(device)
        table_path = profiled(None)
        table = LatencyTable.load(table_path)
        # INT8 as a second target where this device's backend runs it: which precision pays is the search's answer
        int8_runs = (profile.backend, profile.kind) in get_precision("int8").runs_on and profile.precision != "int8"
        table_paths = [table_path, profiled("int8")] if int8_runs else [table_path]
        done("profile")

        stage("search")
        tables_loaded = [LatencyTable.load(p) for p in table_paths]
        budgets = [latency_ms if latency_ms is not None else default_latency_budget(t, space) for t in tables_loaded]
        budget = budgets[0]
        search_dir = out / f"search-{budget:g}ms"  # one folder per budget: another --latency-ms is another search
        checkpoint = out / "supernet" / "last.pt"
        if len(table_paths) > 1:
            from hwaware.targets import target_name

            spec = ",".join(f"{target_name(t)}={b}" for t, b in zip(tables_loaded, budgets, strict=True))
        else:
            spec = budget
        result = search_checkpoint(checkpoint, search_dir, {"latency_ms": spec}, table=table_paths,
                                   progress=progress)
        arch = load_arch(search_dir / best_file(result.cells[0]), space)  # the first target's: fp32
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
        report = _report(card, bench, table, budget, timings, result, out, search_dir.relative_to(out))
        atomic_write_text(out / "report.md", report)
        log(f"report: {out / 'report.md'}")
    return {"card": card, "bench": bench, "budget_ms": budget, "seconds": timings}


def _report(card, bench, table, budget, timings, result, out: Path, search_dir: Path) -> str:
    validation = table.validation
    matrix = (out / search_dir / "matrix.md").read_text()
    figure = search_dir / ("fronts.png" if (out / search_dir / "fronts.png").is_file() else "pareto.png")

    def pct(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"
    lines = [
        "# hwaware pipeline report",
        "",
        f"Supernet trained on `{card['data']}`; latency table `{Path(table.path).name}`; "
        f"one search of {len(result.cells)} target x budget cells ({result.strategy}, {len(result.evaluations)} "
        "subnets evaluated on val).",
        "",
        f"![accuracy against latency]({figure.as_posix()})",
        "",
        "## Deployment matrix (best subnet per target and budget; latency predicted on every target)",
        "",
        matrix,
        f"## Chosen subnet (for {Path(table.path).name}, under {budget:g} ms)",
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
