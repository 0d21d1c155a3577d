"""The epoch boundary of a trial or a retrain, one rule for both: checkpoint when due, stop when told.

The trainers (``hpo.training.trainer.train``, ``hpo.training.stacked.train_stacked``) call their
``checkpoint`` callback at every epoch boundary where training goes on; trials and retrains make
that callback from :meth:`EpochBoundary.check`, so both behave alike:
- a checkpoint is written at most every ``every_seconds`` of training, and always when told to stop;
- a write that fails (disk full, folder gone) warns once and training goes on: the checkpoint only
  saves time after a crash, the run itself is worth more;
- when ``should_stop`` (the caller's, usually ``hpo.running.signals.StopSignal``) says so, the run
  raises :class:`Interrupted` after the checkpoint, whether checkpoints are on or off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hpo.errors import warn


class Interrupted(KeyboardInterrupt):
    """Told to stop (SIGINT/SIGTERM) at an epoch boundary: a trial ends as FAIL and is re-queued, a
    retrain exits and ``hpo retrain --resume`` continues it.

    Attributes:
        where: the boundary, e.g. ``"epoch 12"`` or ``"fold 2, epoch 5"``.
        epochs: epochs done at that boundary (of the run in training).
        saved: True when the checkpoint was written there, False when its write failed, None when
            there are no checkpoints (``checkpoint: false``).
    """

    def __init__(self, where: str, *, epochs: int, saved: bool | None):
        self.where, self.epochs, self.saved = where, epochs, saved
        note = {True: "; checkpoint saved", False: "; its checkpoint could not be written", None: ""}[saved]
        super().__init__(f"interrupted at {where}{note}")


class EpochBoundary:
    """Checkpointing and stopping at epoch boundaries for one run (a trial, or a retrain's folds).

    Args:
        should_stop: polled at every boundary; None: never stop.
        every_seconds: the least training time between two checkpoints (0: at every boundary).
        label: names the run in the warning about a failed write (``"trial 7"``, ``"retrain"``).
    """

    def __init__(self, *, should_stop: Callable[[], bool] | None, every_seconds: float, label: str,
                 warn: Callable[[str], None] = warn):
        self.should_stop, self.every_seconds, self.label, self.warn = should_stop, every_seconds, label, warn
        self.saved_at, self.write_failed = time.monotonic(), False

    def check(self, where: str, *, epochs: int, write: Callable[[], object] | None) -> None:
        """At an epoch boundary: ``write()`` the checkpoint when due or told to stop (None: no
        checkpoints), then stop if told to.

        Raises:
            Interrupted: when ``should_stop`` says so (after the checkpoint).
        """
        stopping = self.should_stop is not None and self.should_stop()
        saved = None
        if write is not None and (stopping or time.monotonic() - self.saved_at >= self.every_seconds):
            saved = self.save(write)
        if stopping:
            raise Interrupted(where, epochs=epochs, saved=saved)

    def save(self, write: Callable[[], object]) -> bool:
        """``write()`` a checkpoint now; returns whether it was written. A failed write (OSError)
        warns once per run and training goes on; the next try is ``every_seconds`` later."""
        try:
            write()
            ok = True
        except OSError as e:
            if not self.write_failed:
                self.warn(f"{self.label}: checkpoint not written ({e.strerror or e}); training goes on")
            self.write_failed, ok = True, False
        self.saved_at = time.monotonic()
        return ok
