"""K models of one architecture trained together, each on its own fold: the k-fold retrain's fast path.

The K models' parameters are stacked (``torch.func.stack_module_state``) and one vmapped
``functional_call`` runs all K forward passes as one batch of kernels, so K models cost little
more than one. On CUDA the whole step (gather, forward, backward, optimizer update) is captured
once in a CUDA graph and replayed; on the CPU the same step runs eagerly.

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
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from hpo.data import Dataset
from hpo.errors import TrainingError
from hpo.train import (EVAL_BATCH, WARMUP_STEPS, TrainResult, batch_augmenter, evaluate, make_scheduler, score,
                       side_stream, step_scheduler)

FoldCallback = Callable[[int, int, dict[str, float]], None]  # (fold, epoch, stats)


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


class StackedOptimizer:
    """Adam, SGD or RMSprop over stacked parameters ``(K, ...)``, matching torch.optim's formulas,
    with a learning rate and a step count per model and an ``active`` mask that freezes models."""

    def __init__(self, params: dict[str, torch.Tensor], hp: dict[str, Any], k: int):
        self.name = hp["optimizer"]
        if self.name not in ("Adam", "SGD", "RMSprop"):
            raise ValueError(f"unknown optimizer {self.name!r}")
        device = next(iter(params.values())).device
        self.weight_decay = float(hp["weight_decay"])
        self.momentum = float(hp.get("momentum", 0.0))
        self.lr = torch.full((k,), float(hp["lr"]), device=device)
        self.steps = torch.zeros(k, device=device)
        n_state = {"Adam": 2, "SGD": 1 if self.momentum else 0, "RMSprop": 2 if self.momentum else 1}[self.name]
        self.state = {n: [torch.zeros_like(p) for _ in range(n_state)] for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        # In-place updates whose coefficients are zero for frozen models (no torch.where copies):
        # the CPU path is bound by memory traffic, and on the GPU this is what the graph replays.
        on_k = active.to(self.lr.dtype)
        self.steps += on_k
        step = self.steps.clamp(min=1)  # frozen models may still be at step 0
        if self.name == "Adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            step_size_k = on_k * self.lr / (1 - beta1 ** step)
            bc2_sqrt_k = (1 - beta2 ** step).sqrt()
        for name, p in params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            on = on_k.view(shape)
            g = grads[name]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            state = self.state[name]
            if self.name == "Adam":
                m, v = state
                m.add_((g - m).mul_(on * (1 - beta1)))
                v.add_((g * g - v).mul_(on * (1 - beta2)))
                denom = v.sqrt().div_(bc2_sqrt_k.view(shape)).add_(eps)
                p.sub_(m.div(denom).mul_(step_size_k.view(shape)))
                continue
            lr = (on_k * self.lr).view(shape)
            if self.name == "SGD":
                direction = g
            else:
                alpha, eps = 0.99, 1e-8
                sq = state[0]
                sq.add_((g * g - sq).mul_(on * (1 - alpha)))
                direction = g / sq.sqrt().add_(eps)
            if self.momentum:
                buf = state[-1]
                buf.mul_(torch.where(on > 0, self.momentum, 1.0)).add_(direction * on)
                direction = buf
            p.sub_(direction * lr)


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


def _padded(indices: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index arrays of unequal length as one ``(K, n_max)`` array padded with 0, and their lengths."""
    sizes = torch.tensor([len(i) for i in indices], device=device)
    out = torch.zeros((len(indices), int(sizes.max())), dtype=torch.long, device=device)
    for k, idx in enumerate(indices):
        out[k, :len(idx)] = idx
    return out, sizes


def _per_sample_loss(task: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k, w = outputs.shape[:2]
    if task == "classification":
        return nn.functional.cross_entropy(outputs.reshape(k * w, -1), y.reshape(k * w), reduction="none").view(k, w)
    return nn.functional.mse_loss(outputs, y, reduction="none").reshape(k, w, -1).mean(dim=-1)


def train_stacked(
    models: list[nn.Module],
    data: Dataset,
    hp: dict[str, Any],
    *,
    folds: list[Fold],
    on_epoch: FoldCallback | None = None,
    cuda_graph: bool = True,
) -> StackedResult:
    """Train ``models[k]`` on ``folds[k]`` for every k, all at once, in place.

    Args:
        models: K models of one architecture, on the data's device (their initial weights are used).
        hp: resolved hyperparameters, as for ``hpo.train.train``.
        folds: K folds; each model is validated on its fold's ``val_idx``.
        on_epoch: called with ``(fold, epoch, stats)`` after every epoch of every running model.
        cuda_graph: capture the step in a CUDA graph when the data are on a CUDA device.

    Returns:
        One ``TrainResult`` per model (as ``train`` returns), and whether a CUDA graph ran.

    Raises:
        TrainingError: when a model's loss becomes NaN or infinite, or the models cannot be stacked.
    """
    start = time.perf_counter()
    problem = stack_problem(models)
    if problem is not None:
        raise TrainingError(f"cannot train these models stacked: {problem}")
    k, device, task = len(models), data.x.device, data.task
    batch_size, epochs, patience = int(hp["batch_size"]), int(hp["epochs"]), int(hp["early_stopping"])

    params, buffers = stack_module_state(models)
    names = list(params)
    base = copy.deepcopy(models[0]).to("meta")
    base.train()

    def one_model(p, b, x):
        return functional_call(base, (p, b), (x,))

    forward = vmap(one_model, randomness="different")
    optimizer = StackedOptimizer(params, hp, k)
    schedules = _Schedules(hp, k)
    x, y = data.x, data.y

    augment = batch_augmenter(data, hp)

    def step(idx: torch.Tensor, mask: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        xb = x[idx]
        if augment is not None:
            xb = augment(xb.flatten(0, 1)).view_as(xb)
        per = _per_sample_loss(task, forward(params, buffers, xb), y[idx]) * mask
        count = mask.sum(dim=1)
        losses = per.sum(dim=1) / count.clamp(min=1)
        grads = torch.autograd.grad(losses.sum(), [params[n] for n in names])
        optimizer.update(params, dict(zip(names, grads)), active & (count > 0))
        return per.sum(dim=1).detach()

    graphs: dict[int, tuple] = {}
    notes: list[str] = []
    use_graph = cuda_graph and device.type == "cuda"

    def graphed_step(idx, mask, active):
        nonlocal use_graph
        width = idx.shape[1]
        if width not in graphs:
            try:
                graphs[width] = _capture(step, k, width, device, buffers)
            except Exception as e:  # capture is an optimisation: any failure falls back to eager
                notes.append(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); ran eagerly")
                use_graph = False
                return step(idx, mask, active)
        graph, s_idx, s_mask, s_active, s_out = graphs[width]
        s_idx.copy_(idx)
        s_mask.copy_(mask)
        s_active.copy_(active)
        graph.replay()
        return s_out.clone()

    train_pos, n_train = _padded([f.train_idx for f in folds], device)
    val_pos, n_val = _padded([f.val_idx for f in folds], device)
    n_max = train_pos.shape[1]
    sizes = n_train.tolist()
    generators = [torch.Generator(device=device).manual_seed(f.seed) for f in folds]
    mask_all = (torch.arange(n_max, device=device)[None, :] < n_train[:, None]).to(x.dtype)

    results = [TrainResult() for _ in range(k)]
    active = [True] * k
    best_loss, since_best = [math.inf] * k, [0] * k
    best = None
    if patience:
        best = ({n: p.detach().clone() for n, p in params.items()}, {n: b.clone() for n, b in buffers.items()})
    improved = [False] * k

    for epoch in range(epochs):
        if not any(active):
            break
        rows = []
        for f in range(k):
            # The same draw as train(): one permutation per epoch from the fold's own generator.
            perm = torch.randperm(sizes[f], generator=generators[f], device=device)
            rows.append(torch.cat([train_pos[f, perm], train_pos[f, sizes[f]:]]))
        perms = torch.stack(rows)
        active_t = torch.tensor(active, device=device)
        totals = torch.zeros(k, device=device)
        for i in range(0, n_max, batch_size):
            args = (perms[:, i:i + batch_size], mask_all[:, i:i + batch_size], active_t)
            totals += graphed_step(*args) if use_graph else step(*args)
        train_losses = (totals / n_train).tolist()
        outputs = _predict_stacked(forward, base, params, buffers, x, val_pos)

        for f in range(k):
            if not active[f]:
                continue
            if not math.isfinite(train_losses[f]):
                raise TrainingError(f"fold {f}: training loss became {train_losses[f]} at epoch {epoch}; stopped (lower lr?)")
            val_idx = folds[f].val_idx
            val = score(task, outputs[f, :len(val_idx)], y[val_idx])
            stats = {"epoch": epoch, "train_loss": train_losses[f], **{f"val_{n}": v for n, v in val.items()},
                     "lr": schedules.lr(f)}
            results[f].history.append(stats)
            results[f].epochs_run = epoch + 1
            optimizer.lr[f] = schedules.step(f, val["loss"])
            if patience:
                if val["loss"] < best_loss[f]:
                    best_loss[f], since_best[f], improved[f] = val["loss"], 0, True
                    with torch.no_grad():
                        for n in names:
                            best[0][n][f].copy_(params[n][f])
                        for n in buffers:
                            best[1][n][f].copy_(buffers[n][f])
                else:
                    since_best[f] += 1
            if on_epoch is not None:
                on_epoch(f, epoch, stats)
            if patience and since_best[f] >= patience:
                results[f].stopped_early = True
                active[f] = False

    seconds = time.perf_counter() - start
    for f, model in enumerate(models):
        restore = patience and improved[f]
        source_p, source_b = best if restore else (params, buffers)
        keys = set(model.state_dict())
        state = {n: t[f].detach().clone() for n, t in (*source_p.items(), *source_b.items()) if n in keys}
        model.load_state_dict(state)
        if restore:
            val_idx = folds[f].val_idx
            results[f].metrics = {f"val_{n}": v for n, v in evaluate(model, task, x[val_idx], y[val_idx]).items()}
        else:
            results[f].metrics = {n: v for n, v in results[f].history[-1].items() if n.startswith("val_")}
        results[f].seconds = seconds
    return StackedResult(results=results, cuda_graph=bool(graphs) and use_graph, notes=notes)


@torch.no_grad()
def _predict_stacked(forward, base: nn.Module, params, buffers, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Every model's outputs on its own rows ``x[positions[k]]``, in eval mode: ``(K, n, C)``."""
    base.eval()
    try:
        width = max(1, EVAL_BATCH // positions.shape[0])
        return torch.cat([forward(params, buffers, x[positions[:, i:i + width]])
                          for i in range(0, positions.shape[1], width)], dim=1)
    finally:
        base.train()


def _capture(step, k: int, width: int, device: torch.device, buffers: dict[str, torch.Tensor]):
    """Capture ``step`` for batches of ``width`` samples in a CUDA graph.

    Warm-up runs use an all-false ``active`` mask, so they leave weights and optimizer state as they
    were; batch-norm buffers, which a forward pass updates regardless, are restored afterwards.
    """
    s_idx = torch.zeros((k, width), dtype=torch.long, device=device)
    s_mask = torch.ones((k, width), device=device)
    s_active = torch.zeros(k, dtype=torch.bool, device=device)
    saved = {n: b.clone() for n, b in buffers.items()}
    with side_stream(device):
        for _ in range(WARMUP_STEPS):
            step(s_idx, s_mask, s_active)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = step(s_idx, s_mask, s_active)
    for n, b in buffers.items():
        b.copy_(saved[n])
    return graph, s_idx, s_mask, s_active, s_out
