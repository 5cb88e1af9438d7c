"""Supernet checkpoints: atomic writes, `weights_only` reads, RNG states, and the run folder's identity.

A checkpoint is a plain dict of tensors and Python primitives so `torch.load(weights_only=True)`
reads it; numpy's RNG state is stored as a tensor for the same reason.
"""

from __future__ import annotations

import errno
import json
import pickle
import platform
import random
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwaware.errors import HwawareError
from hwaware.io import LOCK_FILE, atomic_path, atomic_write_text, file_sha256, loads_strict, lock_holder, read_text_file

FORMAT = "hwaware-supernet-v1"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "last.pt"


def versions() -> dict[str, str]:
    import timm

    import hwaware

    return {"hwaware": str(hwaware.__version__), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "python": platform.python_version()}


class _KeepsWriteErrors:
    """A file for torch.save that remembers what interrupted a write: torch replaces any exception from
    it with an 'unexpected pos' RuntimeError, which says nothing of a full disk or of a stop signal."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except BaseException as exc:  # OSError (ENOSPC), or hwaware.stopping.Stopped
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` under a temporary name, then rename: a kill or a full disk leaves the previous
    checkpoint whole, and a failed write is one line naming the file and why."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            target = _KeepsWriteErrors(f)
            try:
                torch.save({"format": FORMAT, **state}, target)
                f.flush()
            except RuntimeError as exc:
                raise (target.error or exc) from None
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
        raise HwawareError(f"checkpoint: {reason} writing {path}; the previous checkpoint there (if any) is intact") from None


def check_archive_size(path: Path, largest_tensor_bytes: int, total_bytes: int) -> None:
    """Refuse a torch archive whose entries declare more data than a checkpoint of the expected model can
    hold, before anything is decompressed: a few MB deflated must not expand to gigabytes in memory."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise HwawareError(f"checkpoint: {path} is truncated, corrupted or not a torch checkpoint ({exc})") from None
    biggest = max(entries, key=lambda e: e.file_size, default=None)
    declared = sum(e.file_size for e in entries)
    if biggest is not None and biggest.file_size > largest_tensor_bytes:
        raise HwawareError(f"checkpoint: {path}: {biggest.filename} declares {biggest.file_size / 2**20:.1f} MiB, more "
                           f"than the largest tensor of this space ({largest_tensor_bytes / 2**20:.1f} MiB); refusing to read it")
    if declared > total_bytes:
        raise HwawareError(f"checkpoint: {path} declares {declared / 2**20:.1f} MiB of data, more than a checkpoint of "
                           f"this space holds ({total_bytes / 2**20:.1f} MiB); refusing to read it")


def load_torch_file(path: str | Path, admit: tuple[type, ...] = (), refused: str = "weights_only loading refuses",
                    size_limits: tuple[int, int] | None = None) -> Any:
    """`torch.load(weights_only=True)` with `admit`ted classes and nothing else; a missing, truncated or
    foreign file is one HwawareError line (`refused` names what the pickled objects are not).
    `size_limits` (largest entry, total, in bytes) are checked against the archive before reading it."""
    path = Path(path)
    if not path.is_file():
        raise HwawareError(f"checkpoint: {path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is cut short or foreign
        raise HwawareError(f"checkpoint: {path} is truncated, corrupted or not a torch checkpoint (not a zip archive)")
    if size_limits is not None:
        check_archive_size(path, *size_limits)
    try:
        with torch.serialization.safe_globals(list(admit)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise HwawareError(f"checkpoint: {path} holds pickled objects {refused}{what}; refusing to load it") from None
        raise HwawareError(f"checkpoint: {path} is truncated, corrupted or not a torch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, TypeError, OverflowError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HwawareError(f"checkpoint: {path} is truncated, corrupted or not a torch checkpoint ({reason[:160]})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """An hwaware checkpoint, loaded with `weights_only=True`; anything unreadable or foreign is one line."""
    state = load_torch_file(path, refused="that weights_only loading refuses: it is not an hwaware checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise HwawareError(f"checkpoint: {path} is not an hwaware supernet checkpoint (no {FORMAT!r} format tag)")
    return state


# ---- RNG states ---------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the run folder -----------------------------------------------------------------------------


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"


def claim_run_dir(out: str | Path, identity: dict[str, Any], write: bool = True) -> None:
    """Make `out` this run's folder, or refuse (touching nothing) if it holds another run or other files.

    `identity` is what makes two runs the same run (space, data, recipe, seed); rerunning with the
    same identity resumes, anything else needs a new folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HwawareError(f"out: {out} exists and is not a folder")
    identity = json.loads(json.dumps(identity))
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = loads_strict(read_text_file(run_file, "run"))
        except (HwawareError, ValueError) as exc:
            raise HwawareError(f"out: {run_file} is unreadable ({exc}); choose another --out") from None
        difference = first_difference(previous, identity)
        if difference:
            raise HwawareError(f"out: {out} holds another run ({difference}); choose another --out or run the same command")
        return
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise HwawareError(f"out: {out} is not empty and holds no hwaware run ({RUN_FILE} missing); choose a new folder")
    if write:
        atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: a diverged run must not be
    searched, scored or shipped as if it were a model."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise HwawareError(f"checkpoint: {source}: {name} holds non-finite values (NaN or inf); "
                               "the run diverged: retrain with a lower --lr or with --clip-grad")


def file_identity(path: str | Path) -> tuple[int, int, int]:
    """(device, inode, mtime) of a file: an atomic replace (a training writing its next checkpoint) changes it."""
    info = Path(path).stat()
    return info.st_dev, info.st_ino, info.st_mtime_ns


def checkpoint_state(path: str | Path, meta: dict[str, Any], read_from: tuple[int, int, int]) -> dict[str, Any]:
    """Which state of a run a checkpoint read as `meta` is (epoch, step, complete, sha256), for an export's
    card. `read_from` is `file_identity` taken before reading it: a file replaced meanwhile is refused, so
    the hash is of the weights read. A run still training there, or unfinished, is a warning on stderr."""
    path = Path(path)
    digest = file_sha256(path)
    if file_identity(path) != read_from:
        raise HwawareError(f"checkpoint: {path} was replaced while it was read (a training is writing it); run again")
    state = {"epoch": meta.get("epoch"), "step": meta.get("step"), "complete": bool(meta.get("complete")),
             "weights": meta.get("weights"), "sha256": digest}
    holder = lock_holder(path.parent)
    if holder is not None:
        who = f"hwaware {holder.get('command', '?')}, pid {holder.get('pid', '?')}"
        print(f"hwaware: warning: {path} belongs to a run still training ({who}): this is its state at epoch "
              f"{state['epoch']}, step {state['step']}, not the finished model", file=sys.stderr)
    elif not state["complete"]:
        print(f"hwaware: warning: {path} is an unfinished run (epoch {state['epoch']}, step {state['step']}); "
              "its training did not complete", file=sys.stderr)
    return state
