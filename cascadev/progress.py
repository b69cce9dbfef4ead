"""Progress bars that suit where the output goes: a terminal gets tqdm's live bars, cleared when done; a log file
(output redirected, a job scheduler) gets whole lines: a bar that runs longer than ``LOG_INTERVAL_S`` prints its
state on a line of its own that often and its final state when it ends; a shorter one prints nothing. tqdm's
redraws (carriage returns, no newline) would otherwise glue the next log record or print onto the bar's line, and
a bar that clears itself leaves its first state ("Stage A decode 0/1") in the log as if it never finished."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0    # a bar in a log: a line this often (none for a bar that ends sooner), and one at its end


class LineStream:
    """What tqdm writes, as lines: each redraw ("\\r" + the bar) becomes one line; clearing writes, and a redraw that
    repeats the last line's progress, are dropped."""

    def __init__(self, stream=None):
        self._stream, self.last = stream, None

    @property
    def stream(self):
        return self._stream or sys.stderr      # None: stderr as it is at each write (a pipeline keeps its settings)

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if not line.strip():
            return
        progress = line.split("[")[0]          # the bar without its timings, which change at every redraw
        if progress != self.last:
            self.stream.write(line + "\n")
            self.last = progress

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):               # encoding and the like, as tqdm asks them
        return getattr(self.stream, name)


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is a terminal."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):       # no isatty, or closed
        return False


def bar_settings(stream=None) -> dict:
    """tqdm's keyword arguments for a bar on ``stream`` (default: stderr): live and cleared when done on a terminal,
    whole lines in a log (the module's docstring). Also for diffusers' ``set_progress_bar_config``."""
    if on_terminal(stream or sys.stderr) or any("notebook" in c.__module__ for c in tqdm.__mro__):  # notebook: widgets
        return {"leave": False}
    return {"file": LineStream(stream), "leave": True, "delay": LOG_INTERVAL_S, "mininterval": LOG_INTERVAL_S}


def progress_bar(iterable: Iterable | None = None, *, desc: str, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, desc=desc, disable=disable, **kwargs)`` with ``bar_settings()``."""
    return tqdm(iterable, desc=desc, disable=disable, **{**bar_settings(), **kwargs})


class BarAwareHandler(logging.StreamHandler):
    """A ``StreamHandler`` whose records never land on a live bar's line on a terminal: there they go through
    ``tqdm.write`` (the bar is cleared, the record written, the bar drawn again below it). In a log file the bars
    are whole lines already (``LineStream``)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not (on_terminal(self.stream) and getattr(tqdm, "_instances", None)):
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)
