"""The training loop. It takes a plain per-epoch callback and never imports optuna, so the
objective (which reports and prunes) and the k-fold retrain reuse it unchanged.

The data are already on the device; batches are taken by index from a seeded permutation,
with no DataLoader and no per-sample work on the CPU. Two paths run the same batches:
- ``cuda_graph``: on a CUDA device the whole step (forward, loss, backward, optimizer update,
  augmentation included) is captured once per batch shape in a CUDA graph and replayed, with
  capturable optimizers and static input buffers filled by ``index_select``;
- ``eager``: the same step run op by op, on the CPU always and on CUDA when capture is not
  possible (the reason is recorded in ``TrainResult.path_reason``).
No per-step host syncs: the training loss is summed on the device and read once per epoch.

Checkpoints: at every epoch boundary where training goes on, ``train`` offers its whole state
(``hpo.training.state.TrainState``) to a ``checkpoint`` callback, which saves it when it wants to;
``train(..., resume=state)`` continues from such a state, on the CPU bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from hpo.data.dataset import Dataset
from hpo.errors import TrainingError
from hpo.training import state as train_state
from hpo.training.optim import make_optimizer, make_scheduler, step_scheduler
from hpo.training.seeds import batch_reseed
from hpo.training.state import TrainState

EVAL_BATCH = 8192
WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy optimizer state, cuDNN autotuning)

EpochCallback = Callable[[int, dict[str, float]], None]
# (epochs done, a function returning the trainer's state now): saves the state when it wants to
CheckpointCallback = Callable[[int, Callable[[], TrainState]], None]
Step = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class TrainResult:
    """What :func:`train` returns for one model: its per-epoch ``history`` (one dict per epoch:
    ``epoch``, ``train_loss``, ``val_loss``, ``val_<metric>``, ...), the validation ``metrics`` of
    the model returned (the best epoch's weights under early stopping), how many epochs ran
    (counting those before a resume), the wall time of this run in seconds, and which path
    trained it (``cuda_graph`` or ``eager``, with the reason for eager)."""

    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # of the returned model, on the validation data
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    path: str = "eager"  # "cuda_graph" | "eager"
    path_reason: str = ""  # why the eager path ran, when it did
    resumed_from_epoch: int = 0  # epochs done before this run (resumed from a checkpoint)


def loss_function(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


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


def graph_problem(device: torch.device, hp: dict[str, Any]) -> str:
    """Why the training step cannot be captured in a CUDA graph here ("" when it can be tried)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the data are on {device.type}"
    if hp["optimizer"] == "SGD" and hp["scheduler"] != "none":
        return "SGD reads its lr on the host, so an lr scheduler could not reach a captured step"
    return ""


def batch_augmenter(data: Dataset, hp: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The on-device augmentation when ``hp["augment"]`` is on, else None.

    Raises:
        TrainingError: when augmentation is asked for on data that are not images.
    """
    if not hp.get("augment"):
        return None
    if len(data.in_shape) != 3:
        raise TrainingError(f"augment: true needs image data (channels, height, width), got input shape {data.in_shape}")
    from hpo.data.images import make_augmenter

    return make_augmenter(data.normalization)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Put back saved weights in place (a captured graph keeps pointing at the same tensors) and
    zero the optimizer's state in place, which equals a fresh optimizer for Adam, RMSprop and SGD
    (SGD's first momentum buffer is the gradient itself, i.e. ``0 * momentum + grad``)."""
    for k, v in model.state_dict().items():
        v.copy_(saved[k])
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


def warm_up(step: Step, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *, steps: int = WARMUP_STEPS) -> None:
    """Run a few real steps so that lazily created state (optimizer moments, cuDNN plans) exists
    before capture; the caller restores the weights afterwards."""
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step(x, y)


def _cuda_capture(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph; returns its replay (which keeps the graph alive)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Warm-up before capture runs on a side stream (as torch.cuda.graph requires); no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


class _Graphs:
    """One captured step per batch size (the full batch and the last, shorter one), fed through
    static input buffers."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, model: nn.Module,
                 x: torch.Tensor, y: torch.Tensor, sizes: list[int]):
        self.x, self.y = x, y
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor, Callable[[], None]]] = {}
        saved = snapshot(model)
        try:
            with side_stream(x.device):
                for size in sizes:
                    warm_up(step, x[:size], y[:size], optimizer)
            for size in sizes:
                sx, sy = x[:size].clone(), y[:size].clone()
                # Gradients are allocated inside the graph's private pool and overwritten on replay.
                optimizer.zero_grad(set_to_none=True)
                self.buffers[size] = (sx, sy, _cuda_capture(functools.partial(step, sx, sy)))
        finally:
            restore(model, saved, optimizer)

    def run(self, idx: torch.Tensor) -> None:
        sx, sy, replay = self.buffers[len(idx)]
        torch.index_select(self.x, 0, idx, out=sx)
        torch.index_select(self.y, 0, idx, out=sy)
        replay()


def _fold_rows(data: Dataset, train_idx: torch.Tensor | None,
               val_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training and validation rows ``(x_train, y_train, x_val, y_val)`` (default: the data
    set's own split)."""
    train_idx = data.train_idx if train_idx is None else train_idx
    val_idx = data.val_idx if val_idx is None else val_idx
    return data.x[train_idx], data.y[train_idx], data.x[val_idx], data.y[val_idx]


def _make_step(model: nn.Module, loss_fn: nn.Module, augment: Callable[[torch.Tensor], torch.Tensor] | None,
               total: torch.Tensor, optimizer: torch.optim.Optimizer) -> Step:
    """The training step on one batch: forward (augmented), backward, optimizer update, and the
    batch's summed loss added to ``total`` on the device (no host sync)."""
    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss = loss_fn(model(augment(xb) if augment else xb), yb)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach() * len(xb))
    return step


@dataclass
class _Training:
    """The optimizer and scheduler of one run, and how it runs a batch given its indices into the
    training rows: replayed from a CUDA graph, or eagerly."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_batch: Callable[[torch.Tensor], None]
    path: str = "eager"
    path_reason: str = ""


def _eager_batches(step: Step, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def run_batch(idx: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        step(x[idx], y[idx])
    return run_batch


def _set_up_training(model: nn.Module, hp: dict[str, Any], make_step: Callable[[torch.optim.Optimizer], Step],
                     x: torch.Tensor, y: torch.Tensor, *, cuda_graph: bool) -> _Training:
    """The optimizer, scheduler and step: captured in CUDA graphs when that can be done here,
    else eager, with the reason."""
    reason = graph_problem(x.device, hp) if cuda_graph else "cuda_graph=False"
    if not reason:
        optimizer = make_optimizer(model.parameters(), hp, capturable=True)
        # The scheduler comes before capture: torch's scheduler tracks optimizer.step() through a
        # wrapper it installs on the optimizer, and the step captured (the one every replay runs)
        # must be that wrapped one. Made after capture, it never sees a step (replays run no
        # Python) and warns "lr_scheduler.step() before optimizer.step()" in every trial.
        scheduler = make_scheduler(optimizer, hp)
        try:
            n, batch_size = len(x), int(hp["batch_size"])
            sizes = sorted({min(batch_size, n), n % batch_size} - {0}, reverse=True)
            graphs = _Graphs(make_step(optimizer), optimizer, model, x, y, sizes)
            return _Training(optimizer, scheduler, graphs.run, path="cuda_graph")
        except Exception as e:  # capture refuses host syncs and some ops: fall back, and say why
            reason = f"capture failed: {type(e).__name__}: {e}"[:300]
    optimizer = make_optimizer(model.parameters(), hp)
    scheduler = make_scheduler(optimizer, hp)
    return _Training(optimizer, scheduler, _eager_batches(make_step(optimizer), optimizer, x, y), path_reason=reason)


@dataclass
class _EarlyStopping:
    """Early stopping on the validation loss: the best epoch's loss and weights, and the epochs
    since; ``patience`` 0 watches nothing and never stops."""

    patience: int
    best_loss: float = math.inf
    best_model: dict[str, torch.Tensor] | None = None
    since_best: int = 0

    def update(self, val_loss: float, model: nn.Module) -> None:
        if not self.patience:
            return
        if val_loss < self.best_loss:
            self.best_loss, self.since_best = val_loss, 0
            self.best_model = snapshot(model)
        else:
            self.since_best += 1

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience


def _resume(state: TrainState, model: nn.Module, training: _Training, generator: torch.Generator,
            stopping: _EarlyStopping, result: TrainResult, *, seed: int, device: torch.device) -> _EarlyStopping:
    """Put ``state`` back (after capture, into the very tensors the graphs read); the history goes
    on in ``result``. Returns early stopping as it stood."""
    train_state.put_back(state, model=model, optimizer=training.optimizer, scheduler=training.scheduler,
                         generator=generator, reseed=batch_reseed(seed, state.epoch), device=device)
    result.history = [dict(h) for h in state.history]
    result.epochs_run = result.resumed_from_epoch = state.epoch
    return replace(stopping, best_loss=state.best_loss, best_model=state.best_model, since_best=state.since_best)


def _train_epoch(training: _Training, total: torch.Tensor, generator: torch.Generator, *, n: int, batch_size: int,
                 epoch: int, device: torch.device) -> float:
    """One pass over the ``n`` training rows in the generator's random order; returns the mean
    training loss, read in one host sync.

    Raises:
        TrainingError: when it is NaN or infinite.
    """
    perm = torch.randperm(n, generator=generator, device=device)
    total.zero_()
    for i in range(0, n, batch_size):
        training.run_batch(perm[i:i + batch_size])
    train_loss = total.item() / n
    if not math.isfinite(train_loss):
        raise TrainingError(f"training loss became {train_loss} at epoch {epoch}; stopped (lower lr?)")
    return train_loss


def _final_metrics(model: nn.Module, task: str, x_val: torch.Tensor, y_val: torch.Tensor,
                   stopping: _EarlyStopping, history: list[dict[str, float]]) -> dict[str, float]:
    """The returned model's validation metrics: the best epoch's weights are put back first."""
    if stopping.best_model is not None:
        restore(model, stopping.best_model)
        return {f"val_{k}": v for k, v in evaluate(model, task, x_val, y_val).items()}
    if history:
        return {k: v for k, v in history[-1].items() if k.startswith("val_")}
    return {}


def train(
    model: nn.Module,
    data: Dataset,
    hp: dict[str, Any],
    *,
    seed: int,
    train_idx: torch.Tensor | None = None,
    val_idx: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
    cuda_graph: bool = True,
    resume: TrainState | None = None,
    checkpoint: CheckpointCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (already on the model's device).

    Args:
        hp: resolved hyperparameters (optimizer, lr, batch_size, epochs, scheduler, early_stopping,
            augment, ...).
        seed: seeds the batch order.
        train_idx, val_idx: index arrays into ``data.x`` (default: the data set's own split).
        on_epoch: called after every epoch with ``(epoch, stats)``; stats hold ``train_loss`` and
            ``val_<name>`` for every validation metric. It may raise to stop training (pruning).
        cuda_graph: try to capture the step in a CUDA graph on a CUDA device (False: always eager).
        resume: continue from this state (of the same model, data, ``hp`` and ``seed``): it is
            put back in place after the step is captured, and the epochs it has done are skipped.
        checkpoint: called after ``on_epoch`` at every epoch boundary where training goes on (not
            after the last epoch, nor when early stopping ends it) with ``(epochs done, state)``,
            ``state`` a function returning the trainer's :class:`~hpo.training.state.TrainState`
            (CPU copies; built only when called). It may raise to stop training.

    Returns:
        The history (the resumed state's included), the validation metrics of the final model
        (the best epoch's weights when early stopping is on), and which path ran (``path``,
        ``path_reason``).

    Raises:
        TrainingError: when the loss becomes NaN or infinite, or augmentation is asked for on non-images.
        ValueError: when ``resume`` does not fit the model.
    """
    start = time.perf_counter()
    device = data.x.device
    x_train, y_train, x_val, y_val = _fold_rows(data, train_idx, val_idx)
    n, batch_size, epochs = len(x_train), int(hp["batch_size"]), int(hp["epochs"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    total = torch.zeros((), device=device)  # the epoch's summed training loss
    make_step = functools.partial(_make_step, model, loss_function(data.task), batch_augmenter(data, hp), total)
    model.train()  # before capture: the graph bakes in train-mode dropout and batch-norm
    training = _set_up_training(model, hp, make_step, x_train, y_train, cuda_graph=cuda_graph)
    result = TrainResult(path=training.path, path_reason=training.path_reason)
    generator = torch.Generator(device=device).manual_seed(seed)
    stopping = _EarlyStopping(int(hp["early_stopping"]))
    if resume is not None:
        stopping = _resume(resume, model, training, generator, stopping, result, seed=seed, device=device)

    def state(done: int) -> TrainState:
        return train_state.capture(epoch=done, model=model, optimizer=training.optimizer, scheduler=training.scheduler,
                                   best_loss=stopping.best_loss, best_model=stopping.best_model,
                                   since_best=stopping.since_best, generator=generator, device=device,
                                   history=result.history)

    for epoch in range(result.resumed_from_epoch, epochs):
        train_loss = _train_epoch(training, total, generator, n=n, batch_size=batch_size, epoch=epoch, device=device)
        val = evaluate(model, data.task, x_val, y_val)
        stats = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
                 "lr": float(training.optimizer.param_groups[0]["lr"])}
        result.history.append(stats)
        result.epochs_run = epoch + 1
        step_scheduler(training.scheduler, val["loss"])
        stopping.update(val["loss"], model)
        if on_epoch is not None:
            on_epoch(epoch, stats)
        if stopping.stop:
            result.stopped_early = True
            break
        if checkpoint is not None and epoch + 1 < epochs:
            checkpoint(epoch + 1, functools.partial(state, epoch + 1))
    result.metrics = _final_metrics(model, data.task, x_val, y_val, stopping, result.history)
    result.seconds = time.perf_counter() - start
    return result
