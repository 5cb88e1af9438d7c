"""Deployment targets: where a subnet will be served, i.e. one latency table (device, backend, precision, batch).

A target is named as the user writes it: `cpu` is the device profile's default table, `cpu:int8`
another precision, `cpu:b8` another batch, `t4:fp16:b64` both. A search of several targets prices
every Arch on each (`latency_ms[cpu:int8]`), while its accuracy, which no target changes, is
scored once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.precision import PRECISIONS

_BATCH = re.compile(r"b([1-9][0-9]{0,5})")


@dataclass(frozen=True)
class Target:
    """One latency table a search prices subnets on, under the name the user wrote for it."""

    name: str
    table: Any  # hwaware.latency.LatencyTable

    def describe(self) -> dict[str, Any]:
        """What fleet.json records of this target, so export can build the artifact its table timed."""
        t = self.table
        return {"name": self.name, "table": str(Path(t.path).resolve()), "device": t.device, "backend": t.backend,
                "precision": t.precision, "batch_size": t.batch_size, "quantize_mode": t.quantize_mode}


@dataclass(frozen=True)
class TargetSpec:
    """`DEVICE[:PRECISION][:bBATCH]` parsed; what it leaves out comes from the device profile."""

    device: str
    precision: str | None = None
    batch: int | None = None

    @classmethod
    def parse(cls, text: str, precision: str | None = None) -> TargetSpec:
        device, *parts = (p.strip() for p in text.strip().split(":"))
        if not device:
            raise HwawareError(f"target {text[:40]!r}: no device before the ':'")
        named_precision = batch = None
        for part in parts:
            if part in PRECISIONS and named_precision is None:
                named_precision = part
            elif _BATCH.fullmatch(part) and batch is None:
                batch = int(part[1:])
            else:
                raise HwawareError(f"target {text[:40]!r}: {part[:20]!r} is neither a precision "
                                   f"({', '.join(PRECISIONS)}) nor a batch (b1, b8, ...)")
        precision = named_precision or precision
        return cls(device, precision, batch)


def target_name(table) -> str:
    """`cpu`, `cpu:int8`, `cpu:b8`: the device, plus the precision and batch where they are not the profile's."""
    from hwaware.latency import load_device_profile

    profile = load_device_profile(table.device)
    name = table.device
    if table.precision != profile.precision:
        name += f":{table.precision}"
    if table.batch_size != profile.batch_sizes[0]:
        name += f":b{table.batch_size}"
    return name


def resolve_targets(space, devices: str | Sequence[str] | None = None, tables: Sequence[str | Path] = (),
                    tables_root: str | Path = "latency_tables", precision: str | None = None) -> list[Target]:
    """The targets named by `devices` ("cpu,t4:fp16" or a list; each found in `tables_root`) and by table files,
    each checked against `space`; two tables for one target are refused. `precision` applies to every device
    that does not name its own."""
    from hwaware.latency import LatencyTable, find_table, load_device_profile
    from hwaware.latency.recalibrate import warn_if_other_host

    if isinstance(devices, str):
        devices = devices.split(",")
    if devices is not None and any(not d.strip() for d in devices):
        raise HwawareError(f"target: an empty device name in {','.join(devices)[:60]!r}")
    found: list[tuple[Any, str]] = []  # (table, what named it)
    for text in devices or ():
        spec = TargetSpec.parse(text, precision)
        load_device_profile(spec.device)  # an unknown device: one line listing the known ones
        path = find_table(spec.device, space.name, precision=spec.precision, batch=spec.batch, root=tables_root)
        found.append((LatencyTable.load(path), text.strip()))
    for path in tables:
        found.append((LatencyTable.load(path), str(path)))
    targets: dict[str, Target] = {}
    for table, named_by in found:
        table.check_space(space)
        name = target_name(table)
        if name in targets:
            raise HwawareError(f"target {name}: priced by two tables, {targets[name].table.path} and {table.path} "
                               f"(named by {named_by[:60]}); give one")
        warn_if_other_host(table)
        targets[name] = Target(name, table)
    return list(targets.values())
