"""Scores of a checkpoint's subnets, kept beside the checkpoint and shared by every search of it.

A subnet's val top-1 depends on the weights and the images scored, never on the target it is
priced for, so a search for a new device next week pays only for the subnets nobody scored yet.
The cache is keyed by the checkpoint's content (SHA-256) and the scorer's fingerprint (which
images, how chosen): another checkpoint, image set or dataset gets another file, never these
scores.

One file per key, `<checkpoint>.scores/<key>.jsonl`: a header line saying what it holds, then
one line per scored subnet, only ever appended under an exclusive `flock`, so two searches on
one checkpoint at once lose nothing and never tear a line; a line cut by a kill is skipped on
reading, as is any line that does not validate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hwaware.errors import HwawareError
from hwaware.io import file_sha256
from hwaware.space import Arch, SearchSpace

FORMAT = "hwaware-accuracy-cache/1"


def cache_folder(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{checkpoint.name}.scores"


class AccuracyCache:
    """The scores of `checkpoint`'s subnets on the image set `fingerprint` describes."""

    def __init__(self, checkpoint: str | Path, fingerprint: Mapping[str, Any], space: SearchSpace,
                 folder: str | Path | None = None):
        self.space = space
        self.header = {"format": FORMAT, "checkpoint_sha256": file_sha256(checkpoint),
                       "scorer": json.loads(json.dumps(dict(fingerprint), sort_keys=True))}
        key = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()
        self.path = Path(folder or cache_folder(checkpoint)) / f"{key}.jsonl"

    def load(self) -> dict[Arch, float]:
        """Every score recorded so far (a missing file is an empty cache)."""
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                data = f.read()
        except FileNotFoundError:
            return {}
        lines = data.split(b"\n")
        if lines[-1]:  # no newline at the end: a write cut short by a kill
            lines = lines[:-1]
        lines = [line for line in lines if line]
        if not lines:
            return {}
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if header != self.header:
            raise HwawareError(f"accuracy cache: {self.path} does not hold what its name says (edited or "
                               "copied over?); delete it and the scores are computed again")
        scores, skipped = {}, 0
        for line in lines[1:]:
            try:
                item = json.loads(line)
                arch = self.space.validate(Arch.from_dict(item["arch"], source=str(self.path)))
                top1 = item["top1"]
                if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 <= top1 <= 1:
                    raise ValueError(top1)
            except (ValueError, KeyError, TypeError, HwawareError):
                skipped += 1
                continue
            scores[arch] = float(top1)
        if skipped:
            print(f"hwaware: accuracy cache {self.path}: skipped {skipped} unreadable line(s)", file=sys.stderr)
        return scores

    def add(self, arch: Arch, top1: float) -> None:
        """Append one score (with the header first if the file is new), whole, under the lock."""
        if not math.isfinite(top1) or not 0 <= top1 <= 1:
            raise HwawareError(f"accuracy cache: top-1 {top1!r} of {arch.short()} is not in 0..1")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = (json.dumps({"arch": arch.to_dict(), "top1": top1}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size == 0:
                record = (json.dumps(self.header, sort_keys=True) + "\n").encode() + record
            os.write(fd, record)
        finally:
            os.close(fd)  # closing releases the lock


class CachedScorer:
    """A scorer that answers from `cache` where it can and records what it computes.

    `known` is read once, when the search starts (under torchrun rank 0 reads it and sends it to the
    others, so every rank asks its scorer for the same subnets); only `writer` appends."""

    def __init__(self, scorer: Callable[[Arch], float], cache: AccuracyCache, writer: bool = True,
                 known: Mapping[Arch, float] | None = None):
        self.scorer, self.cache, self.writer = scorer, cache, writer
        self.known = dict(cache.load() if known is None else known)
        self.hits = self.misses = 0

    fingerprint = property(lambda self: self.scorer.fingerprint)

    def describe(self) -> str:
        return self.scorer.describe()

    def __call__(self, arch: Arch) -> float:
        if arch in self.known:
            self.hits += 1
            return self.known[arch]
        top1 = float(self.scorer(arch))
        self.misses += 1
        self.known[arch] = top1
        if self.writer and math.isfinite(top1):
            self.cache.add(arch, top1)
        return top1
