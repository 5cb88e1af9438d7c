"""Files in and out: atomic writes (a reader sees the old file or the new one, never half of either)
with the user's permissions, bounded reads that refuse FIFOs and devices, and a lock per output folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import reprlib
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError

MAX_TEXT_BYTES = 16 << 20  # YAML, JSON and CSV inputs: far above any real one, far below a hang


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_user_file(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode the user's umask gives new ones, so a
    table, checkpoint or export can be read by another user (a Triton container) as usual."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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
        as_user_file(tmp)
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


_SHORT_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxtuple, _SHORT_REPR.maxdict = 2, 4, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 40


def excerpt(value: Any, limit: int = 60) -> str:
    """A repr of `value` of at most `limit` characters, built without expanding it: error messages quote
    user input, never all of it (a YAML alias bomb expands to gigabytes when printed whole)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text_file(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a regular file of at most `max_bytes`; a FIFO, device, folder or huge file is refused
    before reading (so `/dev/zero` or a pipe nobody writes to cannot hang or exhaust memory)."""
    try:
        return read_bytes_file(path, what, max_bytes).decode()
    except UnicodeDecodeError as exc:
        raise HwawareError(f"{what}: {path}: cannot read ({exc})") from None


def read_bytes_file(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, refused unread otherwise (see `read_text_file`)."""
    path = check_regular_file(path, what, max_bytes)
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise HwawareError(f"{what}: {path}: cannot read ({exc})") from None


def check_regular_file(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> Path:
    """`path` if it is a regular file of at most `max_bytes` (for files another library will read), else one line."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HwawareError(f"{what}: {path}: no such file") from None
    except OSError as exc:
        raise HwawareError(f"{what}: {path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise HwawareError(f"{what}: {path} is not a regular file")
    if info.st_size > max_bytes:
        raise HwawareError(f"{what}: {path} is {info.st_size / 2**20:.1f} MiB, over the {max_bytes >> 20} MiB limit")
    return path


def read_json(path: str | Path, if_missing: str) -> Any:
    """Parse a JSON file; a missing file raises `if_missing`, an unreadable one says so, both one line."""
    path = Path(path)
    if not path.exists():
        raise HwawareError(if_missing)
    try:
        return loads_strict(read_text_file(path, "json"))
    except (json.JSONDecodeError, ValueError) as exc:
        raise HwawareError(f"{path}: unreadable ({str(exc)[:120]})") from None


def loads_strict(text: str) -> Any:
    """JSON as other tools read it: NaN and Infinity are refused (ValueError), not turned into floats."""
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dumps_strict(data: Any, **kwargs: Any) -> str:
    """JSON that other tools can read: NaN and infinity are refused, not written."""
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError as exc:
        raise HwawareError(f"json: refusing to write a non-finite number ({exc})") from None


# ---- one process per output folder ------------------------------------------------------------

LOCK_FILE = ".hwaware.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold `folder/name` while `command` writes there: a second hwaware process gets one line naming
    the first's pid; a lock left by a dead process (same host) is taken over. Taking it is also the
    check that `folder` is writable, before any long work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HwawareError(f"out: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "argv": sys.argv[1:4]}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
                age = time.time() - lock.stat().st_mtime
            except (OSError, ValueError):
                holder, age = {}, 0.0
            pid = holder.get("pid") if isinstance(holder, dict) else None
            if not isinstance(pid, int) and age < 10:  # just created, its owner is still writing it: not ours
                raise HwawareError(f"out: {folder} is being claimed by another hwaware process; try again") from None
            if isinstance(pid, int) and (holder.get("host") != me["host"] or _alive(pid)):
                raise HwawareError(f"out: {folder} is in use by hwaware {holder.get('command', '?')} (pid {pid} on "
                                   f"{holder.get('host')}); wait for it to finish or stop it") from None
            lock.unlink(missing_ok=True)  # a dead process's lock (or one torn long ago): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise HwawareError(f"out: could not take the lock {lock}")
    try:
        yield lock
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass
