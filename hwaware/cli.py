"""The `hwaware` command: parse, call the library, print. Errors become one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from hwaware.errors import HwawareError


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


# ---- hwaware space ----------------------------------------------------------------------------


def cmd_space_list(args: argparse.Namespace) -> None:
    from hwaware.space import BUILTIN_SPACES

    for name, space in BUILTIN_SPACES.items():
        print(f"{name:14s} {space.img_size}px patch {space.patch_size}, {space.num_classes} classes, "
              f"{space.num_subnets():.3g} subnets")


def cmd_space_show(args: argparse.Namespace) -> None:
    from hwaware.space import get_space

    space = get_space(args.space)
    from hwaware.costs import arch_cost

    small, large = arch_cost(space.smallest(), space), arch_cost(space.largest(), space)
    info = {
        "name": space.name,
        "embed_dims": list(space.embed_dims),
        "depths": list(space.depths),
        "num_heads": list(space.num_heads),
        "mlp_ratios": list(space.mlp_ratios),
        "head_dim": space.head_dim,
        "image": f"{space.in_chans}x{space.img_size}x{space.img_size}, patch {space.patch_size} ({space.num_tokens} tokens)",
        "num_classes": space.num_classes,
        "supernet_maxima": {"embed_dim": space.max_embed_dim, "depth": space.max_depth,
                            "num_heads": space.max_heads, "mlp_ratio": space.max_mlp_ratio},
        "num_subnets": space.num_subnets(),
        "params": [small.params, large.params],
        "flops": [small.flops, large.flops],
    }
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if key in ("params", "flops"):
            value = f"{_fmt_count(value[0])} .. {_fmt_count(value[1])} (smallest .. largest)"
        elif key == "num_subnets":
            value = f"{value:,}"
        print(f"{key:16s} {value}")


# ---- hwaware cost -----------------------------------------------------------------------------


def cmd_cost(args: argparse.Namespace) -> None:
    from hwaware.space import get_space, resolve_arch

    space = get_space(args.space)
    arch = resolve_arch(args.arch, space)  # bad input is refused before torch loads
    from hwaware.costs import arch_cost, cost_breakdown

    total = arch_cost(arch, space)
    parts = cost_breakdown(arch, space)
    if args.json:
        print(json.dumps({"space": space.name, "arch": arch.to_dict(), "params": total.params,
                          "flops": total.flops, "breakdown": parts}))
        return
    print(f"arch    {arch.short()}")
    print(f"params  {total.params:,} ({_fmt_count(total.params)})")
    print(f"flops   {total.flops:,} ({_fmt_count(total.flops)} multiply-adds per image)")
    for name, part in parts.items():
        print(f"  {name:10s} params {_fmt_count(part['params']):>8s}  flops {_fmt_count(part['flops']):>8s}")


# ---- hwaware profile --------------------------------------------------------------------------


def _print_validation(label: str, v: dict) -> None:
    if not v or not v.get("n"):
        print(f"{label}: no held-out subnets")
        return
    print(f"{label}: n={v['n']}  MAPE {100 * v['mape']:.2f}%  within 5% {100 * v['within_5pct']:.0f}%  "
          f"within 10% {100 * v['within_10pct']:.0f}%  Kendall tau {v['kendall_tau']:.3f}")


def cmd_profile(args: argparse.Namespace) -> None:
    from hwaware.latency.devices import find_present, load_device_profile

    if args.validate:
        from hwaware.latency.profile import validate_table

        report = validate_table(args.validate, count=args.subnets, seed=args.seed, progress=not args.quiet)
        _print_validation(f"validation of {args.validate} on fresh subnets", report)
        return
    if not args.device or not args.space:
        raise HwawareError("profile: --device and --space are required (or --validate TABLE)")
    profile = load_device_profile(args.device)
    if not args.estimate:
        find_present(profile)  # before torch loads: an absent device is a quick one-line answer
    overrides = {k: getattr(args, k) for k in ("threads", "warmup", "min_repeats", "min_time_s", "fit_subnets",
                                                "holdout_subnets")}
    settings = profile.measurement.replace(**overrides)
    if args.estimate:
        from hwaware.latency.estimate import estimate_table

        path = estimate_table(args.device, args.space, backend=args.backend, precision=args.precision,
                              batch=args.batch, out=args.out, calibrate_from=args.calibrate_from)
    else:
        from hwaware.latency.profile import profile_device

        path = profile_device(args.device, args.space, backend=args.backend, precision=args.precision,
                              batch=args.batch, out=args.out, seed=args.seed or 0, settings=settings,
                              progress=not args.quiet, force=args.force)
    from hwaware.latency.table import LatencyTable

    table = LatencyTable.load(path)
    print(f"wrote {path} ({len(table.rows)} pieces{', ESTIMATED' if table.estimated else ''})")
    _print_validation("held-out validation", table.validation)
    timing = table.meta.get("timing")
    if timing:
        print(f"profiling took {timing['pieces_seconds']:.0f} s for pieces + {timing['calibration_seconds']:.0f} s "
              f"for calibration; measuring 1000 candidates end to end would take "
              f"~{timing['end_to_end_1000_candidates_seconds']:.0f} s")


# ---- hwaware train / evaluate -------------------------------------------------------------------

_TRAIN_FLAGS = ("space", "data", "out", "strategy", "num_random", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
                "weight_decay", "drop_path", "clip_grad", "ema_decay", "amp", "seed", "checkpoint_every", "num_workers",
                "device", "threads")


def cmd_train(args: argparse.Namespace) -> None:
    import os

    from hwaware.train import make_config, train_supernet

    config = make_config(args.recipe, **{k: getattr(args, k) for k in _TRAIN_FLAGS}, progress=not args.quiet)
    row = train_supernet(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(f"{config.out}: epoch {row['epoch']}/{config.epochs}, val top-1 largest {row['val_top1_largest']:.4f} "
              f"smallest {row['val_top1_smallest']:.4f} middle {row['val_top1_middle']:.4f}; "
              f"checkpoint {config.out}/last.pt, metrics {config.out}/metrics.csv")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hwaware.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.arch, split=args.split, data=args.data,
                                 batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(result))
        return
    top5 = f"  top-5 {result['top5']:.4f}" if "top5" in result else ""
    print(f"{result['split']} top-1 {result['top1']:.4f}{top5}  ({result['n']} images of {result['data']}, "
          f"arch {args.arch}, epoch {result['epoch']})")


# ---- hwaware search / export / bench / pipeline ------------------------------------------------


def cmd_search(args: argparse.Namespace) -> None:
    import os

    from hwaware.pipeline import search_checkpoint
    from hwaware.search import summary_table

    budgets = {"latency_ms": args.latency_ms, "flops_g": args.flops_g, "params_m": args.params_m,
               "min_params_m": args.min_params_m}
    options = {k: getattr(args, k) for k in ("population", "generations", "parents", "mutation_children",
                                             "crossover_children", "strategy", "seed") if getattr(args, k) is not None}
    result = search_checkpoint(args.checkpoint, args.out, budgets, device=args.device, table=args.table,
                               tables_root=args.tables, progress=not args.quiet, **options)
    if os.environ.get("RANK", "0") == "0":
        print(summary_table(result))
        print(f"results in {args.out}/ (best_*.yaml, candidates.csv, pareto.csv, pareto.png)")


def cmd_export(args: argparse.Namespace) -> None:
    from hwaware.pipeline import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.arch, args.out, formats=args.format, precision=args.precision,
                               batch_sizes=args.batch_sizes, force=args.force, device=args.device, table=args.table,
                               tables_root=args.tables)
    card = result.card
    print(f"exported {', '.join(result.formats)} to {result.out_dir}: {card['arch_short']}, "
          f"{card['params']:,} params, {card['flops']:,} FLOPs, val top-1 {card['val_top1']:.4f}, "
          f"test top-1 {card['test_top1']:.4f}"
          + (f", predicted {card['predicted_latency_ms']:.4f} ms" if "predicted_latency_ms" in card else ""))


def cmd_bench(args: argparse.Namespace) -> None:
    from hwaware.pipeline import bench_export

    r = bench_export(args.dir, args.device, backend=args.backend, batch_size=args.batch, table=args.table,
                     tables_root=args.tables)
    if args.json:
        print(json.dumps(r))
        return
    s = r["stats"]
    line = (f"{args.dir}: {r['backend']} {r['precision']} batch {r['batch_size']} on {r['device']}: measured "
            f"{r['measured_ms']:.4f} ms ({r['statistic']}; median {s['median_ms']:.4f}, IQR {s['iqr_ms']:.4f}, "
            f"p90 {s['p90_ms']:.4f}, n={s['n']})")
    if "predicted_ms" in r:
        line += f"; predicted {r['predicted_ms']:.4f} ms ({100 * r['error']:+.1f} %)"
    else:
        line += "; no latency table for these settings, so no prediction"
    print(line)


def cmd_pipeline(args: argparse.Namespace) -> None:
    from hwaware.pipeline import run_pipeline

    result = run_pipeline(args.out, latency_ms=args.latency_ms, progress=not args.quiet)
    total = sum(result["seconds"].values())
    print(f"pipeline done in {total:.0f} s: budget {result['budget_ms']:g} ms, "
          f"test top-1 {result['card']['test_top1']:.4f}, measured {result['bench']['measured_ms']:.4f} ms, "
          f"predicted {result['bench'].get('predicted_ms', float('nan')):.4f} ms; see {args.out}/report.md")


# ---- the parser ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other hwaware error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hwaware", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    space = sub.add_parser("space", help="list or show search spaces")
    space_sub = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    space_sub.add_parser("list", help="the built-in spaces").set_defaults(func=cmd_space_list)
    show = space_sub.add_parser("show", help="choices, number of subnets, params/FLOPs range")
    show.add_argument("space", help="built-in name or YAML file (hwaware or AutoFormer format)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_space_show)

    cost = sub.add_parser("cost", help="params and FLOPs of an Arch (fvcore, 1 FLOP = 1 multiply-add)")
    cost.add_argument("--space", required=True, help="built-in name or YAML file")
    cost.add_argument("--arch", required=True, help="largest, smallest, middle, or an Arch YAML (AutoFormer's RETRAIN too)")
    cost.add_argument("--json", action="store_true", help="print one JSON object with absolute counts")
    cost.set_defaults(func=cmd_cost)

    prof = sub.add_parser("profile", help="measure a per-device latency table (or --estimate, --validate)")
    prof.add_argument("--device", help="device profile name (profiles/<name>.yaml), e.g. cpu, t4, h100")
    prof.add_argument("--space", help="built-in space name or YAML file")
    prof.add_argument("--backend", choices=["onnxruntime", "tensorrt", "torch"], help="default: the profile's")
    prof.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: the profile's")
    prof.add_argument("--batch", type=int, help="batch size (default: the profile's first)")
    prof.add_argument("--out", default="latency_tables", help="folder for the table (default latency_tables/)")
    prof.add_argument("--seed", type=int, help="seed for piece order and calibration subnets (default 0)")
    prof.add_argument("--threads", type=int, help="intra-op threads (default: the profile's)")
    prof.add_argument("--warmup", type=int, help="warm-up runs per item")
    prof.add_argument("--min-repeats", dest="min_repeats", type=int, help="minimum timed runs per item")
    prof.add_argument("--min-time", dest="min_time_s", type=float, help="minimum seconds of timed runs per item")
    prof.add_argument("--fit-subnets", dest="fit_subnets", type=int, help="whole subnets the correction is fitted on")
    prof.add_argument("--holdout-subnets", dest="holdout_subnets", type=int, help="held-out subnets it is validated on")
    prof.add_argument("--force", action="store_true", help="measure again although the table exists")
    prof.add_argument("--estimate", action="store_true", help="roofline table from the profile's peak figures")
    prof.add_argument("--calibrate-from", dest="calibrate_from", help="measured table to fit --estimate's efficiencies on")
    prof.add_argument("--validate", metavar="TABLE", help="measure fresh subnets end to end and report the table's error")
    prof.add_argument("--subnets", type=int, default=30, help="subnets for --validate (default 30)")
    prof.add_argument("--quiet", action="store_true", help="no progress bar")
    prof.set_defaults(func=cmd_profile)

    train = sub.add_parser("train", help="train a supernet (resumes when run again; DDP under torchrun)")
    train.add_argument("--space", required=True, help="built-in space name or YAML file")
    train.add_argument("--data", required=True, help="digits, synthetic, imagefolder:PATH, cifar10:PATH or cifar100:PATH")
    train.add_argument("--out", required=True, help="run folder: last.pt, metrics.csv, run.json")
    train.add_argument("--recipe", help="built-in recipe (digits, imagenet) or YAML of settings; default: digits for "
                       "--data digits, else imagenet")
    train.add_argument("--strategy", choices=["uniform", "sandwich"], help="subnet sampling (default: the recipe's)")
    train.add_argument("--num-random", dest="num_random", type=int, help="sandwich: random subnets per step")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    train.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine with warm-up)")
    train.add_argument("--min-lr", dest="min_lr", type=float)
    train.add_argument("--warmup-epochs", dest="warmup_epochs", type=float)
    train.add_argument("--weight-decay", dest="weight_decay", type=float)
    train.add_argument("--drop-path", dest="drop_path", type=float)
    train.add_argument("--clip-grad", dest="clip_grad", type=float, help="max gradient norm (0: off)")
    train.add_argument("--ema-decay", dest="ema_decay", type=float, help="keep an EMA of the weights (0: off)")
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision on CUDA")
    train.add_argument("--seed", type=int)
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="steps between checkpoints")
    train.add_argument("--workers", dest="num_workers", type=int, help="data loader processes")
    train.add_argument("--device", help="auto, cpu, cuda (default auto)")
    train.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="top-1 / top-5 of one subnet of a trained supernet")
    ev.add_argument("--checkpoint", required=True, help="a supernet checkpoint (RUN/last.pt)")
    ev.add_argument("--arch", default="largest", help="largest, smallest, middle or an Arch YAML (default largest)")
    ev.add_argument("--split", choices=["val", "test"], default="val")
    ev.add_argument("--data", help="dataset spec (default: the one the supernet was trained on)")
    ev.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object (top1, top5 as fractions 0..1)")
    ev.set_defaults(func=cmd_evaluate)

    search = sub.add_parser("search", help="evolutionary search under latency / FLOPs / params budgets")
    search.add_argument("--checkpoint", required=True, help="a trained supernet (RUN/last.pt)")
    search.add_argument("--device", help="device whose table (in --tables) prices latency, e.g. cpu")
    search.add_argument("--table", help="a latency table CSV (instead of --device)")
    search.add_argument("--tables", default="latency_tables", help="folder of latency tables (default latency_tables/)")
    search.add_argument("--latency-ms", dest="latency_ms", help="latency budget(s) in ms, e.g. 5 or 1,2,5")
    search.add_argument("--flops-g", dest="flops_g", help="FLOPs budget(s) in G multiply-adds")
    search.add_argument("--params-m", dest="params_m", help="parameter budget(s) in millions")
    search.add_argument("--min-params-m", dest="min_params_m", help="lower bound on parameters (AutoFormer's window)")
    search.add_argument("--out", required=True, help="folder for best_*.yaml, candidates.csv, pareto.csv/png")
    search.add_argument("--strategy", choices=["evolution", "random"], help="default evolution")
    search.add_argument("--population", type=int, help="default 50")
    search.add_argument("--generations", type=int, help="default 20")
    search.add_argument("--parents", type=int, help="top Archs kept as parents (default 10)")
    search.add_argument("--mutation-children", dest="mutation_children", type=int, help="default 25")
    search.add_argument("--crossover-children", dest="crossover_children", type=int, help="default 25")
    search.add_argument("--seed", type=int, help="default 0")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=cmd_search)

    export = sub.add_parser("export", help="export a subnet as timm, ONNX, TensorRT and a Triton repository")
    export.add_argument("--checkpoint", required=True, help="a trained supernet (RUN/last.pt)")
    export.add_argument("--arch", required=True, help="largest, smallest, middle or an Arch YAML (e.g. search's best)")
    export.add_argument("--format", default="timm,onnx,triton", help="any of timm,onnx,tensorrt,triton")
    export.add_argument("--out", required=True, help="export folder (refused if it exists, unless --force)")
    export.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--batch-sizes", dest="batch_sizes", default="1,8,32",
                        help="checked batches, TensorRT profile and Triton max batch (default 1,8,32)")
    export.add_argument("--device", help="device whose latency table gives the card's predicted latency")
    export.add_argument("--table", help="a latency table CSV (instead of --device)")
    export.add_argument("--tables", default="latency_tables", help="folder of latency tables")
    export.add_argument("--force", action="store_true", help="replace an existing export folder")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="measure an exported model and compare with the table's prediction")
    bench.add_argument("dir", help="an export folder")
    bench.add_argument("--device", default="cpu", help="device profile (default cpu)")
    bench.add_argument("--backend", choices=["onnxruntime", "tensorrt", "torch"], help="default: the table's")
    bench.add_argument("--batch", type=int, help="default: the table's batch size")
    bench.add_argument("--table", help="a latency table CSV (default: found for --device)")
    bench.add_argument("--tables", default="latency_tables", help="folder of latency tables")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)

    pipe = sub.add_parser("pipeline", help="the main job on digits: train, profile, search, export, bench, report")
    pipe.add_argument("--out", default="runs/pipeline", help="folder for every stage (default runs/pipeline)")
    pipe.add_argument("--latency-ms", dest="latency_ms", type=float,
                      help="latency budget (default: half-way between the cheapest and the largest subnet)")
    pipe.add_argument("--quiet", action="store_true", help="no progress bars")
    pipe.set_defaults(func=cmd_pipeline)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        args.func(args)
    except HwawareError as exc:
        print(f"hwaware {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hwaware {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
