"""`hwaware init`: record (or show) the project file that later commands fill their flags from."""

from __future__ import annotations

import argparse

from hwaware.errors import HwawareError

FIELDS = ("space", "checkpoint", "tables", "device", "outputs")


def cmd_init(args: argparse.Namespace) -> None:
    from hwaware.project import load_project, remember

    values = {k: getattr(args, k) for k in FIELDS}
    if args.space is not None:
        from hwaware.space import get_space

        get_space(args.space)  # an unknown space is refused before anything is written
    if args.device is not None:
        from hwaware.latency.devices import load_device_profile

        load_device_profile(args.device)
    project = remember(**values) if any(v is not None for v in values.values()) else load_project()
    if project is None:
        raise HwawareError("init: no hwaware.yaml here; give at least one of --space, --checkpoint, --tables, "
                           "--device, --outputs")
    print(f"{project.path}:")
    for key, value in project.to_dict().items():
        print(f"  {key}: {value}")


def register(sub) -> None:
    init = sub.add_parser("init", help="record the space, checkpoint, tables and device later commands default to")
    init.add_argument("--space", help="built-in space name or YAML file")
    init.add_argument("--checkpoint", help="the supernet checkpoint search and export use")
    init.add_argument("--tables", help="the folder of latency tables")
    init.add_argument("--device", help="the device profile search, export and bench price latency for")
    init.add_argument("--outputs", help="where search results go by default")
    init.set_defaults(func=cmd_init)
