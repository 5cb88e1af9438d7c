"""How far off is `hwaware profile --estimate` on GPUs it never saw, and how far does a few-shot transfer bring it?

    python benchmarks/estimate_accuracy.py [--reference CSV] [--cpu-transfer SPACE] [--seeds N]

Refits everything from the reference data (hwaware/reference/gpu_latency.csv) and prints, side by side:
  1. the GPU kernel model per stack: leave one GPU out (pooled, per GPU, per batch range) and the half split
     (fit on half the models of each GPU and version, predict the other half);
  2. the previous roofline (efficiencies fitted on a measured CPU table) on the same rows;
  3. few-shot transfer between GPUs of the data (fit one GPU, adapt with k rows of another): MAPE vs k,
     one factor vs affine vs affine plus a cost per layer;
  4. with --cpu-transfer SPACE: the same between CPU "devices" measured here (ONNX Runtime 1 -> 2 threads,
     fp32 -> INT8) from the committed 1-thread table of SPACE, k = 10, 10 held out, with the time it took
     against the source's full profile. This measures, so it takes minutes (--keep DIR keeps what it measured;
     --retest times the held-out subnets again: how repeatable this host is, the floor under any map).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import pandas as pd

from hwaware.latency.estimate import error_summary, fit_kernel_params, half_split, leave_one_gpu_out, stack_rows
from hwaware.latency.transfer import ADAPTERS, fit_adapter, transfer_on_reference
from hwaware.reference import load_reference

BATCH_RANGES = [(1, 1), (2, 32), (33, 255), (256, 4096)]


def fmt(summary: dict) -> str:
    if not summary.get("n"):
        return "n=0"
    tau = summary.get("kendall_tau")
    return (f"n={summary['n']:3d}  MAPE {100 * summary['mape']:6.1f}%  within10 {100 * summary['within_10pct']:4.0f}%  "
            f"within25 {100 * summary['within_25pct']:4.0f}%  tau {'  -  ' if tau is None else f'{tau:.3f}'}")


def kernel_model_section(reference: pd.DataFrame) -> dict[str, pd.DataFrame]:
    print("== 1. GPU kernel model: leave one GPU out, half split")
    logo_rows = {}
    for backend in ("torch", "tensorrt"):
        rows = stack_rows(reference, backend)
        started = time.perf_counter()
        logo = leave_one_gpu_out(rows)
        seconds = time.perf_counter() - started
        rows = rows.assign(predicted_ms=logo["predicted_ms"])
        logo_rows[backend] = rows
        print(f"[{backend}: {', '.join(sorted(rows['stack'].unique()))}; {len(rows)} rows; refit in {seconds:.1f} s]")
        print(f"  leave one GPU out      {fmt(logo)}")
        for gpu, summary in logo["per_gpu"].items():
            print(f"    held out {gpu:18s} {fmt(summary)}")
        for lo, hi in BATCH_RANGES:
            part = rows[(rows["batch"] >= lo) & (rows["batch"] <= hi)]
            if len(part):
                sets = part["gpu"] + part["stack_version"]
                print(f"    batch {lo:4d}-{hi:<4d}        {fmt(error_summary(part['measured_ms'], part['predicted_ms'], sets))}")
        geforce = rows[rows["gpu"].str.startswith("rtx") & ~rows["gpu"].str.contains("maxq")]
        if len(geforce) and geforce["gpu"].nunique() > 1:
            refit = leave_one_gpu_out(geforce)
            print(f"  GeForce cards only     {fmt(refit)}  (no power-limited card in the fit or the test)")
        print(f"  half split per set     {fmt(half_split(rows))}")
    return logo_rows


def previous_roofline_section(reference: pd.DataFrame, cpu_table: Path) -> None:
    """The former --estimate: efficiencies fitted on a measured CPU table, applied to each GPU's peaks."""
    from hwaware.latency.devices import load_device_profile
    from hwaware.latency.estimate import _roofline, fit_efficiency, piece_work
    from hwaware.latency.table import LatencyTable
    from hwaware.space import SearchSpace
    from hwaware.vit import Piece

    print(f"== 2. previous roofline (efficiencies fitted on {cpu_table.name}) vs the kernel model, same rows")
    table = LatencyTable.load(cpu_table)
    eff = fit_efficiency(table, load_device_profile(table.device))
    print(f"  fitted on the CPU table: compute {eff['compute_efficiency']:.3f}, memory {eff['memory_efficiency']:.3f}, "
          f"overhead {eff['overhead_ms']:.3f} ms per piece")
    rows = reference[reference["precision"] == "fp16"]
    predicted = []
    for r in rows.itertuples(index=False):
        space = SearchSpace(name="ref", embed_dims=(r.embed_dim,), depths=(r.depth,), num_heads=(r.num_heads,),
                            mlp_ratios=(r.mlp_ratio,), head_dim=r.embed_dim // r.num_heads, img_size=r.img_size,
                            patch_size=r.patch_size)
        profile = load_device_profile(r.gpu)
        parts = {}
        for piece in (Piece("stem", r.embed_dim), Piece("block", r.embed_dim, r.num_heads, r.mlp_ratio),
                      Piece("head", r.embed_dim)):
            flops, bytes_ = piece_work(space, piece, r.batch, "fp16")
            parts[piece.kind] = float(_roofline(flops, bytes_, profile.peak_flops_for("fp16"), profile.memory_bandwidth,
                                                eff["compute_efficiency"], eff["memory_efficiency"], eff["overhead_ms"]))
        predicted.append(parts["stem"] + r.depth * parts["block"] + parts["head"])
    rows = rows.assign(previous_ms=predicted)
    for stack, part in rows.groupby("stack"):
        sets = part["gpu"] + part["stack_version"]
        print(f"  {stack:18s} previous  {fmt(error_summary(part['measured_ms'], part['previous_ms'], sets))}")


def gpu_transfer_section(reference: pd.DataFrame, seeds: int) -> None:
    print("== 3. few-shot transfer between GPUs of the data (fit one GPU, adapt with k of another's rows)")
    cases = {"torch (timm, newest version per GPU)": stack_rows(reference, "torch"),
             "tensorrt (FasterTransformer, batch 1-32)": stack_rows(reference, "tensorrt")}
    for label, rows in cases.items():
        rows = rows[rows["stack"] != "tensorrt"]  # FasterTransformer's 4-row plugin sets are too small to split
        newest = rows.sort_values("stack_version").groupby("gpu")["stack_version"].last()
        sets = {gpu: rows[(rows["gpu"] == gpu) & (rows["stack_version"] == version)].reset_index(drop=True)
                for gpu, version in newest.items()}
        print(f"[{label}: {', '.join(f'{g} ({len(s)})' for g, s in sets.items())}]")
        params = {gpu: fit_kernel_params(rows) for gpu, rows in sets.items()}
        for k in (2, 3, 5, 10):
            line = []
            before = []
            for method in ADAPTERS:
                if method == "layers" and k < 3:
                    line.append("layers   - (needs k >= 3)")
                    continue
                after = []
                for source, target in permutations(sets, 2):
                    if k >= len(sets[target]) - 2:
                        continue
                    for seed in range(seeds):
                        result = transfer_on_reference(sets[source], sets[target], k, seed, method, params[source])
                        after.append(result["after"]["mape"])
                        before.append(result["before"]["mape"])
                line.append(f"{method} {100 * np.mean(after):5.1f}% (worst {100 * np.max(after):5.1f}%)")
            print(f"  k={k:2d}  before {100 * np.mean(before):6.1f}%   " + "   ".join(line))


def pieces(subnets: list[dict]) -> list[int]:
    """Each sidecar subnet's piece count (depth + 2), what the layers map charges per piece."""
    return [len(s["arch"]["num_heads"]) + 2 for s in subnets]


def retest_line(table, settings) -> str:
    """The held-out subnets timed again, as the transfer timed them: how far apart two measurements of the
    same subnets on this host are, the floor under any map's held-out error."""
    from hwaware.latency.devices import load_device_profile
    from hwaware.latency.profile import resolve_backend
    from hwaware.latency.recalibrate import measure_subnets
    from hwaware.space import Arch

    held = [s for s in table.meta["subnets"] if s["split"] == "holdout"]
    runner = resolve_backend(load_device_profile(table.device), table.backend, table.precision, settings.threads,
                             table.quantize_mode)
    again = measure_subnets(runner, table.space, table.batch_size, [Arch.from_dict(s["arch"]) for s in held],
                            settings, progress=False)
    floor = error_summary([s["measured_ms"] for s in held], again)
    return f"retest of the held-out subnets {100 * floor['mape']:5.1f}% apart (tau {floor['kendall_tau']:.2f})"


def cpu_transfer_section(space: str, keep: str | None = None, retest: bool = False) -> None:
    from hwaware.latency.devices import load_device_profile
    from hwaware.latency.table import LatencyTable, table_name
    from hwaware.latency.transfer import transfer_table

    source = Path("latency_tables") / table_name("cpu", "onnxruntime", "fp32", space, 1)
    meta = LatencyTable.load(source).meta
    timing = meta.get("timing") or {}
    full = timing.get("pieces_seconds", 0) + timing.get("calibration_seconds", 0)
    print(f"== 4. transfer between CPU devices measured here, from {source} (its full profile: {full:.0f} s, "
          f"{len(meta.get('subnets') or [])} subnets)")
    settings = load_device_profile("cpu").measurement
    cases = [("onnxruntime 1 -> 2 threads", dict(settings=settings.replace(threads=2))),
             ("onnxruntime fp32 -> int8 (dynamic)", dict(precision="int8", settings=settings))]
    for label, options in cases:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(keep or scratch) / label.split()[-1].strip("()")
            table = LatencyTable.load(transfer_table(source, "cpu", out, fit_subnets=10, holdout_subnets=10,
                                                     progress=False, force=True, **options))
        info, subnets = table.meta["transfer"], table.meta["subnets"]
        fit = [s for s in subnets if s["split"] == "fit"]
        held = [s for s in subnets if s["split"] == "holdout"]
        truth = [s["measured_ms"] for s in held]
        line = []
        for method in ADAPTERS:  # every map fitted on the same measured subnets
            adapter = fit_adapter([s["source_predicted_ms"] for s in fit], [s["measured_ms"] for s in fit], method,
                                  min(s["source_predicted_ms"] for s in subnets), pieces(fit))
            after = error_summary(truth, adapter.apply([s["source_predicted_ms"] for s in held], pieces(held)))
            line.append(f"{method} {100 * after['mape']:5.1f}% (tau {after['kendall_tau']:.2f})")
        print(f"  {label:36s} before {100 * info['validation_before']['mape']:5.1f}%   {'   '.join(line)};  "
              f"k=10 took {info['seconds_fit_subnets']:.0f} s (20 subnets {info['seconds']:.0f} s) vs {full:.0f} s "
              "for the full profile")
        if retest:
            print(f"  {'':36s} {retest_line(table, options['settings'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="reference CSV (default: the shipped one)")
    parser.add_argument("--cpu-table", default="latency_tables/cpu-onnxruntime-fp32-autoformer-t-b1.csv",
                        help="measured CPU table the previous roofline fits its efficiencies on")
    parser.add_argument("--cpu-transfer", metavar="SPACE", help="also measure CPU transfers from this space's table")
    parser.add_argument("--seeds", type=int, default=5, help="random draws of the k rows per GPU pair")
    parser.add_argument("--keep", metavar="DIR", help="keep the CPU transfers' tables (their measured subnets) here")
    parser.add_argument("--only-cpu-transfer", action="store_true", help="skip sections 1-3")
    parser.add_argument("--retest", action="store_true",
                        help="time each CPU transfer's held-out subnets again: the host's own repeatability")
    args = parser.parse_args()
    reference = load_reference(args.reference)
    print(f"reference: {len(reference)} rows, GPUs {', '.join(sorted(reference['gpu'].unique()))}")
    if not args.only_cpu_transfer:
        kernel_model_section(reference)
        previous_roofline_section(reference, Path(args.cpu_table))
        gpu_transfer_section(reference, args.seeds)
    if args.cpu_transfer:
        cpu_transfer_section(args.cpu_transfer, args.keep, args.retest)


if __name__ == "__main__":
    main()
