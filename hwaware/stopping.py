"""Preemption: SIGTERM (Slurm, Kubernetes, `docker stop`) ends a command the way Ctrl-C does.

Outside a `deferred_stop()` block a stop signal raises `Stopped` at once, so the command unwinds
through its `finally` clauses (temporary files removed, locks released) and exits with one line
and status 128 + the signal's number. Inside one, as training's loop is, the first signal only
sets a flag that the loop polls with `stop_requested()` at its step boundary, where it writes a
checkpoint and stops; a second signal, or `HWAWARE_STOP_GRACE` seconds (default 30) without
reaching a safe point, stops at once. Installing a handler also makes SIGTERM work when hwaware
runs as PID 1 in a container, where the kernel drops signals that have no handler.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from hwaware.errors import HwawareError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE_SECONDS = 30.0
MAX_GRACE_SECONDS = 24 * 3600.0


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; `saved` says what a safe-point stop kept ("" when it stopped at once)."""

    def __init__(self, signum: int, saved: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_deferring = False
_pending: int | None = None


def _on_stop_signal(signum: int, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        signal.setitimer(signal.ITIMER_REAL, grace_seconds())
        return
    raise Stopped(signum)


def _on_grace_expired(signum: int, frame) -> None:
    raise Stopped(_pending or signal.SIGTERM)


def grace_seconds() -> float:
    """Seconds a deferred stop may take to reach its safe point (HWAWARE_STOP_GRACE, default 30)."""
    text = os.environ.get("HWAWARE_STOP_GRACE", "")
    if not text:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_GRACE_SECONDS:  # nan fails this too
        raise HwawareError(f"HWAWARE_STOP_GRACE: expected seconds in (0, {MAX_GRACE_SECONDS:g}], got {text[:20]!r}")
    return value


@contextlib.contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Stopped` for the duration (the CLI wraps every command in it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    grace_seconds()  # a malformed setting is refused before the command starts, not when a signal comes
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Within the block the first stop signal only sets `stop_requested()`; the block's code polls it at
    safe points. Without the CLI's handlers installed (a notebook) this changes nothing."""
    global _deferring, _pending
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not _on_stop_signal:
        yield
        return
    previous_alarm = signal.signal(signal.SIGALRM, _on_grace_expired)
    _deferring, _pending = True, None
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        _deferring, _pending = False, None


def stop_requested() -> bool:
    """Whether a stop signal is waiting for this safe point. Under torch.distributed every rank must call
    it at the same point: the ranks agree (any rank signalled stops all), so none is left in a collective."""
    local = _pending is not None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop_here(saved: str) -> None:
    """Leave at a safe point after `saved` was written: every rank waits for the writer, then raises `Stopped`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    raise Stopped(_pending or signal.SIGTERM, saved)


def ignore_stop_signals_in_worker(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: a scheduler that signals every process of a job must not kill the
    workers under a training that is still writing its checkpoint; the loader shuts them down itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_workers_killed_at_exit = False


def kill_workers_at_exit() -> None:
    """Make the interpreter's exit SIGKILL daemonic children still alive. multiprocessing ends them with
    SIGTERM and then waits for them; workers that ignore SIGTERM (above) would make that wait endless
    when a loader outlives its command, as one does when its worker raised (the error keeps it alive)."""
    global _workers_killed_at_exit
    if _workers_killed_at_exit:
        return
    import multiprocessing.util  # noqa: F401  registers multiprocessing's exit function before ours, so ours runs first

    atexit.register(_kill_daemonic_children)
    _workers_killed_at_exit = True


def _kill_daemonic_children() -> None:
    import multiprocessing

    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker failure
    for child in children:
        child.kill()
