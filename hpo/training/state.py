"""The trainer's whole state at an epoch boundary, and putting it back: what a checkpoint holds.

Resuming from a :class:`TrainState` continues training exactly where it stopped (on the CPU, bit
for bit): the model's weights and buffers (batch-norm statistics), the optimizer's and scheduler's
state, early stopping (best loss and weights, epochs since the best), the batch-order generator,
torch's random number generators (dropout, augmentation) and the history so far.

Everything is put back *in place*, into the tensors the trainer already holds: a CUDA graph
captured before the restore reads fixed buffers (the weights, the optimizer's moments, a
capturable optimizer's lr tensor), so a restore must never swap a tensor for a new one. Sources:
PyTorch's notes on CUDA graphs ("replay reads and writes the same memory addresses"),
``Optimizer.state_dict`` / ``LRScheduler.state_dict``, ``torch.get_rng_state`` /
``torch.cuda.get_rng_state`` (a graph's random ops read the generator's seed and offset at each
replay, so restoring the generator's state is seen by the next replay) and
``torch.Generator.get_state``.

No optuna here: the trainer and the k-fold retrain both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FORMAT = 1


def cpu_copy(value: Any) -> Any:
    """A deep copy of a tensor or a state_dict-like value (dicts, lists, tuples of tensors and
    numbers) with every tensor copied to the CPU, once (safe to keep while training goes on)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


@dataclass
class TrainState:
    """The trainer after ``epoch`` epochs (``epoch`` is the number of epochs done).

    Tensors are CPU copies, safe to keep while training goes on. ``to_dict`` gives plain
    containers of tensors and numbers only, which ``torch.load(..., weights_only=True)`` reads.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    best_loss: float
    best_model: dict[str, torch.Tensor] | None
    since_best: int
    batch_order: torch.Tensor  # the batch-order generator's state
    rng: dict[str, torch.Tensor | None]  # {"cpu": ..., "cuda": ... or None}
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        """Raises:
            ValueError: when ``raw`` is not a trainer state of this format."""
        if raw.get("format") != FORMAT:
            raise ValueError(f"trainer state format {raw.get('format')!r}, expected {FORMAT}")
        try:
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"trainer state lacks {e.args[0]!r}") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's global generators: the CPU's, and the device's on CUDA (dropout and augmentation)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def set_generator_state(generator: torch.Generator, state: torch.Tensor, *, reseed: int) -> None:
    """Put back the batch-order generator. A state from another kind of device (a CPU generator's
    for a CUDA one, or the reverse) does not fit: the generator is seeded with ``reseed`` instead,
    so a trial moved across device types goes on with a batch order of its own."""
    try:
        generator.set_state(state)
    except RuntimeError:
        generator.manual_seed(reseed)


@torch.no_grad()
def load_model_in_place(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` into the model's own parameter and buffer tensors.

    Raises:
        ValueError: when the saved weights do not fit the model (other names or shapes).
    """
    current = model.state_dict()
    if set(current) != set(saved) or any(current[k].shape != saved[k].shape for k in current):
        raise ValueError("the saved weights do not fit this model")
    for k, v in current.items():
        v.copy_(saved[k])


@torch.no_grad()
def load_optimizer_in_place(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Put back ``optimizer.state_dict()`` as saved, into the optimizer's existing state tensors
    where it has them (a captured step reads them), else as new tensors where torch.optim would
    make them lazily ("step" on the CPU unless the group is capturable).

    Only the state and each group's ``lr`` are taken from ``saved``: the other group settings
    (``capturable``, ``foreach``, betas, ...) belong to the optimizer built here, which may differ
    in kind from the saved one's (a CUDA-graph run resumed on the CPU).

    Raises:
        ValueError: when the saved state does not fit (other parameter count or shapes).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in saved["param_groups"]) != len(params):
        raise ValueError("the saved optimizer state does not fit this model")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for i, p in enumerate(params):
        state = optimizer.state[p]
        for key, value in saved["state"].get(i, {}).items():
            current = state.get(key)
            if not isinstance(value, torch.Tensor):
                state[key] = value
            elif isinstance(current, torch.Tensor):
                if current.shape != value.shape:
                    raise ValueError(f"the saved optimizer state {key!r} does not fit this model")
                current.copy_(value)
            elif key == "step" and not group_of[id(p)].get("capturable", False):
                state[key] = value.to("cpu", copy=True)
            else:
                state[key] = value.to(p.device, copy=True)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        lr = saved_group["lr"]
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def load_scheduler(scheduler, saved: dict[str, Any] | None) -> None:
    """Put back a scheduler's counters (its lr lives in the optimizer, restored there)."""
    if scheduler is not None and saved is not None:
        scheduler.load_state_dict(saved)


def capture(*, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            best_loss: float, best_model: dict[str, torch.Tensor] | None, since_best: int,
            generator: torch.Generator, device: torch.device, history: list[dict[str, float]]) -> TrainState:
    """A :class:`TrainState` of the trainer's objects now (CPU copies)."""
    return TrainState(
        epoch=epoch, model=cpu_copy(model.state_dict()), optimizer=cpu_copy(optimizer.state_dict()),
        scheduler=cpu_copy(scheduler.state_dict()) if scheduler is not None else None,
        best_loss=best_loss if math.isfinite(best_loss) else math.inf,
        best_model=cpu_copy(best_model) if best_model is not None else None, since_best=since_best,
        batch_order=generator.get_state(), rng=rng_state(device),
        history=[dict(h) for h in history])


def put_back(state: TrainState, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             generator: torch.Generator, reseed: int, device: torch.device) -> None:
    """Put ``state`` back into the trainer's objects, in place: the model's weights and buffers, the
    optimizer's and scheduler's state, the batch-order generator (seeded with ``reseed`` when the
    saved one is of another kind of device) and torch's generators. Early stopping and the
    history are the caller's.

    Raises:
        ValueError: when the state does not fit the model or the optimizer.
    """
    load_model_in_place(model, state.model)
    load_optimizer_in_place(optimizer, state.optimizer)
    load_scheduler(scheduler, state.scheduler)
    set_generator_state(generator, state.batch_order, reseed=reseed)
    set_rng_state(state.rng, device)
