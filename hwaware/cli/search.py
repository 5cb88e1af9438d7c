"""`hwaware search`: evolutionary search under latency / FLOPs / params budgets."""

from __future__ import annotations

import argparse


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


def register(sub) -> None:
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
