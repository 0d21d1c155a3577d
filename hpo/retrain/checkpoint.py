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
epoch boundary and exits; a second signal exits at once): the same rule as a trial's,
``hpo.training.boundary``, whose :class:`~hpo.training.boundary.EpochBoundary` decides when
:meth:`RetrainCheckpoint.save` runs.
"""

from __future__ import annotations

from typing import Any

from hpo.errors import HpoError
from hpo.training.checkpoint import RETRAIN_KEY, CheckpointStore


class RetrainCheckpoint:
    """Saves and reads one study's retrain checkpoint, written for the retrain described by
    ``meta`` (study, trial, folds, path, parameters, spec fingerprint)."""

    def __init__(self, store: CheckpointStore, meta: dict[str, Any]):
        self.store, self.meta = store, meta

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

    def read(self) -> dict[str, Any] | None:
        """The saved payload, when the file was written for this very retrain (else None, with a
        warning for a file that is damaged or another's)."""
        found = self.store.read(RETRAIN_KEY, expect=self.meta)
        return None if found is None else found[0]

    def discard(self) -> None:
        self.store.delete(RETRAIN_KEY)

    def save(self, payload: dict[str, Any], *, where: str) -> None:
        """Replace the file with ``payload``, taken at ``where`` (``"fold 2, epoch 5"``).

        Raises:
            OSError: when the file system refuses the write.
        """
        self.store.save(RETRAIN_KEY, payload, meta={**self.meta, "at": where})
