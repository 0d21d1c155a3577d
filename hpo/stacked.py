"""K models of one architecture trained together, each on its own fold: the k-fold retrain's fast path.

The K models' parameters are stacked (``torch.func.stack_module_state``) and one vmapped
``functional_call`` runs all K forward passes as one batch of kernels, so K models cost little
more than one. On CUDA the whole step (gather, forward, backward, optimizer update) is captured
once in a CUDA graph and replayed; on the CPU the same step runs eagerly (``hpo.stacked_step``).

It gives the sequential path's results (``hpo.train.train`` per fold) to float tolerance, given the
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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hpo.dataset import Dataset
from hpo.errors import TrainingError
from hpo.optim import make_scheduler, step_scheduler
from hpo.stacked_step import StackedOptimizer, StackedStep
from hpo.train import TrainResult, evaluate
from hpo.train_state import cpu_copy, load_scheduler, rng_state, set_generator_state, set_rng_state

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
    """``hpo.train.score`` of K models at once, on the device: outputs ``(K, n, C)``, targets and
    mask ``(K, n)``, sizes ``(K,)`` -> each metric ``(K,)``, padding left out."""
    k, n = mask.shape
    if task == "classification":
        losses = nn.functional.cross_entropy(outputs.reshape(k * n, -1), y.reshape(k * n), reduction="none").view(k, n)
        hits = (outputs.argmax(-1) == y).to(mask.dtype)
        return {"loss": (losses * mask).sum(1) / sizes, "accuracy": (hits * mask).sum(1) / sizes}
    diff = (outputs - y).reshape(k, n, -1)
    mse = ((diff.square().mean(-1) * mask).sum(1)) / sizes
    return {"loss": mse, "mse": mse, "mae": (diff.abs().mean(-1) * mask).sum(1) / sizes}


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
) -> StackedResult:
    """Train ``models[k]`` on ``folds[k]`` for every k, all at once, in place.

    Args:
        models: K models of one architecture, on the data's device (their initial weights are used).
        hp: resolved hyperparameters, as for ``hpo.train.train``.
        folds: K folds; each model is validated on its fold's ``val_idx``.
        on_epoch: called with ``(fold, epoch, stats)`` after every epoch of every running model.
        cuda_graph: capture the step in a CUDA graph when the data are on a CUDA device.
        resume: a state offered to ``checkpoint`` by an earlier run of the same models, folds and
            ``hp``: training goes on from its epoch.
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
    k, device, task = len(models), data.x.device, data.task
    batch_size, epochs, patience = int(hp["batch_size"]), int(hp["epochs"]), int(hp["early_stopping"])

    step = StackedStep(models, data, hp)
    params, buffers, optimizer = step.params, step.buffers, step.optimizer
    schedules = _Schedules(hp, k)

    train_pos, n_train, mask_all = _padded([f.train_idx for f in folds], device)
    val_pos, n_val, val_mask = _padded([f.val_idx for f in folds], device)
    val_y = data.y[val_pos]
    n_max = train_pos.shape[1]
    sizes = n_train.tolist()
    batches = _batches(n_max, min(sizes), batch_size)
    generators = [torch.Generator(device=device).manual_seed(f.seed) for f in folds]
    perms = train_pos.clone()  # padding columns stay where they are; each epoch refills the real ones

    notes: list[str] = []
    if cuda_graph and device.type == "cuda":
        try:
            step.capture(sorted({(w, m) for _, w, m in batches}))
        except Exception as e:  # capture is an optimisation: any failure falls back to eager
            step.graphs.clear()
            notes.append(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); ran eagerly")

    results = [TrainResult() for _ in range(k)]
    active = [True] * k
    best_loss, since_best = [math.inf] * k, [0] * k
    best = None
    if patience:
        best = (optimizer.flat.clone(), {n: b.clone() for n, b in buffers.items()})
    improved = [False] * k
    lrs = [schedules.lr(f) for f in range(k)]

    def state(done: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "epoch": done, "flat": optimizer.flat.detach().cpu().clone(),
            "moments": [m.detach().cpu().clone() for m in optimizer.state], "steps": optimizer.steps.cpu().clone(),
            "lr": optimizer.lr.cpu().clone(), "buffers": cpu_copy(buffers), "active": list(active),
            "best": None if best is None else {"flat": best[0].cpu().clone(), "buffers": cpu_copy(best[1])},
            "best_loss": list(best_loss), "since_best": list(since_best), "improved": list(improved),
            "lrs": list(lrs), "schedulers": [sch.state_dict() if sch is not None else None for sch in schedules.schedulers],
            "scheduler_lrs": [schedules.lr(f) for f in range(k)], "batch_order": [g.get_state() for g in generators],
            "rng": rng_state(device), "results": [asdict(r) for r in results]}

    first = 0
    if resume is not None:
        if resume.get("format") != STATE_FORMAT or len(resume.get("results", ())) != k \
                or tuple(resume["flat"].shape) != tuple(optimizer.flat.shape):
            raise ValueError("the saved state is not one of these stacked models")
        with torch.no_grad():  # in place: a captured graph reads these very tensors
            optimizer.flat.copy_(resume["flat"])
            for moment, saved in zip(optimizer.state, resume["moments"]):
                moment.copy_(saved)
            optimizer.steps.copy_(resume["steps"])
            optimizer.lr.copy_(resume["lr"])
            for n, b in buffers.items():
                b.copy_(resume["buffers"][n])
            step.active.copy_(torch.tensor([1.0 if a else 0.0 for a in resume["active"]]))
            if best is not None and resume["best"] is not None:
                best[0].copy_(resume["best"]["flat"])
                for n, b in best[1].items():
                    b.copy_(resume["best"]["buffers"][n])
        active[:], best_loss[:], since_best[:] = resume["active"], resume["best_loss"], resume["since_best"]
        improved[:], lrs[:] = resume["improved"], resume["lrs"]
        for f, (sch, lr) in enumerate(zip(resume["schedulers"], resume["scheduler_lrs"])):
            load_scheduler(schedules.schedulers[f], sch)
            schedules.optimizers[f].param_groups[0]["lr"] = lr
            set_generator_state(generators[f], resume["batch_order"][f], reseed=folds[f].seed + resume["epoch"])
        set_rng_state(resume["rng"], device)
        results[:] = [TrainResult(**{**r, "resumed_from_epoch": r["epochs_run"]}) for r in resume["results"]]
        first = resume["epoch"]

    for epoch in range(first, epochs):
        if not any(active):
            break
        for f in range(k):
            # The same draw as train(): one permutation per epoch from the fold's own generator.
            perm = torch.randperm(sizes[f], generator=generators[f], device=device)
            perms[f, :sizes[f]] = train_pos[f, perm]
        step.totals.zero_()
        for i, width, masked in batches:
            step.run(perms[:, i:i + width], mask_all[:, i:i + width] if masked else None)
        val = _val_scores(task, step.predict(val_pos), val_y, val_mask, n_val)
        # The epoch's one host sync: training losses and validation metrics together.
        rows = torch.stack([step.totals / n_train, *val.values()]).tolist()
        train_losses, val_rows = rows[0], dict(zip(val, rows[1:]))

        for f in range(k):
            if not active[f]:
                continue
            if not math.isfinite(train_losses[f]):
                raise TrainingError(f"fold {f}: training loss became {train_losses[f]} at epoch {epoch}; stopped (lower lr?)")
            stats = {"epoch": epoch, "train_loss": train_losses[f], **{f"val_{n}": v[f] for n, v in val_rows.items()},
                     "lr": lrs[f]}
            results[f].history.append(stats)
            results[f].epochs_run = epoch + 1
            lr = schedules.step(f, stats["val_loss"])
            if lr != lrs[f]:
                optimizer.lr[f], lrs[f] = lr, lr
            if patience:
                if stats["val_loss"] < best_loss[f]:
                    best_loss[f], since_best[f], improved[f] = stats["val_loss"], 0, True
                    with torch.no_grad():
                        best[0][f].copy_(optimizer.flat[f])
                        for n in buffers:
                            best[1][n][f].copy_(buffers[n][f])
                else:
                    since_best[f] += 1
            if on_epoch is not None:
                on_epoch(f, epoch, stats)
            if patience and since_best[f] >= patience:
                results[f].stopped_early = True
                active[f] = False
                step.active[f] = 0.0
        if checkpoint is not None and any(active) and epoch + 1 < epochs:
            checkpoint(epoch + 1, functools.partial(state, epoch + 1))

    seconds = time.perf_counter() - start
    x, y = data.x, data.y
    for f, model in enumerate(models):
        restore = patience and improved[f]
        if restore:
            with torch.no_grad():
                optimizer.flat[f].copy_(best[0][f])  # the params' views now hold the best weights
                for n, b in buffers.items():
                    b[f].copy_(best[1][n][f])
        keys = set(model.state_dict())
        state = {n: t[f].detach().clone() for n, t in (*params.items(), *buffers.items()) if n in keys}
        model.load_state_dict(state)
        if restore:
            val_idx = folds[f].val_idx
            results[f].metrics = {f"val_{n}": v for n, v in evaluate(model, task, x[val_idx], y[val_idx]).items()}
        else:
            results[f].metrics = {n: v for n, v in results[f].history[-1].items() if n.startswith("val_")}
        results[f].seconds = seconds
    return StackedResult(results=results, cuda_graph=bool(step.graphs), notes=notes)
