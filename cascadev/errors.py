"""Errors shared by every command: the bottom of the package, importing nothing of it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input; printed as one line, without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line pointing at ``--help`` (argparse prints the whole usage
    first, 16 lines for ``decode``, which hides the error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, ``kill``, torchrun stopping the other processes of a launch), raised in the
    main thread as Ctrl-C is, so that ``finally`` blocks run: a half-written file's temp file is removed."""


_GUARDED_PID: list[int] = []        # the process whose SIGTERM raises Terminated (not a forked DataLoader worker)


def _terminate(signum, frame):
    if os.getpid() in _GUARDED_PID:
        raise Terminated()
    signal.signal(signum, signal.SIG_DFL)    # a forked child: terminate as it would have
    os.kill(os.getpid(), signum)


def run_guarded(prog: str, fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command's body: bad input (``UserError``, ``ValueError``, ``OSError``: missing files, a full disk, no
    permission) is one line and exit code 2, Ctrl-C exit 130, SIGTERM exit 143 (its files cleaned up as on
    Ctrl-C), and any other exception one line naming it and exit 1, with its traceback only under ``debug``."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _terminate)
        _GUARDED_PID.append(os.getpid())
    try:
        return fn()
    except BaseException as e:
        close_progress_bars()
        if isinstance(e, (UserError, OSError, ValueError)):
            if not _other_local_process():
                # one line whatever the message: several lines (a library's) joined, none at all named by its type
                message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
                print(f"{prog}: error: {message or type(e).__name__}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, Terminated):
            if not _other_local_process():
                print(f"{prog}: terminated", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        if debug or not isinstance(e, Exception):       # SystemExit and the like pass through
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"{prog}: internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    finally:
        if in_main_thread:
            _GUARDED_PID.pop()
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _other_local_process() -> bool:
    """Whether this is a process of a launch (torchrun, accelerate launch) other than the first on its machine: every
    process there gets the same command line and files, so its input error is the first one's, said once by that."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


def first_line(e: BaseException, typed: bool = True, limit: int = 120) -> str:
    """``TYPE: the first line of its message`` (``typed=False``: the line alone; at most ``limit`` characters), for an
    error of any message: an empty one gives the type's name."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0][:limit]}" if typed else lines[0][:limit]


def close_progress_bars() -> None:
    """Close the tqdm bars an exception left open, so its message starts a line of its own and no bar is drawn
    over it later (when the bar is garbage-collected)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
