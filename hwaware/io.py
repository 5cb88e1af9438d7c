"""Files in and out: atomic writes (a reader sees the old file or the new one, never half of either)
with the user's permissions, bounded reads that refuse FIFOs and devices, and a lock per output folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
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
    tmp = None
    try:  # a signal landing anywhere in here still removes the temporary (SIGKILL: the next lock holder does)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # the writer replaced it by a link: refused
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HwawareError(f"{path}: its temporary {tmp.name} was replaced by a non-regular file")
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a symlink at `path` itself, never the file it points to
    finally:
        if tmp is not None:
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


MAX_YAML_DEPTH = 64  # spaces, recipes, profiles and project files nest three or four levels


def read_yaml(path: str | Path, what: str = "yaml", max_bytes: int = 1 << 20) -> Any:
    """A small YAML file, safely loaded: besides `read_text_file`'s refusals, malformed YAML, nesting deeper
    than MAX_YAML_DEPTH (Python's recursion limit otherwise) and integers past Python's 4300-digit limit
    are one HwawareError line naming the file."""
    import yaml

    path = Path(path)
    text = read_text_file(path, what, max_bytes=max_bytes)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise HwawareError(f"{what}: {path}: malformed YAML{where}") from None
    except RecursionError:
        raise HwawareError(f"{what}: {path}: nested too deeply to be a settings file") from None
    except ValueError as exc:  # int('9' * 5000): "Exceeds the limit (4300 digits) ..."
        raise HwawareError(f"{what}: {path}: {str(exc).split(';')[0][:100]}") from None
    if _depth(data) > MAX_YAML_DEPTH:
        raise HwawareError(f"{what}: {path}: nested deeper than {MAX_YAML_DEPTH} levels")
    return data


def _depth(data: Any) -> int:
    """Nesting depth of loaded YAML, visiting each shared (aliased) node once, without recursion."""
    deepest, seen, stack = 0, set(), [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        seen.add(id(node))
        deepest = max(deepest, depth)
        if deepest > MAX_YAML_DEPTH:
            break
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)
    return deepest


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


def utc_timestamp() -> str:
    """Now, as every record hwaware writes dates itself: ISO 8601 in UTC to the second."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


# ---- files appended to in place -----------------------------------------------------------------


def open_regular(path: str | Path, mode: str = "a"):
    """Open a file to append to or rewrite in place ("a", "r+b", ...) without following a symlink: a
    `.partial` log replaced by a link to a file elsewhere must not truncate or extend that file."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    flags |= os.O_CREAT | os.O_APPEND if mode.startswith("a") else 0
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise HwawareError(f"{path} is a symlink or not a regular file; refusing to write through it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HwawareError(f"{path} is not a regular file; refusing to write to it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


# ---- one process per output folder ------------------------------------------------------------

LOCK_FILE = ".hwaware.lock"
ODD_LOCK_SECONDS = 60.0  # a lock that is not a readable record (a folder, a FIFO, garbage) is taken over this old
MAX_LOCK_BYTES = 4096
MAX_PID = 1 << 22  # Linux's ceiling for pid_max
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # what `atomic_path` names its temporaries


def _read_small(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode(errors="replace").strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc cannot say): with the boot id it
    tells a pid from the pid of another process that came later, as a restarted container's pid 1 is."""
    stat_line = _read_small(f"/proc/{pid}/stat")
    fields = stat_line[stat_line.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_identity() -> dict[str, Any]:
    """Who holds a lock: pid, host, kernel boot, PID namespace and start time (each "" where unknown)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _read_small("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace(), "started": _start_time(pid)}


def _valid_pid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PID


def holder_alive(record: dict[str, Any]) -> bool:
    """Whether the process a lock record names may still hold it (where `flock` cannot say). Another host,
    or another PID namespace (container) on this one, cannot be checked: they count as alive. A dead pid,
    a boot ago, this very process (a restarted container is pid 1 again) or a live pid that started at
    another time (an unrelated program) do not."""
    me = process_identity()
    pid = record.get("pid")
    if not _valid_pid(pid):
        return False
    if record.get("host") != me["host"]:
        return True
    if record.get("boot") and me["boot"] and record["boot"] != me["boot"]:
        return False  # this host rebooted since
    if record.get("pid_namespace") and record["pid_namespace"] != me["pid_namespace"]:
        return True
    if pid == me["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = record.get("started")
    if started and me["started"]:
        return _start_time(pid) == started
    command_line = _read_small(f"/proc/{pid}/cmdline")  # a record without a start time (older hwaware)
    return not command_line or "hwaware" in command_line


def _record(fd: int) -> dict[str, Any] | None:
    """The JSON record in an open lock file: {} when empty, None when it is not an hwaware record."""
    data = os.pread(fd, MAX_LOCK_BYTES + 1, 0)
    if not data.strip():
        return {}
    try:
        record = loads_strict(data.decode()) if len(data) <= MAX_LOCK_BYTES else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and _valid_pid(record.get("pid")) else None


def _still_named(fd: int, lock: Path) -> bool:
    """Whether `lock` still names the file open as `fd` (a releasing holder unlinks it)."""
    try:
        named = os.lstat(lock)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _warn(message: str) -> None:
    print(f"hwaware: warning: {message}", file=sys.stderr)


def _clear_odd_lock(lock: Path) -> None:
    """Remove a lock path that is no lock file (a folder, a symlink, a FIFO, one we may not read) once it is
    ODD_LOCK_SECONDS old, with a warning; younger, or a folder holding files, it is refused."""
    try:
        info = os.lstat(lock)
    except FileNotFoundError:
        return
    kind = ("folder" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode)
            else "unreadable file" if stat.S_ISREG(info.st_mode) else "special file (FIFO, socket or device)")
    age = time.time() - info.st_mtime
    if age < ODD_LOCK_SECONDS:
        raise HwawareError(f"out: {lock} is a {kind}, not an hwaware lock; remove it (or wait: it is taken "
                           f"over when {ODD_LOCK_SECONDS:.0f} s old)")
    try:
        os.rmdir(lock) if stat.S_ISDIR(info.st_mode) else os.unlink(lock)
    except OSError as exc:
        raise HwawareError(f"out: {lock} is a {kind}, not an hwaware lock, and cannot be removed ({exc.strerror})") from None
    _warn(f"{lock} was a {kind} ({age:.0f} s old), not an hwaware lock: took it over")


def _open_lock(lock: Path) -> int:
    """An fd of the regular lock file (created if missing); anything else at that path is cleared first."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM, errno.EOPNOTSUPP):
                raise
            if not os.path.lexists(lock):  # nothing there: the folder itself is not writable
                raise
            _clear_odd_lock(lock)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)  # a FIFO or device opened without blocking
        _clear_odd_lock(lock)
    raise HwawareError(f"out: could not take the lock {lock}")


def _flock(fd: int) -> bool | None:
    """True: this process holds `fd`'s lock; False: another one does; None: the filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _in_use(folder: Path, record: dict[str, Any] | None) -> HwawareError:
    if not record:
        return HwawareError(f"out: {folder} is being claimed by another hwaware process; try again")
    return HwawareError(f"out: {folder} is in use by hwaware {str(record.get('command', '?'))[:40]} (pid "
                        f"{record['pid']} on {str(record.get('host'))[:60]}); wait for it to finish or stop it")


def _take_without_flock(fd: int, lock: Path, folder: Path, me: dict[str, Any]) -> None:
    """Where the filesystem has no locks: judge the record, then move a record of ours over it by rename,
    after re-reading that the lock is still the one judged stale."""
    record = _record(fd)
    if record is None:
        if time.time() - os.fstat(fd).st_mtime < ODD_LOCK_SECONDS:
            raise _in_use(folder, {})
        _warn(f"{lock} held no hwaware lock record: took it over")
    elif record and holder_alive(record):
        raise _in_use(folder, record)
    with atomic_path(lock) as tmp:
        tmp.write_text(json.dumps(me))
        if _record(fd) != record or not _still_named(fd, lock):
            raise _in_use(folder, _record(fd))
    if _read_record_at(lock) != me:
        raise _in_use(folder, _read_record_at(lock))


def _read_record_at(lock: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _record(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what `atomic_path` left in `folder` when a process was killed (SIGKILL) mid-write: only the
    holder of the folder's lock writes there, so a temporary it did not make is an orphan. The project
    file's temporaries are left alone (it has a lock of its own)."""
    for entry in os.scandir(folder):
        found = _TEMPORARY.match(entry.name)
        if found and found.group("name") != "hwaware.yaml" and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def lock_holder(folder: str | Path, name: str = LOCK_FILE) -> dict[str, Any] | None:
    """The record of a process holding `folder`'s lock now ({} when it has not written one yet), or None:
    a reader's way to learn that a writer is at work (an export from a training that is still running)."""
    try:
        fd = os.open(Path(folder) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record(fd) or {}
        except OSError:  # no locks on this filesystem: the record is all there is
            record = _record(fd)
            return record if record and holder_alive(record) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str, name: str = LOCK_FILE, wait: float = 0.0) -> Iterator[Path]:
    """Hold `folder/name` while `command` writes there: a second hwaware process gets one line naming
    the first (or waits up to `wait` seconds for it). The lock is an `flock` on the file, which the kernel
    drops when its holder dies, so a dead holder's lock is simply taken; the file's JSON record (pid, host,
    boot, PID namespace, start time) is the part people read, and the judge where the filesystem has no
    locks. Taking it is also the check that `folder` is writable, before any long work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HwawareError(f"out: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    me = {**process_identity(), "command": command, "argv": sys.argv[1:4]}
    deadline = time.monotonic() + wait
    while True:
        fd = _open_lock(lock)
        try:
            held = _flock(fd)
            record = _record(fd)
            older_hwaware = held and record and "boot" not in record and holder_alive(record)  # it used no flock
            if held is False or older_hwaware:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.05)
                    continue
                raise _in_use(folder, record)
            if not _still_named(fd, lock):  # its holder released (unlinked) it meanwhile: start over
                os.close(fd)
                continue
            if held:
                if record is None:
                    _warn(f"{lock} held no hwaware lock record: took it over")
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            else:
                _take_without_flock(fd, lock, folder, me)
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        if name == LOCK_FILE:
            remove_stale_temporaries(folder)
        yield lock
    finally:
        try:
            if held and _still_named(fd, lock) or not held and _read_record_at(lock) == me:
                lock.unlink()
        except OSError:
            pass
        os.close(fd)
