"""The checkpoint of a k-fold retrain in progress, so that ``hpo retrain --resume`` continues it.

One file per study (``hpo.training.checkpoint``'s ``retrain`` key), replaced as training goes on and
deleted once the retrain is saved: a new retrain replaces an older unfinished one, so ``--resume``
continues the latest. It holds what the retrain was asked (trial, folds, sequential or stacked:
the file's meta) and:
- sequential: the folds finished (final weights and results), torch's generators at the start
  of the next fold, and the state of the fold in training (``hpo.training.state.TrainState``);
- stacked: the state of all K models (``hpo.training.stacked.train_stacked``'s).

Saved at an epoch boundary at most every ``checkpoint.every_seconds`` of training, after every
finished fold, and when the retrain is told to stop (SIGINT/SIGTERM: it checkpoints at the next
epoch boundary and exits; a second signal exits at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hpo.errors import HpoError
from hpo.running.signals import StopSignal
from hpo.training.checkpoint import RETRAIN_KEY, CheckpointStore


class RetrainInterrupted(KeyboardInterrupt):
    """The retrain was told to stop; its checkpoint is saved."""


class RetrainCheckpoint:
    """Saves and reads one study's retrain checkpoint, written for the retrain described by
    ``meta`` (study, trial, folds, path, parameters, spec fingerprint)."""

    def __init__(self, store: CheckpointStore, meta: dict[str, Any], *, every_seconds: float):
        self.store, self.meta, self.every_seconds = store, meta, every_seconds
        self._saved_at = time.monotonic()
        self._stop = StopSignal("checkpointing the retrain after the current epoch")

    @staticmethod
    def unfinished(store: CheckpointStore | None, study_name: str) -> dict[str, Any]:
        """What the study's unfinished retrain was asked (its file's meta).

        Raises:
            HpoError: when the study has none to resume.
        """
        meta = store.meta(RETRAIN_KEY) if store is not None else None
        if meta is None or meta.get("kind") != "retrain":
            where = f" in {store.folder}" if store is not None else " (its spec says checkpoint: false)"
            raise HpoError(f"--resume: study {study_name!r} has no unfinished retrain{where}; "
                           f"start one with: hpo retrain --study {study_name}")
        return meta

    def load(self) -> dict[str, Any] | None:
        """The saved payload, when the file was written for this very retrain (else None, with a
        warning for a file that is damaged or another's)."""
        found = self.store.load(RETRAIN_KEY, expect=self.meta)
        return None if found is None else found[0]

    def discard(self) -> None:
        self.store.delete(RETRAIN_KEY)

    def save(self, payload: dict[str, Any], *, where: str) -> None:
        self.store.save(RETRAIN_KEY, payload, meta={**self.meta, "at": where})
        self._saved_at = time.monotonic()

    def boundary(self, payload: Callable[[], dict[str, Any]], *, where: str) -> None:
        """At an epoch boundary: save when due or told to stop; then stop if told to.

        Raises:
            RetrainInterrupted: after saving, when a stop was requested.
        """
        if self.stop_requested or time.monotonic() - self._saved_at >= self.every_seconds:
            self.save(payload(), where=where)
        if self.stop_requested:
            raise RetrainInterrupted(f"interrupted at {where}; checkpoint saved")

    # SIGINT/SIGTERM while the retrain runs: checkpoint at the next epoch boundary, then stop.

    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def __enter__(self) -> RetrainCheckpoint:
        self._stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.__exit__(*exc)
