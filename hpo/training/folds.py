"""K fold models of one configuration, trained together (``hpo.training.stacked``) or one after
another (``hpo.training.trainer.train`` per fold), with checkpoints at epoch boundaries: the k-fold
retrain (``hpo.retrain.run``) and cross-validated trials (``hpo.search.cv``) share them.

Checkpointing and stopping follow one rule (``hpo.training.boundary.EpochBoundary``): at every epoch
boundary ``boundary.check`` writes the checkpoint when due or told to stop, then stops if told to.
A checkpoint here is any object with ``save(payload, *, where)`` (write it now; an OSError is the
boundary's to handle). Payloads:
- stacked: ``{"stacked": <train_stacked's state of all K models>}``;
- sequential: ``{"done": [{"model", "result"} of each finished fold], "rng": torch's generators
  where the next fold starts (None while a fold trains), "current": the TrainState of the fold in
  training (None between folds)}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import torch

from hpo.data.dataset import Dataset
from hpo.nn.models import build_model
from hpo.training.boundary import EpochBoundary
from hpo.training.seeds import fold_seed
from hpo.training.stacked import Fold, StackedResult, train_stacked
from hpo.training.state import TrainState, cpu_copy, load_model_in_place, rng_state, set_rng_state
from hpo.training.trainer import TrainResult, train


class FoldCheckpoint(Protocol):
    def save(self, payload: dict[str, Any], *, where: str) -> None: ...


def device_folds(splits: list[tuple[np.ndarray, np.ndarray]], *, base_seed: int, device: torch.device) -> list[Fold]:
    """Folds as index tensors on the device, fold i's batch order (and model) seeded
    ``hpo.training.seeds.fold_seed(base_seed, i)``."""
    return [Fold(train_idx=torch.from_numpy(tr).to(device), val_idx=torch.from_numpy(va).to(device),
                 seed=fold_seed(base_seed, i)) for i, (tr, va) in enumerate(splits)]


def fold_models(model: str, hp: dict[str, Any], data: Dataset, *, seeds: list[int],
                device: torch.device) -> list[torch.nn.Module]:
    """One freshly initialised model of family ``model`` per fold, each from its own seed."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(model, hp, in_shape=data.in_shape, out_features=data.out_features).to(device))
    return models


def train_stacked_folds(models: list[torch.nn.Module], data: Dataset, hp: dict[str, Any], folds: list[Fold], *,
                        on_epoch: Callable[[int, int, dict[str, float]], None],
                        checkpoint: FoldCheckpoint | None, boundary: EpochBoundary, saved: dict[str, Any] | None,
                        bar, on_epoch_end: Callable[[int], None] | None = None) -> StackedResult:
    """Train the K fold models together (``hpo.training.stacked.train_stacked``), checkpointing
    and stopping as ``boundary`` says; with ``saved`` (a checkpoint's payload), from its epoch. ``on_epoch_end(epoch)``
    runs once every model has had that epoch's ``on_epoch``."""
    resume_state = saved["stacked"] if saved is not None else None
    if resume_state is not None:
        bar.update(sum(len(r["history"]) for r in resume_state["results"]))

    def at_boundary(done: int, state) -> None:
        where = f"epoch {done} of all folds"
        write = None if checkpoint is None else lambda: checkpoint.save({"stacked": state()}, where=where)
        boundary.check(where, epochs=done, write=write)

    return train_stacked(models, data, hp, folds=folds, on_epoch=on_epoch, resume=resume_state, checkpoint=at_boundary,
                         on_epoch_end=on_epoch_end)


def train_sequential(models: list[torch.nn.Module], data: Dataset, hp: dict[str, Any], folds: list[Fold], *,
                     on_epoch: Callable[[int, int, dict[str, float]], None],
                     on_fold: Callable[[int, TrainResult], None], checkpoint: FoldCheckpoint | None,
                     boundary: EpochBoundary, saved: dict[str, Any] | None, bar) -> list[TrainResult]:
    """Train fold model i on fold i, one after another, checkpointing and stopping as ``boundary``
    says (and checkpointing after every fold but the last); with ``saved`` (a checkpoint's payload), finished folds get their
    weights back and the fold in training resumes. ``on_fold(i, result)`` runs after fold i (it may
    raise to stop)."""
    device = data.x.device
    done: list[dict[str, Any]] = list(saved["done"]) if saved is not None else []
    results = [TrainResult(**{**d["result"], "resumed_from_epoch": d["result"]["epochs_run"]}) for d in done]
    for model, d in zip(models, done):
        load_model_in_place(model, d["model"])
    current = TrainState.from_dict(saved["current"]) if saved is not None and saved["current"] else None
    if saved is not None and current is None:
        set_rng_state(saved["rng"], device)  # where the next fold starts
    bar.update(sum(r.epochs_run for r in results) + (current.epoch if current else 0))
    bar.total -= sum(int(hp["epochs"]) - r.epochs_run for r in results)
    first = len(done)
    for i in range(first, len(models)):
        f = folds[i]

        def at_boundary(epochs_done: int, state, i=i) -> None:
            where = f"fold {i}, epoch {epochs_done}"
            write = None if checkpoint is None else lambda: checkpoint.save(
                {"done": done, "rng": None, "current": state().to_dict()}, where=where)
            boundary.check(where, epochs=epochs_done, write=write)

        result = train(models[i], data, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx,
                       on_epoch=lambda epoch, stats, i=i: on_epoch(i, epoch, stats),
                       resume=current if i == first else None,
                       checkpoint=at_boundary)
        results.append(result)
        on_fold(i, result)
        done.append({"model": cpu_copy(models[i].state_dict()), "result": asdict(result)})
        if checkpoint is not None and i + 1 < len(models):  # a finished fold is never trained again
            boundary.save(lambda i=i: checkpoint.save({"done": done, "rng": rng_state(device), "current": None},
                                                      where=f"fold {i} done"))
    return results
