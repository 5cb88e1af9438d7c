"""`hwaware export` and `hwaware bench`: ship a subnet, then time it beside the table's prediction."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hwaware.cli import bounded, fill_from_project
from hwaware.cli._scoring import add_scoring_flags, scoring_options
from hwaware.precision import EXPORT_PRECISIONS, PRECISIONS, QUANT_MODES


def cmd_export(args: argparse.Namespace) -> None:
    from hwaware.pipeline import export_checkpoint

    if args.from_search is not None:
        return cmd_export_fleet(args)
    flags = {"checkpoint": "checkpoint", "tables": "tables", **({"device": "device"} if args.table is None else {})}
    filled = fill_from_project(args, "export", flags, required=("checkpoint",))
    args.tables = args.tables or "latency_tables"
    result = export_checkpoint(args.checkpoint, args.arch, args.out, formats=args.format, precision=args.precision,
                               batch_sizes=args.batch_sizes, force=args.force, device=args.device, table=args.table,
                               tables_root=args.tables, data=args.data, table_optional="device" in filled,
                               quantize_mode=args.quantize_mode, max_accuracy_drop=args.max_accuracy_drop,
                               calibration_images=args.calibration_images, scoring=scoring_options(args))
    card = result.card
    accuracy = card.get("accuracy") or {}
    top1 = ", ".join(f"{name.replace('_', '-')} top-1 {row['top1']:.4f}" for name, row in accuracy.items())
    print(f"exported {', '.join(result.formats)} to {result.out_dir}: {card['arch_short']}, "
          f"{card['params']:,} params, {card['flops']:,} FLOPs, {top1 or 'no accuracy (no data)'}"
          + (f", predicted {card['predicted_latency_ms']:.4f} ms" if "predicted_latency_ms" in card else ""))
    for name, row in accuracy.items():
        print(f"  {name.replace('_', '-')}: {row['images']}")
    quantized = card.get("quantized") or {}
    for split, row in (quantized.get("accuracy") or {}).items():
        print(f"  {card['precision']} ({quantized.get('mode')}) {split}: top-1 {row['quantized_top1']:.4f} against "
              f"{row['float_top1']:.4f} float ({-row['drop_points']:+.2f} points), top-1 agreement {row['agreement']:.4f}")


def cmd_export_fleet(args: argparse.Namespace) -> None:
    """--from-search: every cell of a fleet search for its own target."""
    from hwaware.errors import HwawareError
    from hwaware.pipeline import export_fleet

    given = [flag for flag, value in (("--arch", args.arch), ("--table", args.table), ("--device", args.device),
                                      ("--precision", args.precision != "fp32" or None),
                                      ("--format", args.format != "timm,onnx,triton" or None)) if value is not None]
    if given:
        raise HwawareError(f"--from-search exports each cell for its own target's table; drop {', '.join(given)}")
    manifest = export_fleet(args.from_search, args.out, checkpoint=args.checkpoint, batch_sizes=args.batch_sizes,
                            force=args.force, data=args.data, scoring=scoring_options(args))
    for cell in manifest["cells"]:
        line = f"  {cell['folder']}: {cell['target']}, {', '.join(cell['formats'])} ({cell['precision']})"
        if cell.get("per_gpu_plans"):
            line += f"; one Triton model with plans for compute capability {', '.join(cell['per_gpu_plans'])}"
        print(line)
        for note in [*cell["warnings"], *cell.get("per_gpu_skipped", [])]:
            print(f"    {note}")
    print(f"exported {len(manifest['cells'])} cells to {args.out}; Triton repository {args.out}/triton "
          f"({len(manifest['triton'])} models)")


def cmd_bench(args: argparse.Namespace) -> None:
    from hwaware.pipeline import FLEET_EXPORT_FILE, bench_export, bench_fleet

    if (Path(args.dir) / FLEET_EXPORT_FILE).is_file():
        fleet = bench_fleet(args.dir)
        if args.json:
            print(json.dumps(fleet))
            return
        for r in fleet["ran"]:
            predicted = f"; predicted {r['predicted_ms']:.4f} ms ({100 * r['error']:+.1f} %)" if "predicted_ms" in r else ""
            print(f"{r['folder']} on {r['target']}: {r['backend']} {r['precision']} batch {r['batch_size']}: measured "
                  f"{r['measured_ms']:.4f} ms ({r['statistic']}){predicted}")
        for where, reason in fleet["skipped"]:
            print(f"{where}: skipped ({reason})")
        return
    fill_from_project(args, "bench", {"device": "device", "tables": "tables"})
    args.device, args.tables = args.device or "cpu", args.tables or "latency_tables"
    r = bench_export(args.dir, args.device, backend=args.backend, batch_size=args.batch, table=args.table,
                     tables_root=args.tables, precision=args.precision)
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


def register(sub) -> None:
    export = sub.add_parser("export", help="export a subnet as timm, ONNX, TensorRT and a Triton repository")
    export.add_argument("--checkpoint", help="a trained supernet (RUN/last.pt; default: the project's)")
    export.add_argument("--data", help="dataset for the card's top-1 (default: the one the checkpoint records)")
    export.add_argument("--arch", help="an Arch YAML (e.g. search's best), released, largest, smallest or middle "
                        "(default: the subnet a train --arch run trained)")
    export.add_argument("--format", default="timm,onnx,triton", help="any of timm,onnx,tensorrt,triton")
    export.add_argument("--out", required=True, help="export folder (refused if it exists, unless --force)")
    export.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                        help="fp32, fp16; int8 / fp8 write model.<precision>.onnx beside the float model.onnx")
    export.add_argument("--quantize-mode", dest="quantize_mode", choices=QUANT_MODES,
                        help="int8: dynamic (ONNX Runtime on the CPU; the default without tensorrt) or static Q/DQ "
                             "calibrated on training images (the default with tensorrt)")
    export.add_argument("--max-accuracy-drop", dest="max_accuracy_drop", type=bounded(float, 0, 100),
                        help="refuse a quantized model losing more top-1 points than this on val or test")
    export.add_argument("--calibration-images", dest="calibration_images", type=bounded(int, 1), default=256,
                        help="class-stratified training images static quantization is calibrated on (default 256, "
                        "at most 2048; more than the training split has is refused)")
    export.add_argument("--batch-sizes", dest="batch_sizes", default="1,8,32",
                        help="checked batches, TensorRT profile and Triton max batch (default 1,8,32)")
    export.add_argument("--device", help="device whose latency table gives the card's predicted latency")
    export.add_argument("--table", help="a latency table CSV (instead of --device)")
    export.add_argument("--tables", help="folder of latency tables (default: the project's, else latency_tables/)")
    export.add_argument("--from-search", dest="from_search", metavar="DIR",
                        help="a fleet search's folder: export every cell for its target (TensorRT engine, INT8 ONNX, "
                             "...), one folder per cell, plus one Triton repository holding them all")
    export.add_argument("--force", action="store_true", help="replace an existing export folder")
    add_scoring_flags(export, images_help="images of each split the card's top-1 is measured on, a class-stratified "
                      "draw (default: all up to 10,000; or all)")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="measure an exported model and compare with the table's prediction")
    bench.add_argument("dir", help="an export folder")
    bench.add_argument("--device", help="device profile (default: the project's, else cpu)")
    bench.add_argument("--backend", choices=["onnxruntime", "tensorrt", "torch"], help="default: the table's")
    bench.add_argument("--precision", choices=list(PRECISIONS),
                       help="time this precision's model (int8: model.int8.onnx) with its table (default: the profile's)")
    bench.add_argument("--batch", type=bounded(int, 1, 65536), help="default: the table's batch size")
    bench.add_argument("--table", help="a latency table CSV (default: found for --device)")
    bench.add_argument("--tables", help="folder of latency tables (default: the project's, else latency_tables/)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)
