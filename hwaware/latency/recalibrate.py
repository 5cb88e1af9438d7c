"""A latency table carried to another host: warn when the host differs, and recalibrate it cheaply.

The pieces of a table keep their relative costs across hosts of one class far better than their
absolute ones (the committed autoformer-t table ranked subnets with Kendall tau 0.895 on a host
where its absolute predictions were 181 % off). So `recalibrate_table` keeps the pieces, times a
few whole subnets here, rescales the table's correction by one factor fitted on them and
validates it on held-out subnets: minutes instead of a full profile. One factor, not a refit of
all three terms: on a busy host ten noisy subnets fitted three collinear terms (piece sum and
depth move together) into a correction worse than none (held-out MAPE 17 % -> 117 %).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from hwaware.errors import HwawareError
from hwaware.io import file_sha256, utc_timestamp
from hwaware.latency.backends import Backend, environment
from hwaware.latency.devices import MeasureSettings, find_present, load_device_profile
from hwaware.latency.host import fingerprint_differences, host_fingerprint
from hwaware.latency.protocol import time_in_rounds
from hwaware.latency.table import Calibration, LatencyTable, relative_scale, validation_metrics
from hwaware.space import Arch, SearchSpace


def host_differences(table: LatencyTable) -> list[str] | None:
    """How this machine differs from the host `table` was measured on; None when the table's device
    is not here (a V100 table read on a CPU box describes the V100, not this machine)."""
    if table.estimated:
        return None
    profile = load_device_profile(table.device)
    try:
        present = find_present(profile)
    except HwawareError:
        return None
    recorded = table.meta.get("environment") or {}
    return fingerprint_differences(recorded, host_fingerprint(present.kind, present.index))


def warn_if_other_host(table: LatencyTable, command: str = "hwaware") -> None:
    """One warning on stderr naming what differs, and the command that fixes it."""
    differences = host_differences(table)
    if differences:
        print(f"{command}: warning: {table.path} was measured on another host ({'; '.join(differences[:3])}); "
              f"its predictions may be off here: hwaware profile --recalibrate {table.path}", file=sys.stderr)


def measure_subnets(backend: Backend, space: SearchSpace, batch: int, archs: list[Arch], settings: MeasureSettings,
                    progress: bool = True, desc: str = "subnets") -> list[float]:
    """Each Arch of `space` exported and timed end to end on a batch, as `settings.statistic` (median or min), ms.

    Subnets go in segments of `settings.anchor_every`, each timed with the anchor (the space's middle
    subnet, one session for the run) in `settings.subnet_rounds` rounds (`time_in_rounds`): a shared
    host's speed shifts every few seconds, and a round a shift hits is slower, never faster
    (back-to-back retests of 10 subnets on 2 vCPUs: 7.3 % apart with one round, 2.5 % with two). Each reading is then scaled by the first segment's anchor over its own segment's, so a host that
    speeds up or slows down during the run shifts no subnet against another. Whole bursts, not the
    profiler's 20 ms slices: idle multi-threaded ONNX Runtime sessions spin, and sliced they ran 2x
    slower here. One segment's sessions are alive at a time, so memory does not grow with the sample.
    """
    from hwaware.progress import progress as progress_bar
    from hwaware.vit import build_vit

    x = torch.randn(batch, space.in_chans, space.img_size, space.img_size)
    step, rounds = max(1, settings.anchor_every), max(1, settings.subnet_rounds)
    measured: list[float] = []
    first_anchor = None
    with tempfile.TemporaryDirectory(prefix="hwaware-subnets-") as tmp, \
            progress_bar(total=len(archs), desc=desc, disable=not progress, file=sys.stderr) as bar:
        anchor_runner = backend.prepare(build_vit(space.middle(), space), x, Path(tmp))
        for start in range(0, len(archs), step):
            runners = [backend.prepare(build_vit(arch, space), x, Path(tmp)) for arch in archs[start:start + step]]
            anchor, *subnets = time_in_rounds([anchor_runner, *runners], settings, rounds)
            first_anchor = first_anchor or anchor
            measured += [ms * first_anchor / anchor for ms in subnets]
            del runners  # before the next segment's are built
            bar.update(len(subnets))
    return measured


def validate_table(csv_path: str | Path, count: int = 30, seed: int | None = None, progress: bool = True) -> dict:
    """Time `count` fresh random subnets end to end here and score the table's predictions of them.

    Reports only: the table is left as it is (its checksum, and every search fingerprinted on it, stay valid).
    """
    from hwaware.latency.profile import resolve_backend, sample_subnets

    table = LatencyTable.load(csv_path)
    settings = MeasureSettings.from_dict(table.meta.get("settings"))
    backend = resolve_backend(load_device_profile(table.device), table.backend, table.precision, settings.threads,
                              table.quantize_mode, settings.cuda_graph)
    seed = int(time.time()) if seed is None else seed
    archs = sample_subnets(table.space, count, random.Random(seed))
    measured = measure_subnets(backend, table.space, table.batch_size, archs, settings, progress,
                               desc=f"validate {Path(csv_path).stem}")
    return {**validation_metrics(measured, [table.predict(a) for a in archs]), "seed": seed,
            "statistic": settings.statistic, "date": utc_timestamp()}


def recalibrate_table(csv_path: str | Path, out: str | Path, fit_subnets: int = 10, holdout_subnets: int = 10,
                      seed: int = 0, progress: bool = True, force: bool = False) -> Path:
    """Refit `csv_path`'s correction on `fit_subnets` whole subnets timed here, validate it on
    `holdout_subnets` others, and write the result as a new table (same name) in `out`."""
    from hwaware.latency.profile import resolve_backend, sample_subnets

    if fit_subnets < 3 or holdout_subnets < 0:
        raise HwawareError("recalibrate: --fit-subnets must be at least 3 and --holdout-subnets at least 0")
    csv_path = Path(csv_path)
    table = LatencyTable.load(csv_path)
    target = Path(out) / csv_path.name
    if target.resolve() == csv_path.resolve() and not force:
        raise HwawareError(f"recalibrate: {target} is the table being recalibrated; pass --out DIR "
                           "(or --force to replace it)")
    profile = load_device_profile(table.device)
    settings = MeasureSettings.from_dict(table.meta.get("settings"))
    backend = resolve_backend(profile, table.backend, table.precision, settings.threads, table.quantize_mode,
                              settings.cuda_graph)
    archs = sample_subnets(table.space, fit_subnets + holdout_subnets, random.Random(seed))
    started = time.perf_counter()
    measured = measure_subnets(backend, table.space, table.batch_size, archs, settings, progress,
                               desc=f"recalibrate {csv_path.stem}")
    seconds = time.perf_counter() - started
    sums = [table.piece_sum(a) for a in archs]
    predicted = [table.predict(a) for a in archs]
    factor = relative_scale(predicted[:fit_subnets], measured[:fit_subnets])
    old = table.calibration
    calibration = Calibration(old.scale * factor, old.per_piece * factor, old.intercept * factor)
    held = range(fit_subnets, len(archs))
    before = [predicted[i] for i in held]
    after = [calibration.apply(sums[i], archs[i].depth + 2) for i in held]
    meta = dict(table.meta)
    meta.update(
        calibration={**calibration.to_dict(), "fit_n": fit_subnets, "recalibration_factor": factor},
        validation=validation_metrics([measured[i] for i in held], after),
        environment=environment(backend),
        recalibration={
            "from": str(csv_path), "from_csv_sha256": file_sha256(csv_path),
            "previous_environment": table.meta.get("environment"), "previous_calibration": table.meta.get("calibration"),
            "validation_before": validation_metrics([measured[i] for i in held], before),
            "seed": seed, "seconds": round(seconds, 1), "date": utc_timestamp(),
            "subnets": [{"arch": a.to_dict(), "measured_ms": m, "piece_sum_ms": s,
                         "split": "fit" if i < fit_subnets else "holdout"}
                        for i, (a, m, s) in enumerate(zip(archs, measured, sums))],
        },
    )
    for stale in ("subnets", "validation_uncalibrated", "validation_without_drifted", "validation_other_statistic",
                  "revalidations"):
        meta.pop(stale, None)  # they describe the old host
    return LatencyTable(table.rows.copy(), meta).save(target)
