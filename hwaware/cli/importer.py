"""`hwaware import autoformer`: an official AutoFormer checkpoint becomes a hwaware supernet checkpoint."""

from __future__ import annotations

import argparse


def cmd_import_autoformer(args: argparse.Namespace) -> None:
    from hwaware.space import get_space

    space = get_space(args.space)
    from hwaware.autoformer import ARCH_FILE, import_autoformer
    from hwaware.checkpoint import CHECKPOINT_FILE

    source = import_autoformer(args.checkpoint, space, args.out, config=args.config)
    flags = ", ".join(f"{k}={v}" for k, v in source["flags"].items())
    print(f"imported {source['file']} (epoch {source['epoch']}) as space {space.name}: {flags} "
          f"(from the checkpoint's {source['settings_from']})")
    print(f"wrote {args.out}/{CHECKPOINT_FILE}")
    from pathlib import Path

    from hwaware.project import PROJECT_FILE, remember_after_success

    if remember_after_success("import", space=args.space, checkpoint=Path(args.out) / CHECKPOINT_FILE):
        print(f"{PROJECT_FILE} records space {args.space} and this checkpoint for search and export")
    if source["retrained_arch"] is not None:
        print(f"wrote {args.out}/{ARCH_FILE} (the retrained subnet; evaluate uses it by default)")


def register(sub) -> None:
    imp = sub.add_parser("import", help="import another tool's checkpoint as a hwaware supernet")
    imp_sub = imp.add_subparsers(dest="import_source", required=True, metavar="SOURCE")
    autoformer = imp_sub.add_parser(
        "autoformer", help="an official AutoFormer checkpoint (microsoft/Cream supernet_train.py)",
        description="Reads an official AutoFormer supernet (or retrained-subnet) checkpoint and writes "
                    "DIR/last.pt for hwaware evaluate / search / export --checkpoint.")
    autoformer.add_argument("checkpoint", help="the .pth file supernet_train.py saved (or a released one)")
    autoformer.add_argument("--space", required=True,
                            help="built-in space (autoformer-t/-s/-b) or a space YAML the checkpoint was trained for")
    autoformer.add_argument("--out", required=True, help="new folder for last.pt (must not exist)")
    autoformer.add_argument("--config", help="AutoFormer YAML of a retrained subnet (experiments/subnet/*.yaml): "
                                             "its RETRAIN block becomes the checkpoint's subnet")
    autoformer.set_defaults(func=cmd_import_autoformer)
