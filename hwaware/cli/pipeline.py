"""`hwaware pipeline`: the main job on the embedded data."""

from __future__ import annotations

import argparse

from hwaware.cli import bounded


def cmd_pipeline(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hwaware.pipeline import run_pipeline
    from hwaware.project import PROJECT_FILE, remember_after_success

    out = Path(args.out)

    def record() -> None:  # once the folder is claimed (a refused --out changes nothing), before the long work
        remember_after_success("pipeline", space="digits", checkpoint=out / "supernet" / "last.pt",
                               tables=out / "latency_tables", device="cpu", outputs=out)

    result = run_pipeline(args.out, latency_ms=args.latency_ms, progress=not args.quiet, claimed=record)
    total = sum(result["seconds"].values())
    print(f"pipeline done in {total:.0f} s: budget {result['budget_ms']:g} ms, "
          f"test top-1 {result['card']['test_top1']:.4f}, measured {result['bench']['measured_ms']:.4f} ms, "
          f"predicted {result['bench'].get('predicted_ms', float('nan')):.4f} ms; see {args.out}/report.md")
    print(f"{PROJECT_FILE} records this run: `hwaware profile --device NAME` and `hwaware search --latency-ms X` "
          "here need no other flag")


def register(sub) -> None:
    pipe = sub.add_parser("pipeline", help="the main job on digits: train, profile, search, export, bench, report")
    pipe.add_argument("--out", default="runs/pipeline", help="folder for every stage (default runs/pipeline)")
    pipe.add_argument("--latency-ms", dest="latency_ms", type=bounded(float, 1e-6),
                      help="latency budget (default: half-way between the cheapest and the largest subnet)")
    pipe.add_argument("--quiet", action="store_true", help="no progress bars")
    pipe.set_defaults(func=cmd_pipeline)
