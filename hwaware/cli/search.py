"""`hwaware search`: evolutionary search under latency / FLOPs / params budgets, for one target or a fleet."""

from __future__ import annotations

import argparse
import re

from hwaware.cli import bounded, fill_from_project
from hwaware.cli._scoring import add_scoring_flags, scoring_options
from hwaware.precision import PRECISIONS
from hwaware.search import BUDGET_KINDS


def budget_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_out(outputs: str | None, budgets: dict, devices: str | None = None) -> str:
    """`<outputs>/search-latency_ms-5` (one folder per budget set, so another budget is another search); a fleet's
    folder also names its devices, `search-cpu_cpu-int8-latency_ms-5`."""
    label = "-".join(f"{k}-{v}" for k, v in budgets.items() if v is not None)
    if devices and "," in devices:
        label = f"{devices}-{label}"
    return f"{outputs or 'runs'}/search-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}"


def cmd_search(args: argparse.Namespace) -> None:
    import os

    from hwaware.pipeline import search_checkpoint
    from hwaware.search_results import summary_table

    flags = {"checkpoint": "checkpoint", "tables": "tables", "outputs": "outputs"}
    if not args.table and args.latency_ms is not None:  # the project's device prices latency budgets only
        flags["device"] = "device"
    fill_from_project(args, "search", flags, required=("checkpoint",))
    budgets = {k: getattr(args, k) for k in BUDGET_KINDS}
    args.out = args.out or default_out(args.outputs, budgets, args.device)
    args.tables = args.tables or "latency_tables"
    options = {k: getattr(args, k) for k in ("population", "generations", "parents", "mutation_children",
                                             "crossover_children", "strategy", "seed") if getattr(args, k) is not None}
    result = search_checkpoint(args.checkpoint, args.out, budgets, device=args.device, table=args.table,
                               tables_root=args.tables, data=args.data, precision=args.precision,
                               one_for_all=args.one_for_all, accuracy_cache=not args.no_accuracy_cache,
                               progress=not args.quiet, scoring=scoring_options(args), **options)
    if os.environ.get("RANK", "0") == "0":
        from pathlib import Path

        from hwaware.io import read_json
        from hwaware.pipeline import SCORING_FILE

        print(summary_table(result))
        scoring = read_json(Path(args.out) / SCORING_FILE, "the search wrote no scoring.json")
        print(f"scored on {scoring['selection']['describe']}")
        held_out = scoring["held_out"]
        if held_out is None:
            print("held-out top-1: none (no image outside the scored set: pass a smaller --score-images)")
        else:
            print(f"held-out top-1 on {held_out['describe']}: "
                  + ", ".join(f"{label} {top1:.4f}" for label, top1 in held_out["top1"].items()))
        print(f"results in {args.out}/ (matrix.md, best_*.yaml, candidates.csv, pareto.csv, pareto.png, "
              "scoring.json)")


def register(sub) -> None:
    search = sub.add_parser("search", help="evolutionary search under latency / FLOPs / params budgets")
    search.add_argument("--checkpoint", help="a trained supernet (RUN/last.pt; default: the project's)")
    search.add_argument("--data", help="dataset to score subnets on (default: the one the checkpoint records)")
    search.add_argument("--device", help="target(s) whose tables (in --tables) price latency: cpu, or a fleet such "
                        "as cpu,cpu:int8,t4:fp16,cpu:b8 (DEVICE[:PRECISION][:bBATCH])")
    search.add_argument("--table", action="append", help="a latency table CSV as a target (repeatable)")
    search.add_argument("--precision", choices=list(PRECISIONS),
                        help="which of each device's tables prices latency, e.g. int8 (default: the profile's)")
    search.add_argument("--tables", help="folder of latency tables (default: the project's, else latency_tables/)")
    for kind in BUDGET_KINDS.values():
        search.add_argument(budget_flag(kind.name), dest=kind.name, help=kind.help)
    search.add_argument("--one-for-all", dest="one_for_all", action="store_true",
                        help="also find the one subnet that meets every target's latency budget at once "
                             "(a fleet serving one model everywhere)")
    search.add_argument("--no-accuracy-cache", dest="no_accuracy_cache", action="store_true",
                        help="neither read nor add to the scores kept beside the checkpoint")
    search.add_argument("--out", help="folder for matrix.csv/md, best_*.yaml, candidates.csv, pareto.csv/png "
                        "(default: <project outputs or runs>/search-<budgets>)")
    search.set_defaults(outputs=None)
    search.add_argument("--strategy", choices=["evolution", "random"], help="default evolution")
    search.add_argument("--population", type=bounded(int, 0, 100000), help="new subnets per generation, shared "
                        "by every cell of a fleet (default 50)")
    search.add_argument("--generations", type=bounded(int, 0, 100000), help="default 20")
    search.add_argument("--parents", type=bounded(int, 0, 100000), help="top Archs kept as parents (default 10)")
    search.add_argument("--mutation-children", dest="mutation_children", type=bounded(int, 0, 100000), help="default 25")
    search.add_argument("--crossover-children", dest="crossover_children", type=bounded(int, 0, 100000), help="default 25")
    search.add_argument("--seed", type=bounded(int, 0), help="default 0")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scoring_flags(search, images_help="val images every subnet is scored on, a fixed class-stratified draw "
                      "(default: all up to 10,000; or all)")
    search.set_defaults(func=cmd_search)
