"""Progress of long work (a trial's epochs, a retrain's folds x epochs) with tqdm bars, and of a
study against its budget (``BudgetProgress``: one line now and then, with the time left).

On a terminal a bar is one live line, erased when the work ends (the worker's trial line and the
retrain's table follow it). Anywhere else (a log file, a pipe, ``hpo fleet``'s prefixed output) a
bar writes one plain line every ``line_every`` seconds, none for work shorter than that:
``  trial 12: 40/100 epochs [00:03<00:05, val_mse=0.2134]``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm

from hpo.console import budget_line
from hpo.store.statistics import Summary

LINE_EVERY = 5.0  # seconds between lines when the stream is not a terminal
BUDGET_EVERY = 10.0  # seconds between a worker's lines on the study's progress
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}{postfix}]"


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each redraw of the bar into one line of its own, and drops
    the blank redraws tqdm makes to erase a bar (they only make sense on a terminal)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Makes progress bars on one stream (default: standard output, looked up when a bar starts).

    Args:
        stream: where the bars go.
        line_every: seconds between lines when ``stream`` is not a terminal.
        enabled: False gives bars that show nothing (``QUIET``).
    """

    def __init__(self, stream: TextIO | None = None, *, line_every: float = LINE_EVERY, enabled: bool = True):
        self._stream, self.line_every, self.enabled = stream, line_every, enabled

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def bar(self, *, total: int, desc: str, unit: str = "epoch", initial: int = 0) -> tqdm:
        """A bar of ``total`` units, ``initial`` of them done already (a resumed trial); call
        ``update()`` per unit, ``set_postfix_str(text, refresh=False)`` for the latest value, and
        ``close()`` (or use it as a context manager) at the end."""
        if not self.enabled:
            return tqdm(total=total, initial=initial, disable=True)
        if _is_terminal(self.stream):
            return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                        dynamic_ncols=True, miniters=1)
        return tqdm(total=total, initial=initial, desc=f"  {desc}", unit=unit, file=_Lines(self.stream), leave=False,
                    bar_format=LINE_FORMAT, mininterval=self.line_every, delay=self.line_every, miniters=1)

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        """Around other output on the same stream while a bar shows: the live line steps aside."""
        if not self.enabled:
            yield
            return
        with tqdm.external_write_mode(file=self.stream):
            yield


QUIET = Progress(enabled=False)


class BudgetProgress:
    """The study's progress against its budget as a line (``hpo.console.budget_line``): at the first
    call, then at most every ``every`` seconds. The time left comes from the rate at which the
    study's trials finished (by any worker) since this object was made.

    Args:
        read: the study's statistics now (``hpo.store.statistics.summary``); called once here and
            once per line.
        budget: the trials the study runs (None: no limit), or what tells it at each line (``hpo
            extend`` may raise it while the study runs).
    """

    def __init__(self, read: Callable[[], Summary], *, budget: int | None | Callable[[], int | None],
                 every: float = BUDGET_EVERY):
        self._read, self.budget, self.every = read, budget, every
        self._finished_at_start, self._start = read().finished, time.monotonic()
        self._last = -float("inf")

    def line(self) -> str | None:
        """The line when one is due, else None."""
        now = time.monotonic()
        if now - self._last < self.every:
            return None
        self._last = now
        s = self._read()
        done, minutes = s.finished - self._finished_at_start, (now - self._start) / 60
        budget = self.budget() if callable(self.budget) else self.budget
        return budget_line(s, budget=budget, per_minute=done / minutes if done > 0 and minutes > 0 else None)
