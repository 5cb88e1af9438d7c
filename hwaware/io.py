"""Atomic file writes (a reader sees the old file or the new one, never half of either) and JSON reads."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and move the result into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def read_json(path: str | Path, if_missing: str) -> Any:
    """Parse a JSON file; a missing file raises `if_missing`, an unreadable one says so, both one line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HwawareError(if_missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HwawareError(f"{path}: unreadable ({exc})") from None
