"""The training loop. It takes a plain per-epoch callback and never imports optuna, so the
objective (which reports and prunes) and the k-fold retrain reuse it unchanged.

The data are already on the device; batches are taken by index from a seeded permutation,
with no DataLoader and no per-sample work on the CPU.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hpo.data import Dataset
from hpo.errors import TrainingError

EVAL_BATCH = 8192

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # of the returned model, on the validation data
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def loss_function(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def make_optimizer(params, hp: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = hp["optimizer"], float(hp["lr"]), float(hp["weight_decay"])
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=float(hp["momentum"]), weight_decay=wd)
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=float(hp["momentum"]), weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, hp: dict[str, Any]):
    if hp["scheduler"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=float(hp["plateau_factor"]), patience=int(hp["plateau_patience"]),
            cooldown=int(hp["plateau_cooldown"]))
    if hp["scheduler"] == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(hp["lr_decay"]))
    return None


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Model outputs for ``x`` in large batches, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.new_zeros((0,))
    model.train(was_training)
    return out


def score(task: str, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss and metrics of outputs against targets: mse/mae for regression, accuracy for classes."""
    if task == "classification":
        loss = nn.functional.cross_entropy(outputs, y).item()
        return {"loss": loss, "accuracy": (outputs.argmax(1) == y).float().mean().item()}
    mse = nn.functional.mse_loss(outputs, y).item()
    return {"loss": mse, "mse": mse, "mae": (outputs - y).abs().mean().item()}


def evaluate(model: nn.Module, task: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return score(task, predict(model, x), y)


def train(
    model: nn.Module,
    data: Dataset,
    hp: dict[str, Any],
    *,
    seed: int,
    train_idx: torch.Tensor | None = None,
    val_idx: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (already on the model's device).

    Args:
        hp: resolved hyperparameters (optimizer, lr, batch_size, epochs, scheduler, early_stopping, ...).
        seed: seeds the batch order.
        train_idx, val_idx: index arrays into ``data.x`` (default: the data set's own split).
        on_epoch: called after every epoch with ``(epoch, stats)``; stats hold ``train_loss`` and
            ``val_<name>`` for every validation metric. It may raise to stop training (pruning).

    Returns:
        The history, and the validation metrics of the final model (the best epoch's weights when
        early stopping is on).

    Raises:
        TrainingError: when the loss becomes NaN or infinite.
    """
    start = time.perf_counter()
    train_idx = data.train_idx if train_idx is None else train_idx
    val_idx = data.val_idx if val_idx is None else val_idx
    device = data.x.device
    x_train, y_train = data.x[train_idx], data.y[train_idx]
    x_val, y_val = data.x[val_idx], data.y[val_idx]
    n, batch_size, epochs = len(x_train), int(hp["batch_size"]), int(hp["epochs"])
    patience = int(hp["early_stopping"])

    loss_fn = loss_function(data.task)
    optimizer = make_optimizer(model.parameters(), hp)
    scheduler = make_scheduler(optimizer, hp)
    generator = torch.Generator(device=device).manual_seed(seed)

    result = TrainResult()
    best_loss, best_state, since_best = math.inf, None, 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator, device=device)
        total = torch.zeros((), device=device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        train_loss = total.item() / n
        if not math.isfinite(train_loss):
            raise TrainingError(f"training loss became {train_loss} at epoch {epoch}; stopped (lower lr?)")
        val = evaluate(model, data.task, x_val, y_val)
        stats = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
                 "lr": optimizer.param_groups[0]["lr"]}
        result.history.append(stats)
        result.epochs_run = epoch + 1

        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss"])
        elif scheduler is not None:
            scheduler.step()

        if patience:
            if val["loss"] < best_loss:
                best_loss, since_best = val["loss"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, stats)
        if patience and since_best >= patience:
            result.stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
        result.metrics = {f"val_{k}": v for k, v in evaluate(model, data.task, x_val, y_val).items()}
    else:
        result.metrics = {k: v for k, v in result.history[-1].items() if k.startswith("val_")}
    result.seconds = time.perf_counter() - start
    return result
