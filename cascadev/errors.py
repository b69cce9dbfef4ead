"""Errors shared by every command: the bottom of the package, importing nothing of it."""

from __future__ import annotations

import argparse
import sys
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


def run_guarded(prog: str, fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command's body: bad input (``UserError``, ``ValueError``, ``OSError``: missing files, a full disk, no
    permission) is one line and exit code 2, Ctrl-C exit 130, and any other exception one line naming it and
    exit 1, with its traceback only under ``debug``."""
    try:
        return fn()
    except BaseException as e:
        close_progress_bars()
        if isinstance(e, (UserError, OSError, ValueError)):
            # one line whatever the message: several lines (a library's) joined, none at all named by its type
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"{prog}: error: {message or type(e).__name__}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        if debug or not isinstance(e, Exception):       # SystemExit and the like pass through
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"{prog}: internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


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
