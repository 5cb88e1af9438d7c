"""Progress of long jobs that reads well in a terminal and in a log file.

On a terminal, a tqdm bar. Anywhere else (CI, a cluster job, `> log`), redrawn bars fill the log
with carriage-return frames, so `progress` writes one plain line every `every` units (default:
each tenth of the total) or after `quiet_s` seconds without a line, and one when it closes:

    epoch 3/500: 50% 2502/5004 step  loss=3.210 lr=1.00e-03  12:04 elapsed, ~12:03 left
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["progress", "write", "LineProgress"]


def _is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineProgress:
    """The tqdm calls hwaware uses (update, set_postfix, set_postfix_str, close, iteration, `with`), as plain lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", file: TextIO | None = None, every: int | None = None, quiet_s: float = 300.0,
                 disable: bool = False):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.file, self.disable, self.quiet_s = file, disable, quiet_s
        self.every = every or (max(1, math.ceil(total / 10)) if total else 1)
        self.postfix = ""
        self._started = self._last_line = time.monotonic()
        self._initial, self._shown, self._closed = initial, initial, False
        self._next_line = (initial // self.every + 1) * self.every

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self._next_line or now - self._last_line >= self.quiet_s:
            self._line(now)
            while self._next_line <= self.n:
                self._next_line += self.every

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._shown:  # the end, unless the last line already said it
                self._line(time.monotonic())

    def refresh(self) -> None:
        pass

    def _line(self, now: float) -> None:
        self._last_line, self._shown = now, self.n
        if self.disable:
            return
        elapsed = now - self._started
        if self.total:
            done = f"{100 * self.n / self.total:.0f}% {self.n}/{self.total} {self.unit}"
            rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
            left = f", ~{_clock((self.total - self.n) / rate)} left" if rate > 0 and self.n < self.total else ""
        else:
            done, left = f"{self.n} {self.unit}", ""
        postfix = f"  {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        print(f"{head}{done}{postfix}  {_clock(elapsed)} elapsed{left}", file=self.file or sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
             unit: str = "it", file: TextIO | None = None, disable: bool | None = False, every: int | None = None,
             **tqdm_options: Any):
    """A tqdm bar on a terminal, a `LineProgress` elsewhere; `disable=True` shows nothing (None: as False).

    `every`: units between lines off a terminal (default a tenth of `total`); tqdm display options
    (`dynamic_ncols`, `leave`, ...) pass through to the bar and mean nothing to the lines.
    """
    stream = file or sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=stream, disable=bool(disable),
                    **tqdm_options)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, file=stream, every=every,
                        disable=bool(disable))


def write(message: str, file: TextIO | None = None) -> None:
    """A message line that does not tear a bar drawn on the same terminal."""
    stream = file or sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)
