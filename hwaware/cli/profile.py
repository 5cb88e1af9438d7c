"""`hwaware profile`: measure, estimate, validate, recalibrate or transfer a per-device latency table."""

from __future__ import annotations

import argparse

from hwaware.bounds import MEASUREMENT
from hwaware.cli import bounded, fill_from_project
from hwaware.errors import HwawareError
from hwaware.io import folder_lock
from hwaware.precision import BACKENDS, PRECISIONS, QUANT_MODES


def _print_validation(label: str, v: dict) -> None:
    if not v or not v.get("n"):
        print(f"{label}: no held-out subnets")
        return
    tau = "n/a (needs 2 subnets)" if v.get("kendall_tau") is None else f"{v['kendall_tau']:.3f}"
    print(f"{label}: n={v['n']}  MAPE {100 * v['mape']:.2f}%  within 5% {100 * v['within_5pct']:.0f}%  "
          f"within 10% {100 * v['within_10pct']:.0f}%  Kendall tau {tau}")


def cmd_profile(args: argparse.Namespace) -> None:
    from hwaware.latency.devices import find_present, load_device_profile

    if args.validate:
        from hwaware.latency.recalibrate import validate_table

        report = validate_table(args.validate, count=args.subnets, seed=args.seed, progress=not args.quiet)
        _print_validation(f"validation of {args.validate} on fresh subnets", report)
        return
    if args.recalibrate:
        _recalibrate(args)
        return
    if args.transfer_from:
        _transfer(args)
        return
    if not args.device:
        raise HwawareError("--device is required (a profile name such as cpu, t4, v100; or --validate / "
                           "--recalibrate TABLE)")
    fill_from_project(args, "profile", {"space": "space", "out": "tables"}, required=("space",))
    args.out = args.out or "latency_tables"
    profile = load_device_profile(args.device)
    if not args.estimate:
        find_present(profile)  # before torch loads: an absent device is a quick one-line answer
    overrides = {k: getattr(args, k) for k in ("threads", "warmup", "min_repeats", "min_time_s", "fit_subnets",
                                                "holdout_subnets")}
    overrides["cuda_graph"] = True if args.cuda_graph else None
    settings = profile.measurement.replace(**overrides)
    if args.estimate:
        from hwaware.latency.estimate import estimate_table

        path = estimate_table(args.device, args.space, backend=args.backend, precision=args.precision,
                              batch=args.batch, out=args.out, calibrate_from=args.calibrate_from,
                              reference=args.reference_data)
    else:
        from hwaware.latency.profile import profile_device

        with folder_lock(args.out, "profile"):
            path = profile_device(args.device, args.space, backend=args.backend, precision=args.precision,
                                  batch=args.batch, out=args.out, seed=args.seed or 0, settings=settings,
                                  progress=not args.quiet, force=args.force, quantize_mode=args.quantize_mode)
    from hwaware.latency.table import LatencyTable

    table = LatencyTable.load(path)
    print(f"wrote {path} ({len(table.rows)} pieces{', ESTIMATED' if table.estimated else ''})")
    if table.estimated:
        from hwaware.latency.estimate import expected_error_line

        print(expected_error_line(table))
    _print_validation("held-out validation", table.validation)
    timing = table.meta.get("timing")
    if timing:
        print(f"profiling took {timing['pieces_seconds']:.0f} s for pieces + {timing['calibration_seconds']:.0f} s "
              f"for calibration; measuring 1000 candidates end to end would take "
              f"~{timing['end_to_end_1000_candidates_seconds']:.0f} s")


def _recalibrate(args: argparse.Namespace) -> None:
    from hwaware.latency.recalibrate import recalibrate_table
    from hwaware.latency.table import LatencyTable

    fill_from_project(args, "profile", {"out": "tables"})
    if args.out is None:
        raise HwawareError("--out is required with --recalibrate (the folder for the recalibrated table)")
    LatencyTable.load(args.recalibrate)  # a missing or bad table is refused before --out is created
    with folder_lock(args.out, "profile --recalibrate"):
        path = recalibrate_table(args.recalibrate, args.out, fit_subnets=args.fit_subnets or 10,
                                 holdout_subnets=10 if args.holdout_subnets is None else args.holdout_subnets,
                                 seed=args.seed or 0, progress=not args.quiet, force=args.force)
    table = LatencyTable.load(path)
    info = table.meta["recalibration"]
    print(f"wrote {path}: refitted on {table.meta['calibration']['fit_n']} subnets timed here in {info['seconds']:.0f} s")
    _print_validation("held-out before recalibration", info["validation_before"])
    _print_validation("held-out after recalibration", table.validation)


def _transfer(args: argparse.Namespace) -> None:
    from hwaware.latency.devices import load_device_profile
    from hwaware.latency.table import LatencyTable
    from hwaware.latency.transfer import ADAPTERS, check_transfer_source, transfer_table

    if not args.device:
        raise HwawareError("--device is required with --transfer-from (the present device the table is adapted to)")
    if args.estimate:
        raise HwawareError("--transfer-from measures subnets on the device; it does not combine with --estimate")
    if args.transfer_map not in ADAPTERS:
        raise HwawareError(f"--transfer-map: expected one of {', '.join(ADAPTERS)}, got {args.transfer_map!r}")
    if args.transfer_map == "layers" and args.fit_subnets is not None and args.fit_subnets < 3:
        raise HwawareError("--transfer-map layers fits three terms: it needs --fit-subnets 3 or more")
    fill_from_project(args, "profile", {"out": "tables"})
    args.out = args.out or "latency_tables"
    profile = load_device_profile(args.device)
    settings = profile.measurement.replace(**{k: getattr(args, k) for k in ("threads", "warmup", "min_repeats",
                                                                           "min_time_s")},
                                           cuda_graph=True if args.cuda_graph else None)
    fit_subnets = args.fit_subnets or 10
    holdout_subnets = 10 if args.holdout_subnets is None else args.holdout_subnets
    # a source that cannot be transferred is refused before --out is created
    check_transfer_source(args.transfer_from, args.space, fit_subnets, holdout_subnets)
    with folder_lock(args.out, "profile --transfer-from"):
        path = transfer_table(args.transfer_from, args.device, args.out, space=args.space, backend=args.backend,
                              precision=args.precision, batch=args.batch, settings=settings,
                              quantize_mode=args.quantize_mode, fit_subnets=fit_subnets,
                              holdout_subnets=holdout_subnets, seed=args.seed or 0, method=args.transfer_map,
                              progress=not args.quiet, force=args.force)
    table = LatencyTable.load(path)
    info = table.meta["transfer"]
    full = info["full_profile_seconds_of_source"]
    print(f"wrote {path}: {info['from']} adapted to {table.device} ({info['method']}: x{info['factor']:.3f} "
          f"{info['offset_ms']:+.3f} ms" + (f" {info['per_piece_ms']:+.4f} ms per piece" if info.get("per_piece_ms") else "")
          + f") from {info['k']} subnets timed in {info['seconds_fit_subnets']:.0f} s"
          + (f" (the source's full profile took {full:.0f} s)" if full else ""))
    _print_validation("held-out before transfer", info["validation_before"])
    _print_validation("held-out after transfer", table.validation)


def register(sub) -> None:
    prof = sub.add_parser("profile", help="measure a per-device latency table (or --estimate, --validate)")
    prof.add_argument("--device", help="device profile name (profiles/<name>.yaml), e.g. cpu, t4, h100")
    prof.add_argument("--backend", choices=BACKENDS, help="default: the profile's")
    prof.add_argument("--precision", choices=list(PRECISIONS), help="default: the profile's")
    prof.add_argument("--quantize-mode", dest="quantize_mode", choices=QUANT_MODES,
                      help="int8: how pieces are quantized, as export will quantize the model (default: dynamic "
                           "for onnxruntime, static Q/DQ for tensorrt)")
    prof.add_argument("--batch", type=bounded(int, 1, 65536), help="batch size (default: the profile's first)")
    prof.add_argument("--space", help="built-in space name or YAML file (default: the project's)")
    prof.add_argument("--out", help="folder for the table (default: the project's tables, else latency_tables/)")
    prof.add_argument("--seed", type=bounded(int, 0), help="seed for piece order and calibration subnets (default 0)")
    prof.add_argument("--threads", type=bounded(int, *MEASUREMENT["threads"]), help="intra-op threads (default: the profile's)")
    prof.add_argument("--warmup", type=bounded(int, *MEASUREMENT["warmup"]), help="warm-up runs per item")
    prof.add_argument("--min-repeats", dest="min_repeats", type=bounded(int, *MEASUREMENT["min_repeats"]), help="minimum timed runs per item")
    prof.add_argument("--min-time", dest="min_time_s", type=bounded(float, *MEASUREMENT["min_time_s"]), help="minimum seconds of timed runs per item")
    prof.add_argument("--fit-subnets", dest="fit_subnets", type=bounded(int, 2, MEASUREMENT["fit_subnets"][1]),
                      help="whole subnets the correction is fitted on (at least 3; --recalibrate, --transfer-from: "
                           "default 10, --transfer-from from 2)")
    prof.add_argument("--holdout-subnets", dest="holdout_subnets", type=bounded(int, *MEASUREMENT["holdout_subnets"]),
                      help="held-out subnets it is validated on (--recalibrate, --transfer-from: default 10)")
    prof.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                      help="GPU: time replays of a captured CUDA graph (torch, tensorrt); recorded in the table")
    prof.add_argument("--force", action="store_true", help="measure again although the table exists")
    prof.add_argument("--estimate", action="store_true",
                      help="estimated table: for a GPU from the kernel model fitted on public GPU measurements, for a "
                           "CPU from a roofline fitted on a measured CPU table")
    prof.add_argument("--calibrate-from", dest="calibrate_from",
                      help="CPU --estimate: the measured CPU table to fit its efficiencies on")
    prof.add_argument("--reference-data", dest="reference_data", metavar="CSV",
                      help="GPU --estimate: public measurements to fit the kernel model on (default: the shipped "
                           "hwaware/reference/gpu_latency.csv; to add your own rows, copy it and append them)")
    prof.add_argument("--validate", metavar="TABLE", help="measure fresh subnets end to end and report the table's error")
    prof.add_argument("--subnets", type=bounded(int, 1, 1000), default=30, help="subnets for --validate (default 30)")
    prof.add_argument("--recalibrate", metavar="TABLE",
                      help="refit TABLE's correction on whole subnets timed on this host; writes a new table in --out")
    prof.add_argument("--transfer-from", dest="transfer_from", metavar="TABLE",
                      help="adapt TABLE, measured on another device, to --device from --fit-subnets whole subnets "
                           "timed here (validated on --holdout-subnets others); writes the device's table in --out")
    prof.add_argument("--transfer-map", dest="transfer_map", default="affine",
                      help="--transfer-from's map from the source's predictions: affine (default: factor and offset), "
                           "scale (factor only), layers (affine plus a cost per layer; needs 3 subnets)")
    prof.add_argument("--quiet", action="store_true", help="no progress bar")
    prof.set_defaults(func=cmd_profile)
