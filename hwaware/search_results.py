"""What a search leaves behind: every candidate, the Pareto front, a best Arch per cell, the deployment matrix.

Separate from `hwaware.search` (the evolution) because writing and drawing results is another job:
it needs pandas and matplotlib, the search itself needs neither.

A fleet search's costs name their target (`latency_ms[cpu:int8]`); the matrix shows, for every
cell, its subnet's predicted latency on its own target and on every other one, so a user sees
what the T4 model would cost on the CPU. `targets` (from `hwaware.pipeline`) says which tables
priced each latency cost; it goes into `fleet.json`, which `hwaware export --from-search` reads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hwaware.io import atomic_write, dumps_strict
from hwaware.search import Constraints, SearchResult
from hwaware.space import save_arch

__all__ = [
    "FLEET_FILE", "candidates_frame", "pareto_metric", "pareto_frame", "pareto_figure_png", "best_file",
    "latency_costs", "cell_target", "matrix_frame", "matrix_markdown", "fronts_figure_png", "write_results",
    "summary_table",
]

FLEET_FILE = "fleet.json"
ONE_FOR_ALL = "all targets"


def candidates_frame(result: SearchResult) -> pd.DataFrame:
    """One row per evaluated Arch: the Arch, top-1, every cost, where it was found, and whether it fits each target."""
    rows = []
    for e in result.evaluations:
        costs = result.costs[e.arch]
        row = {"arch": e.arch.to_json(), "short": e.arch.short(), "top1": e.top1, **costs,
               "generation": e.generation, "found_by": e.cell}
        row.update({f"fits[{t.label}]": t.fits(costs) for t in result.cells})
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_metric(result: SearchResult) -> str:
    """The cost the trade-off is drawn against: latency when the search priced it, else the first budget's."""
    latencies = latency_costs(result)
    return latencies[0] if latencies else result.cells[0].budgets[0].cost


def pareto_frame(candidates: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The non-dominated rows: no other Arch is at least as accurate and at most as costly (one strictly)."""
    ordered = candidates.sort_values([metric, "top1"], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for index, top1 in ordered["top1"].items():
        if top1 > best:
            keep.append(index)
            best = top1
    return ordered.loc[keep].reset_index(drop=True)


def pareto_figure_png(result: SearchResult, candidates: pd.DataFrame, front: pd.DataFrame, metric: str) -> bytes:
    """Accuracy against `metric`: every candidate, the front, each budget on that metric, each chosen Arch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = ax.scatter(candidates[metric], candidates["top1"] * 100, c=candidates["generation"], cmap="viridis",
                        s=10, alpha=0.55, linewidths=0, label=f"candidates ({len(candidates)})")
    fig.colorbar(points, ax=ax, label="generation")
    ax.step(front[metric], front["top1"] * 100, where="post", color="black", lw=1.2, label="Pareto front")
    budget_limits = dict.fromkeys(b.limit for t in result.cells for b in t.budgets if b.metric == metric)
    for i, limit in enumerate(budget_limits):
        ax.axvline(limit, color="tab:red", ls="--", lw=1, label="budget" if i == 0 else None)
    for label, e in result.best.items():
        x = result.costs[e.arch][metric]
        ax.scatter([x], [e.top1 * 100], marker="*", s=180, color="tab:red", edgecolors="black", zorder=5)
        ax.annotate(label, (x, e.top1 * 100), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(metric.replace("_", " "))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{result.space.name}: {result.strategy} search, seed {result.seed}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def best_file(cell: Constraints) -> str:
    return f"best_{cell.slug}.yaml"


def latency_costs(result: SearchResult) -> list[str]:
    """The search's latency costs, one per target: `latency_ms`, or `latency_ms[<target>]` for a fleet."""
    names = next(iter(result.costs.values())).keys() if result.costs else ()
    return [n for n in names if n == "latency_ms" or n.startswith("latency_ms[")]


def _target_of(cost: str, targets: Sequence[Mapping[str, Any]]) -> str:
    named = {t["cost"]: t["name"] for t in targets}
    return named.get(cost) or (cost[len("latency_ms["):-1] if cost.startswith("latency_ms[") else "-")


def cell_target(cell: Constraints, targets: Sequence[Mapping[str, Any]] = ()) -> str:
    """Who a cell's subnet is for: its target, `all targets` for the one subnet meeting every target's budget,
    the one target of a single-target search, or `-` when no target prices it (FLOPs or params alone)."""
    if len(cell.targets) > 1:
        return ONE_FOR_ALL
    if cell.targets:
        return cell.targets[0]
    return targets[0]["name"] if len(targets) == 1 else "-"


def matrix_frame(result: SearchResult, targets: Sequence[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """The deployment matrix: one row per cell (target x budget) with its subnet, val top-1, params, FLOPs and
    its predicted latency on every target the search priced."""
    rows = []
    for cell in result.cells:
        e = result.best[cell.label]
        costs = result.costs[e.arch]
        row = {"target": cell_target(cell, targets), "budget": cell.label, "short": e.arch.short(),
               "val_top1": e.top1, "params_m": costs.get("params_m"), "flops_g": costs.get("flops_g")}
        row.update({cost: costs[cost] for cost in latency_costs(result)})
        row.update(best_file=best_file(cell), arch=e.arch.to_json())
        rows.append(row)
    return pd.DataFrame(rows)


def matrix_markdown(matrix: pd.DataFrame, targets: Sequence[Mapping[str, Any]] = ()) -> str:
    """matrix.csv as a Markdown table; the latency on the cell's own target is in bold."""
    latencies = [c for c in matrix.columns if c == "latency_ms" or c.startswith("latency_ms[")]
    names = {cost: _target_of(cost, targets) for cost in latencies}
    header = ["target", "budget", "subnet", "val top-1", *(f"ms on {names[c]}" for c in latencies), "params (M)",
              "GFLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in matrix.iterrows():
        cells = [row["target"], f"`{row['budget']}`", f"`{row['short']}`", f"{100 * row['val_top1']:.2f} %"]
        for cost in latencies:
            own = names[cost] == row["target"] or row["target"] == ONE_FOR_ALL
            cells.append(f"**{row[cost]:.4g}**" if own else f"{row[cost]:.4g}")
        cells += [f"{row['params_m']:.4g}", f"{row['flops_g']:.4g}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def fronts_figure_png(result: SearchResult, candidates: pd.DataFrame, targets: Sequence[Mapping[str, Any]] = ()
                      ) -> bytes:
    """One panel per target: every candidate's accuracy against its latency there, that target's Pareto front,
    its budgets, and the subnets chosen for it (a star) and for every target at once (a diamond)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    latencies = latency_costs(result)
    columns = min(len(latencies), 3)
    rows = math.ceil(len(latencies) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, cost in zip(axes, latencies, strict=False):
        name = _target_of(cost, targets)
        front = pareto_frame(candidates, cost)
        ax.scatter(candidates[cost], candidates["top1"] * 100, s=6, color="0.6", alpha=0.5, linewidths=0)
        ax.step(front[cost], front["top1"] * 100, where="post", color="black", lw=1.1, label="Pareto front")
        for cell in result.cells:
            e = result.best[cell.label]
            for budget in (b for b in cell.budgets if b.cost == cost):
                ax.axvline(budget.limit, color="tab:red", ls="--", lw=0.8)
            target = cell_target(cell, targets)
            if target in (name, ONE_FOR_ALL):
                ax.scatter([result.costs[e.arch][cost]], [e.top1 * 100], marker="*" if target == name else "D",
                           s=120 if target == name else 45, color="tab:red" if target == name else "tab:blue",
                           edgecolors="black", zorder=5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(latencies):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.space.name}: {len(result.evaluations)} subnets, {len(result.cells)} cells "
                 "(star: a target's best; diamond: one subnet for all)", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_results(result: SearchResult, out_dir: str | Path, targets: Sequence[Mapping[str, Any]] = (),
                  extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write best_<cell>.yaml per cell, candidates.csv, pareto.csv/png, matrix.csv/md, and for a search of
    several targets fronts.png; with `targets`, fleet.json (targets, cells and `extra`, e.g. the checkpoint).

    Everything is rendered in memory first, so a failure while plotting or formatting leaves
    no new file behind; each write is temp-then-rename, so none is ever half there.
    """
    out_dir = Path(out_dir)
    metric = pareto_metric(result)
    candidates = candidates_frame(result)
    front = pareto_frame(candidates, metric)
    matrix = matrix_frame(result, targets)
    rendered = {
        "candidates.csv": candidates.to_csv(index=False).encode(),
        "pareto.csv": front.to_csv(index=False).encode(),
        "pareto.png": pareto_figure_png(result, candidates, front, metric),
        "matrix.csv": matrix.to_csv(index=False).encode(),
        "matrix.md": matrix_markdown(matrix, targets).encode(),
    }
    if len(latency_costs(result)) > 1:
        rendered["fronts.png"] = fronts_figure_png(result, candidates, targets)
    if targets:
        fleet = {"format": "hwaware-fleet/1", **(extra or {}), "space": result.space.name, "targets": list(targets),
                 "cells": [{"label": c.label, "target": cell_target(c, targets),
                            "targets": list(c.targets) or [t["name"] for t in targets[:1] if len(targets) == 1],
                            "best_file": best_file(c), "slug": c.slug} for c in result.cells]}
        rendered[FLEET_FILE] = (dumps_strict(fleet, indent=1) + "\n").encode()
    written = []
    for cell in result.cells:
        e = result.best[cell.label]
        path = out_dir / best_file(cell)
        save_arch(e.arch, path, space=result.space.name, budget=cell.label, target=cell_target(cell, targets),
                  top1=e.top1, costs=result.costs[e.arch], strategy=result.strategy, seed=result.seed)
        written.append(path)
    for name, data in rendered.items():
        atomic_write(out_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
        written.append(out_dir / name)
    return written


def summary_table(result: SearchResult, targets: Sequence[Mapping[str, Any]] = ()) -> str:
    """The terminal summary: one line per cell with its target, best Arch, top-1 and costs."""
    names = list(next(iter(result.costs.values())).keys())
    header = ["target", "budget", "best arch", "top1", *names]
    rows = [
        [cell_target(cell, targets), cell.label, result.best[cell.label].arch.short(),
         f"{result.best[cell.label].top1 * 100:.2f}%",
         *(f"{result.costs[result.best[cell.label].arch][n]:.4g}" for n in names)]
        for cell in result.cells
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cached = f", {result.cached_scores} of them served by the accuracy cache" if result.cached_scores else ""
    lines.append(f"{result.strategy} search, seed {result.seed}: {len(result.evaluations)} Archs evaluated "
                 f"({result.fitness_calls} fitness calls in this run{cached})")
    return "\n".join(lines)
