"""The optimizer and learning-rate scheduler a model trains with, built from its resolved
hyperparameters (torch.optim's Adam, SGD and RMSprop; ReduceLROnPlateau and ExponentialLR)."""

from __future__ import annotations

from typing import Any

import torch


def make_optimizer(params, hp: dict[str, Any], *, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``hp``.

    Args:
        capturable: build it for CUDA-graph capture: Adam/RMSprop with ``capturable=True`` and the
            lr as a device tensor that schedulers update in place. SGD keeps no host-side state and
            needs nothing (but its lr is then read on the host: see ``hpo.training.trainer.graph_problem``).
    """
    params = list(params)
    name, lr, wd = hp["optimizer"], float(hp["lr"]), float(hp["weight_decay"])
    extra: dict[str, Any] = {}
    if capturable and name in ("Adam", "RMSprop"):
        lr = torch.tensor(lr, device=params[0].device)
        extra["capturable"] = True
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **extra)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=float(hp["momentum"]), weight_decay=wd)
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=float(hp["momentum"]), weight_decay=wd, **extra)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, hp: dict[str, Any]):
    if hp["scheduler"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=float(hp["plateau_factor"]), patience=int(hp["plateau_patience"]),
            cooldown=int(hp["plateau_cooldown"]))
    if hp["scheduler"] == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(hp["lr_decay"]))
    return None


def step_scheduler(scheduler, val_loss: float) -> None:
    """One epoch's step: ReduceLROnPlateau watches the validation loss, the others just count."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()
