"""The project file: what a folder's hwaware work is about, so later commands need no repeated flags.

`hwaware.yaml` in the working folder records the space, the supernet checkpoint, the latency
tables folder, the device and where outputs go. `hwaware pipeline`, `hwaware train`, `hwaware
import` and `hwaware init` write it; `profile`, `search`, `export` and `bench` fill in what a user
did not pass from it and say what they used. Explicit flags always win. Paths are stored relative
to the file's folder, so a copied or moved project keeps working.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hwaware.errors import HwawareError
from hwaware.io import atomic_write_text, folder_lock, read_yaml

PROJECT_FILE = "hwaware.yaml"
LOCK_NAME = f".{PROJECT_FILE}.lock"
LOCK_WAIT_SECONDS = 10.0  # another command updating it takes milliseconds
PATH_FIELDS = ("checkpoint", "tables", "outputs")
MAX_BYTES = 64 * 1024


@dataclass
class Project:
    """The settings a folder's commands share; None means 'not recorded'."""

    space: str | None = None
    checkpoint: str | None = None
    tables: str | None = None
    device: str | None = None
    outputs: str | None = None
    folder: Path = Path(".")

    @property
    def path(self) -> Path:
        return self.folder / PROJECT_FILE

    def get(self, key: str) -> str | None:
        """A recorded value; paths come back as seen from the current folder."""
        value = getattr(self, key)
        if value is None or key not in PATH_FIELDS:
            return value
        return os.path.relpath(self.folder / value) if not Path(value).is_absolute() else value

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "folder" and v is not None}


def load_project(folder: str | Path = ".") -> Project | None:
    """The project of `folder`, or None where there is no project file; a malformed one is one line."""
    folder = Path(folder)
    path = folder / PROJECT_FILE
    if not path.exists():
        return None
    data = read_yaml(path, "project", max_bytes=MAX_BYTES) or {}
    known = {f.name for f in fields(Project)} - {"folder"}
    if not isinstance(data, dict) or set(data) - known or not all(isinstance(v, str) for v in data.values()):
        raise HwawareError(f"project: {path} must map {', '.join(sorted(known))} to strings")
    return Project(**data, folder=folder)


def remember(folder: str | Path = ".", **values: str | Path | None) -> Project:
    """Record `values` in the project file of `folder` (created if missing), keeping what it held. The read,
    change and atomic write happen under a lock, so concurrent commands (three `hwaware init`) lose nothing."""
    folder = Path(folder)
    with folder_lock(folder, "project file", name=LOCK_NAME, wait=LOCK_WAIT_SECONDS):
        project = load_project(folder) or Project(folder=folder)
        for key, value in values.items():
            if value is None:
                continue
            if key not in PATH_FIELDS:
                setattr(project, key, str(value))
                continue
            path = Path(value)
            setattr(project, key, path.as_posix() if path.is_absolute() else os.path.relpath(path, folder))
        header = "# hwaware project: read by profile, search, export and bench for flags you leave out.\n"
        atomic_write_text(project.path, header + yaml.safe_dump(project.to_dict(), sort_keys=False))
    return project


def remember_after_success(command: str, **values: str | Path | None) -> Project | None:
    """`remember` for a command whose own work succeeded: a project file it cannot update (malformed, a
    read-only folder) is one warning line, and the command keeps its success."""
    try:
        return remember(**values)
    except (HwawareError, OSError) as exc:
        reason = exc if isinstance(exc, HwawareError) else f"{exc.strerror or exc} ({exc.filename})"
        print(f"hwaware {command}: warning: {PROJECT_FILE} not updated: {reason}", file=sys.stderr)
        return None
