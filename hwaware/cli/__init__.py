"""The `hwaware` command: parse, call the library, print. Errors become one line on stderr, exit 2.

One module per command group (`space`, `train`, `profile`, ...), each with a `register(subparsers)`
that adds its commands, their flags beside their handlers. A command module found in this package
is registered; `COMMAND_ORDER` only fixes the order `hwaware --help` lists them in.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import signal
import sys
import traceback
import warnings

from hwaware.errors import HwawareError

COMMAND_ORDER = ("space", "train", "importer", "profile", "search", "export", "pipeline", "init")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other hwaware error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [m for m in COMMAND_ORDER if m in found] + sorted(found - set(COMMAND_ORDER))


def build_parser() -> argparse.ArgumentParser:
    from hwaware import __version__

    parser = Parser(prog="hwaware", description="Hardware-aware search and deployment of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"hwaware {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also HWAWARE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in command_modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr: exit 2 for bad input and failed I/O,
    1 for an unexpected error (its traceback with --debug or HWAWARE_DEBUG=1), 130 for Ctrl-C and 143
    for SIGTERM (128 + the signal: a scheduler's preemption; the rerun resumes)."""
    from hwaware.stopping import Stopped, stop_signals_handled

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    prefix = f"hwaware {args.command}"
    try:
        with stop_signals_handled():
            args.func(args)
            sys.stdout.flush()
    except HwawareError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        what = "interrupted" if exc.signum == signal.SIGINT else f"stopped by {signal.Signals(exc.signum).name}"
        saved = f" after writing {exc.saved}" if exc.saved else ""
        print(f"{prefix}: {what}{saved}; run the same command again to resume", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside the handled block (a notebook's own handler)
        print(f"{prefix}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hwaware ... | head`: the reader left; nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        if _out_of_memory(exc):
            return _say_out_of_memory(prefix, exc)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prefix}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # the last line of defence: one line, never a traceback unless asked
        if _out_of_memory(exc):
            return _say_out_of_memory(prefix, exc)
        if args.debug or os.environ.get("HWAWARE_DEBUG"):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"{prefix}: unexpected error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


_OUT_OF_MEMORY = ("cannot allocate memory", "failed to map segment", "bad_alloc", "can't allocate memory",
                  "out of memory", "not enough memory")


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or what a library says instead: a shared object that cannot be mapped under
    `ulimit -v` (ImportError), std::bad_alloc or torch's allocator failing (RuntimeError)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, MemoryError) or (isinstance(exc, (ImportError, RuntimeError, OSError))
                                            and any(s in str(exc).lower() for s in _OUT_OF_MEMORY))


def _say_out_of_memory(prefix: str, exc: BaseException) -> int:
    detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    print(f"{prefix}: out of memory ({type(exc).__name__}{': ' + detail if detail else ''}); free memory, raise the "
          "limit (ulimit -v, the container's) or use a smaller batch", file=sys.stderr)
    return 1


def fill_from_project(args: argparse.Namespace, command: str, flags: dict[str, str],
                      required: tuple[str, ...] = ()) -> set[str]:
    """Give each flag in `flags` (argparse dest -> project key) that was left out the project file's value,
    say on stderr what was taken, and refuse in one line when a `required` one is still missing.
    Returns the dests that were filled."""
    from hwaware.project import PROJECT_FILE, load_project

    project = load_project()
    used, filled = [], set()
    for dest, key in flags.items():
        if getattr(args, dest) is None and project is not None and project.get(key) is not None:
            setattr(args, dest, project.get(key))
            filled.add(dest)
            used.append(f"{dest.replace('_', '-')} {getattr(args, dest)}")
    if used:
        print(f"hwaware {command}: from {PROJECT_FILE}: {', '.join(used)}", file=sys.stderr)
    for dest in required:
        if getattr(args, dest) is None:
            flag = "--" + dest.replace("_", "-")
            where = f"{PROJECT_FILE} has no {flags[dest]}" if project else f"there is no {PROJECT_FILE} here"
            raise HwawareError(f"{flag} is required ({where}; `hwaware pipeline`, `hwaware train` or "
                               f"`hwaware init {'--' + flags[dest]} ...` records one)")
    return filled


def bounded(kind: type = int, low: float | None = None, high: float | None = None):
    """An argparse `type` accepting finite numbers of `kind` in low..high: nan, inf, 1e8 subnets or a batch
    of 0 are refused while parsing, before anything is read or written."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text[:20]!r}") from None
        import math

        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text[:20]!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
