"""Errors shared by every command: the bottom of the package, importing nothing of it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input; printed as one line, without a traceback."""


def run_guarded(prog: str, fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command's body: bad input (``UserError``, ``ValueError``, ``OSError``: missing files, a full disk, no
    permission) is one line and exit code 2, Ctrl-C exit 130, and any other exception one line naming it and
    exit 1, with its traceback only under ``debug``."""
    try:
        return fn()
    except (UserError, OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"{prog}: internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
