"""K models of one architecture trained together, each on its own fold: the k-fold retrain's fast path.

The K models' parameters are stacked (``torch.func.stack_module_state``) and one vmapped
``functional_call`` runs all K forward passes as one batch of kernels, so K models cost little
more than one. On CUDA the whole step (gather, forward, backward, optimizer update) is captured
once in a CUDA graph and replayed; on the CPU the same step runs eagerly (``hpo.training.stacked_step``).

It gives the sequential path's results (``hpo.training.trainer.train`` per fold) to float tolerance, given the
same initial weights and fold seeds:
- each fold draws its batch order from its own generator exactly as ``train`` does;
- uneven folds (training sizes differ by one when K does not divide the pool) are padded to the
  largest fold with masked samples: a padded sample adds nothing to its model's loss, and a model
  whose batch is all padding does not step at all, so every model sees exactly its own batches;
- the optimizers (Adam, SGD, RMSprop, with weight decay and momentum) are written on the stacked
  tensors with per-model learning rates and step counts, so ReduceLROnPlateau and early stopping act
  per model; a stopped model's updates are masked off while the others go on.
Not bit-identical: dropout masks and augmentation (the random stream differs), and batch-norm statistics of a last
batch that holds padding (only with uneven folds).

Host syncs: one per epoch (the K training losses and validation metrics read together), none per step.

Checkpoints: at an epoch boundary ``train_stacked`` offers the state of all K models (weights,
optimizer moments, step counts and lrs, batch-norm buffers, early stopping, schedulers, batch-order
generators, torch's generators, histories) to a ``checkpoint`` callback; ``resume=`` puts such a
state back in place (after capture: the graph reads the same buffers) and goes on from its epoch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hpo.data.dataset import Dataset
from hpo.errors import TrainingError
from hpo.training.optim import make_scheduler, step_scheduler
from hpo.training.seeds import batch_reseed
from hpo.training.stacked_step import StackedOptimizer, StackedStep
from hpo.training.state import (
    cpu_copy,
    load_scheduler,
    rng_state,
    set_generator_state,
    set_rng_state,
)
from hpo.training.trainer import TrainResult, evaluate

__all__ = ["Fold", "StackedOptimizer", "StackedResult", "stack_problem", "train_stacked"]

FoldCallback = Callable[[int, int, dict[str, float]], None]  # (fold, epoch, stats)
# (epochs done, a function returning the state of all K models now): saves it when it wants to
StackedCheckpoint = Callable[[int, Callable[[], dict[str, Any]]], None]
STATE_FORMAT = 1


@dataclass(frozen=True)
class Fold:
    """One fold's index arrays into ``data.x`` (on the data's device) and its batch-order seed."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    seed: int


@dataclass
class StackedResult:
    results: list[TrainResult]
    cuda_graph: bool
    notes: list[str] = field(default_factory=list)


def stack_problem(models: list[nn.Module]) -> str | None:
    """Why these models cannot be trained stacked, or None when they can."""
    if len(models) < 2:
        return "a single model"
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        return "the models differ in architecture"
    buffers = [[(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()] for m in models]
    if any(b != buffers[0] for b in buffers[1:]):
        return "the models' buffers differ in shape or type"
    return None


class _Schedules:
    """One real torch scheduler per model, each driving a stand-in optimizer whose lr we read back:
    the library's own ReduceLROnPlateau / ExponentialLR semantics, per model."""

    def __init__(self, hp: dict[str, Any], k: int):
        self.optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(hp["lr"])) for _ in range(k)]
        self.schedulers = [make_scheduler(o, hp) for o in self.optimizers]

    def lr(self, k: int) -> float:
        return self.optimizers[k].param_groups[0]["lr"]

    def step(self, k: int, val_loss: float) -> float:
        # The stand-in steps as model k did this epoch (its parameter has no gradient, so nothing
        # moves): the scheduler then sees optimizer.step() before its own step, as torch expects.
        self.optimizers[k].step()
        step_scheduler(self.schedulers[k], val_loss)
        return self.lr(k)


def _padded(indices: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index arrays of unequal length as one ``(K, n_max)`` array padded with 0, their lengths, and
    the ``(K, n_max)`` mask of real entries (1.0) against padding (0.0)."""
    sizes = torch.tensor([len(i) for i in indices], device=device)
    out = torch.zeros((len(indices), int(sizes.max())), dtype=torch.long, device=device)
    for k, idx in enumerate(indices):
        out[k, :len(idx)] = idx
    mask = (torch.arange(out.shape[1], device=device)[None, :] < sizes[:, None]).float()
    return out, sizes, mask


def _batches(n_max: int, smallest: int, batch_size: int) -> list[tuple[int, int, bool]]:
    """Each batch's (start, width, masked): only a batch reaching past the smallest fold holds padding."""
    return [(i, min(batch_size, n_max - i), min(i + batch_size, n_max) > smallest) for i in range(0, n_max, batch_size)]


def _val_scores(task: str, outputs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``hpo.training.trainer.score`` of K models at once, on the device: outputs ``(K, n, C)``, targets and
    mask ``(K, n)``, sizes ``(K,)`` -> each metric ``(K,)``, padding left out."""
    k, n = mask.shape
    if task == "classification":
        losses = nn.functional.cross_entropy(outputs.reshape(k * n, -1), y.reshape(k * n), reduction="none").view(k, n)
        hits = (outputs.argmax(-1) == y).to(mask.dtype)
        return {"loss": (losses * mask).sum(1) / sizes, "accuracy": (hits * mask).sum(1) / sizes}
    diff = (outputs - y).reshape(k, n, -1)
    mse = ((diff.square().mean(-1) * mask).sum(1)) / sizes
    return {"loss": mse, "mse": mse, "mae": (diff.abs().mean(-1) * mask).sum(1) / sizes}


class _FoldBatches:
    """The K folds' training indices padded to the largest fold, ``(K, n_max)``, with their
    padding mask, the batches an epoch runs over them and each fold's batch-order generator; the
    validation indices padded likewise."""

    def __init__(self, folds: list[Fold], data: Dataset, batch_size: int):
        self.device = data.x.device
        self.train_pos, self.n_train, self.mask = _padded([f.train_idx for f in folds], self.device)
        self.val_pos, self.n_val, self.val_mask = _padded([f.val_idx for f in folds], self.device)
        self.val_y = data.y[self.val_pos]
        self.sizes = self.n_train.tolist()
        self.batches = _batches(self.train_pos.shape[1], min(self.sizes), batch_size)
        self.generators = [torch.Generator(device=self.device).manual_seed(f.seed) for f in folds]
        self.perms = self.train_pos.clone()  # padding columns stay where they are; each epoch refills the real ones

    def shuffle(self) -> None:
        """This epoch's batch order of every fold, in ``perms``."""
        for f, (generator, size) in enumerate(zip(self.generators, self.sizes)):
            # The same draw as train(): one permutation per epoch from the fold's own generator.
            perm = torch.randperm(size, generator=generator, device=self.device)
            self.perms[f, :size] = self.train_pos[f, perm]


def _capture(step: StackedStep, batches: _FoldBatches) -> list[str]:
    """Capture the step in a CUDA graph per batch shape; returns notes on what failed."""
    try:
        step.capture(sorted({(w, m) for _, w, m in batches.batches}))
    except Exception as e:  # capture is an optimisation: any failure falls back to eager
        step.graphs.clear()
        return [f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); ran eagerly"]
    return []


def _train_epoch(step: StackedStep, batches: _FoldBatches, task: str) -> tuple[list[float], dict[str, list[float]]]:
    """One epoch of every model on its own fold, then validation; returns each model's training
    loss and validation metrics (``{name: K values}``), read in the epoch's one host sync."""
    batches.shuffle()
    step.totals.zero_()
    for i, width, masked in batches.batches:
        step.run(batches.perms[:, i:i + width], batches.mask[:, i:i + width] if masked else None)
    val = _val_scores(task, step.predict(batches.val_pos), batches.val_y, batches.val_mask, batches.n_val)
    rows = torch.stack([step.totals / batches.n_train, *val.values()]).tolist()
    return rows[0], dict(zip(val, rows[1:]))


class _PerFold:
    """Each fold model's results, its scheduler's lr and its early stopping; the best weights of
    all K models are kept on the device, in one copy of the stacked weights and buffers."""

    def __init__(self, step: StackedStep, schedules: _Schedules, patience: int):
        k = step.k
        self.step, self.schedules, self.patience = step, schedules, patience
        self.results = [TrainResult() for _ in range(k)]
        self.active = [True] * k
        self.best_loss, self.since_best = [math.inf] * k, [0] * k
        self.best = None
        if patience:
            self.best = (step.optimizer.flat.clone(), {n: b.clone() for n, b in step.buffers.items()})
        self.improved = [False] * k
        self.lrs = [schedules.lr(f) for f in range(k)]

    def end_epoch(self, epoch: int, train_losses: list[float], val_rows: dict[str, list[float]],
                  on_epoch: FoldCallback | None) -> None:
        """Every running model's epoch: its record, lr schedule and early stopping.

        Raises:
            TrainingError: when a model's training loss is NaN or infinite.
        """
        for f in range(len(self.results)):
            if not self.active[f]:
                continue
            if not math.isfinite(train_losses[f]):
                raise TrainingError(f"fold {f}: training loss became {train_losses[f]} at epoch {epoch}; stopped (lower lr?)")
            stats = {"epoch": epoch, "train_loss": train_losses[f], **{f"val_{n}": v[f] for n, v in val_rows.items()},
                     "lr": self.lrs[f]}
            self.results[f].history.append(stats)
            self.results[f].epochs_run = epoch + 1
            self._schedule(f, stats["val_loss"])
            if self.patience:
                self._watch(f, stats["val_loss"])
            if on_epoch is not None:
                on_epoch(f, epoch, stats)
            if self.patience and self.since_best[f] >= self.patience:
                self.results[f].stopped_early = True
                self.active[f] = False
                self.step.active[f] = 0.0

    def _schedule(self, f: int, val_loss: float) -> None:
        lr = self.schedules.step(f, val_loss)
        if lr != self.lrs[f]:
            self.step.optimizer.lr[f], self.lrs[f] = lr, lr

    @torch.no_grad()
    def _watch(self, f: int, val_loss: float) -> None:
        """Early stopping: keep model f's weights when its validation loss is the best yet."""
        if val_loss < self.best_loss[f]:
            self.best_loss[f], self.since_best[f], self.improved[f] = val_loss, 0, True
            self.best[0][f].copy_(self.step.optimizer.flat[f])
            for n, b in self.step.buffers.items():
                self.best[1][n][f].copy_(b[f])
        else:
            self.since_best[f] += 1

    @torch.no_grad()
    def restore_best(self, f: int) -> bool:
        """Put model f's best weights back into the stacked ones, when early stopping kept some."""
        if not (self.patience and self.improved[f]):
            return False
        self.step.optimizer.flat[f].copy_(self.best[0][f])  # the params' views now hold the best weights
        for n, b in self.step.buffers.items():
            b[f].copy_(self.best[1][n][f])
        return True


def _state(done: int, step: StackedStep, per_fold: _PerFold, batches: _FoldBatches) -> dict[str, Any]:
    """The state of all K models after ``done`` epochs: plain containers of CPU tensors."""
    optimizer, best, schedules = step.optimizer, per_fold.best, per_fold.schedules
    return {
        "format": STATE_FORMAT, "epoch": done, "flat": cpu_copy(optimizer.flat),
        "moments": cpu_copy(optimizer.state), "steps": cpu_copy(optimizer.steps),
        "lr": cpu_copy(optimizer.lr), "buffers": cpu_copy(step.buffers), "active": list(per_fold.active),
        "best": None if best is None else {"flat": cpu_copy(best[0]), "buffers": cpu_copy(best[1])},
        "best_loss": list(per_fold.best_loss), "since_best": list(per_fold.since_best),
        "improved": list(per_fold.improved), "lrs": list(per_fold.lrs),
        "schedulers": [sch.state_dict() if sch is not None else None for sch in schedules.schedulers],
        "scheduler_lrs": [schedules.lr(f) for f in range(step.k)],
        "batch_order": [g.get_state() for g in batches.generators],
        "rng": rng_state(batches.device), "results": [asdict(r) for r in per_fold.results]}


def _resume(saved: dict[str, Any], step: StackedStep, per_fold: _PerFold, batches: _FoldBatches,
            folds: list[Fold]) -> int:
    """Put a state from ``_state`` back, in place (a captured graph reads these very tensors);
    returns the epochs it has done.

    Raises:
        ValueError: when it is not a state of these models.
    """
    optimizer, best, schedules = step.optimizer, per_fold.best, per_fold.schedules
    if saved.get("format") != STATE_FORMAT or len(saved.get("results", ())) != step.k \
            or tuple(saved["flat"].shape) != tuple(optimizer.flat.shape):
        raise ValueError("the saved state is not one of these stacked models")
    with torch.no_grad():
        optimizer.flat.copy_(saved["flat"])
        for moment, value in zip(optimizer.state, saved["moments"]):
            moment.copy_(value)
        optimizer.steps.copy_(saved["steps"])
        optimizer.lr.copy_(saved["lr"])
        for n, b in step.buffers.items():
            b.copy_(saved["buffers"][n])
        step.active.copy_(torch.tensor([1.0 if a else 0.0 for a in saved["active"]]))
        if best is not None and saved["best"] is not None:
            best[0].copy_(saved["best"]["flat"])
            for n, b in best[1].items():
                b.copy_(saved["best"]["buffers"][n])
    for name in ("active", "best_loss", "since_best", "improved", "lrs"):
        getattr(per_fold, name)[:] = saved[name]
    for f, (sch, lr) in enumerate(zip(saved["schedulers"], saved["scheduler_lrs"])):
        load_scheduler(schedules.schedulers[f], sch)
        schedules.optimizers[f].param_groups[0]["lr"] = lr
        set_generator_state(batches.generators[f], saved["batch_order"][f], reseed=batch_reseed(folds[f].seed, saved["epoch"]))
    set_rng_state(saved["rng"], batches.device)
    per_fold.results[:] = [TrainResult(**{**r, "resumed_from_epoch": r["epochs_run"]}) for r in saved["results"]]
    return saved["epoch"]


def _unstack(models: list[nn.Module], step: StackedStep, per_fold: _PerFold, data: Dataset, folds: list[Fold]) -> None:
    """Give each model its trained weights (its best epoch's, when early stopping kept them) and
    its result the final validation metrics."""
    for f, model in enumerate(models):
        restored = per_fold.restore_best(f)
        keys = set(model.state_dict())
        model.load_state_dict({n: t[f].detach().clone() for n, t in (*step.params.items(), *step.buffers.items())
                               if n in keys})
        result = per_fold.results[f]
        if restored:
            val_idx = folds[f].val_idx
            val = evaluate(model, data.task, data.x[val_idx], data.y[val_idx])
            result.metrics = {f"val_{n}": v for n, v in val.items()}
        else:
            result.metrics = {n: v for n, v in result.history[-1].items() if n.startswith("val_")}


def train_stacked(
    models: list[nn.Module],
    data: Dataset,
    hp: dict[str, Any],
    *,
    folds: list[Fold],
    on_epoch: FoldCallback | None = None,
    cuda_graph: bool = True,
    resume: dict[str, Any] | None = None,
    checkpoint: StackedCheckpoint | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> StackedResult:
    """Train ``models[k]`` on ``folds[k]`` for every k, all at once, in place.

    Args:
        models: K models of one architecture, on the data's device (their initial weights are used).
        hp: resolved hyperparameters, as for ``hpo.training.trainer.train``.
        folds: K folds; each model is validated on its fold's ``val_idx``.
        on_epoch: called with ``(fold, epoch, stats)`` after every epoch of every running model.
        cuda_graph: capture the step in a CUDA graph when the data are on a CUDA device.
        resume: a state offered to ``checkpoint`` by an earlier run of the same models, folds and
            ``hp``: training goes on from its epoch.
        on_epoch_end: called with the epoch once every running model has had its ``on_epoch``
            (before ``checkpoint``); it may raise to stop training (pruning).
        checkpoint: called at every epoch boundary where a model still trains with ``(epochs
            done, state)``, ``state`` a function returning the state (plain containers of CPU
            tensors, for ``torch.save``); it may raise to stop training.

    Returns:
        One ``TrainResult`` per model (as ``train`` returns), and whether a CUDA graph ran.

    Raises:
        TrainingError: when a model's loss becomes NaN or infinite, or the models cannot be stacked.
        ValueError: when ``resume`` is not a state of these models.
    """
    start = time.perf_counter()
    problem = stack_problem(models)
    if problem is not None:
        raise TrainingError(f"cannot train these models stacked: {problem}")
    epochs = int(hp["epochs"])
    step = StackedStep(models, data, hp)
    schedules = _Schedules(hp, len(models))
    batches = _FoldBatches(folds, data, int(hp["batch_size"]))
    notes = _capture(step, batches) if cuda_graph and data.x.device.type == "cuda" else []
    per_fold = _PerFold(step, schedules, int(hp["early_stopping"]))
    first = 0 if resume is None else _resume(resume, step, per_fold, batches, folds)
    for epoch in range(first, epochs):
        if not any(per_fold.active):
            break
        train_losses, val_rows = _train_epoch(step, batches, data.task)
        per_fold.end_epoch(epoch, train_losses, val_rows, on_epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if checkpoint is not None and any(per_fold.active) and epoch + 1 < epochs:
            checkpoint(epoch + 1, functools.partial(_state, epoch + 1, step, per_fold, batches))
    seconds = time.perf_counter() - start
    _unstack(models, step, per_fold, data, folds)
    for result in per_fold.results:
        result.seconds = seconds
    return StackedResult(results=per_fold.results, cuda_graph=bool(step.graphs), notes=notes)
