"""SIGINT/SIGTERM as a request to stop after the current epoch: the worker and the retrain stop
cleanly (the trial re-queued, the retrain checkpointed); a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading
import time


def _line_start() -> bytes:
    """What puts the stop line on a line of its own on a terminal: back to the start of the line and
    erase it (a progress bar's live line, the terminal's ``^C``; the bar redraws below). Off a
    terminal every line is written whole, so nothing is needed."""
    try:
        return b"\r\x1b[K" if os.isatty(2) else b""
    except OSError:
        return b""


class StopSignal:
    """A context in which the first SIGINT/SIGTERM sets :attr:`requested` (the caller stops at its
    next epoch boundary) and a second one exits the process at once (exit code 128 + signal).

    The same signal again within ``DUPLICATE_S`` is the same request delivered twice, not a second
    one: SLURM signals every process of a task, and ``hpo fleet`` forwards its own copy as well.
    Handlers are installed only in the main thread (Python's rule); elsewhere nothing changes.
    """

    DUPLICATE_S = 1.0

    def __init__(self, doing: str = "stopping after the current epoch"):
        self.requested = False
        self._doing = doing  # what the first signal makes the process do, for the line it prints
        self._first: tuple[int, float] | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            first, at = self._first
            if signum == first and time.monotonic() - at < self.DUPLICATE_S:
                return
            os.write(2, _line_start() + b"hpo: second signal, exiting now\n")
            os._exit(128 + signum)
        self.requested, self._first = True, (signum, time.monotonic())
        # os.write: a print here could land inside another print of the main thread and raise.
        os.write(2, _line_start() + f"hpo: got {signal.Signals(signum).name}: {self._doing} (again to exit now)\n".encode())
