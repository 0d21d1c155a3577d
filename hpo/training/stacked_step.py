"""One training step of K stacked models (the k-fold retrain's fast path), kept as lean as the
reference step in ``../shared/anchors/gpu_limit.py`` (10 LeNet-5 vmapped with ``torch.func``, the
step in one CUDA graph).

What the step does per batch: gather the K batches by index, one vmapped forward and backward,
one optimizer update over all K models' parameters at once, and add the K summed losses to a
device buffer. What it does not do: no host syncs, no per-model loops, no padding masks except on
the batches that hold padding (at most the last one or two of an epoch), no copies of the loss out.

Where it still differs from the reference, and why that must stay:
- the optimizer is written here, over one ``(K, P)`` buffer holding every model's parameters, not
  ``torch.optim``: torch.optim's Adam takes one lr per parameter group ("Tensor lr must be
  1-element") and keeps one step count per tensor, but the folds need an lr per model
  (ReduceLROnPlateau acts on each fold's own validation loss), a step count per model and a freeze
  mask (a model that stopped early, or whose batch is all padding, must not step). Written on one
  buffer it is 24 operators against foreach Adam's 8 over the 10 stacked tensors of a LeNet-5, and
  the whole step still launches no more kernels than the reference's (89 against 91, counted on
  the CPU by ``hpo.bench.ops``; benchmarks/README.md);
- the batch is gathered by index inside the step (the reference copies pre-gathered batches in):
  the same work, and it avoids holding a K x N copy of the data set per epoch;
- the loss is summed into a device buffer inside the step (one operator), so the epoch's training
  loss is read with the validation results in one host sync per epoch;
- ``grad(vmap(...))`` rather than the reference's ``vmap(grad(...))``: five operators more, but
  fewer kernels (the vmapped backward of ``vmap(grad)`` adds masks and copies).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from hpo.data.dataset import Dataset
from hpo.training.trainer import EVAL_BATCH, WARMUP_STEPS, batch_augmenter, side_stream

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch.optim.RMSprop's defaults


class StackedOptimizer:
    """Adam, SGD or RMSprop over stacked parameters ``(K, ...)``, matching torch.optim's formulas,
    with a learning rate (``lr``, shape ``(K,)``) and a step count (``steps``) per model and an
    ``active`` mask that freezes models.

    The parameters' storage moves into one ``(K, P)`` buffer (``flat``; each tensor of ``params``
    becomes a view of it, as apex's and Megatron's flat-buffer optimizers do), so an update is a
    dozen operators over the whole buffer whatever the number of parameter tensors.
    """

    def __init__(self, params: dict[str, torch.Tensor], hp: dict[str, Any], k: int):
        self.name = hp["optimizer"]
        if self.name not in ("Adam", "SGD", "RMSprop"):
            raise ValueError(f"unknown optimizer {self.name!r}")
        self.params, self.names, self.k = params, list(params), k
        tensors = list(params.values())
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(k, -1) for p in tensors], dim=1)
        offset = 0
        for p in tensors:
            size = p.numel() // k
            p.data = self.flat[:, offset:offset + size].view(p.shape)
            offset += size
        device = self.flat.device
        self.weight_decay = float(hp["weight_decay"])
        self.momentum = float(hp.get("momentum", 0.0))
        self.lr = torch.full((k,), float(hp["lr"]), device=device)
        self.steps = torch.zeros(k, device=device)
        n_state = {"Adam": 2, "SGD": 1 if self.momentum else 0, "RMSprop": 2 if self.momentum else 1}[self.name]
        self.state = [torch.zeros_like(self.flat) for _ in range(n_state)]

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        """One step of every active model.

        Args:
            params: the dict given at construction (its tensors are views of ``flat``).
            grads: a gradient of the shape of each parameter, by name.
            active: ``(K,)`` bool or 0/1 float; an inactive model's parameters, state and step
                count stay as they are.
        """
        if params is not self.params:
            raise ValueError("update() takes the params dict this optimizer was built with")
        k = self.k
        g = torch.cat([grads[n].reshape(k, -1) for n in self.names], dim=1)
        p = self.flat
        on_k = active.to(p.dtype)
        self.steps.add_(on_k)
        on = on_k[:, None]
        if self.weight_decay:
            g.add_(p, alpha=self.weight_decay)
        # Coefficients are zero for frozen models, so one in-place pass over the buffer serves all
        # (no torch.where copies): a frozen model's state and weights get + 0.
        if self.name == "Adam":
            (beta1, beta2), eps = ADAM_BETAS, ADAM_EPS
            m, v = self.state
            step = self.steps.clamp(min=1)[:, None]  # a frozen model may still be at step 0
            m.lerp_(g, on * (1 - beta1))
            v.lerp_(g.square(), on * (1 - beta2))
            step_size = self.lr[:, None] * on / (1 - beta1 ** step)
            denom = (v.sqrt() / (1 - beta2 ** step).sqrt()).add_(eps)
            p.addcdiv_(m * step_size, denom, value=-1)
            return
        direction = g
        if self.name == "RMSprop":
            square_avg = self.state[0]
            square_avg.lerp_(g.square(), on * (1 - RMSPROP_ALPHA))
            direction = g.div_(square_avg.sqrt().add_(RMSPROP_EPS))
        if self.momentum:
            buf = self.state[-1]
            buf.mul_(1 - on * (1 - self.momentum)).addcmul_(direction, on)
            direction = buf
        p.addcmul_(direction, (self.lr * on_k)[:, None], value=-1)


def per_sample_loss(task: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of every sample of K batches: outputs ``(K, W, C)`` -> ``(K, W)``."""
    k, w = outputs.shape[:2]
    if task == "classification":
        return nn.functional.cross_entropy(outputs.reshape(k * w, -1), y.reshape(k * w), reduction="none").view(k, w)
    return nn.functional.mse_loss(outputs, y, reduction="none").reshape(k, w, -1).mean(dim=-1)


class StackedStep:
    """The training step of K models of one architecture, stacked (``torch.func``), each on its
    own batch.

    ``params``/``buffers`` are the stacked ``(K, ...)`` tensors (views of ``optimizer.flat``);
    ``active`` ``(K,)`` (1.0 or 0.0) says which models step; ``totals`` ``(K,)`` sums each model's per-sample
    training losses since the caller last zeroed it. Call the step with ``idx`` ``(K, W)`` (indices
    into ``data.x``) and, for a batch holding padding, ``mask`` ``(K, W)`` (1 for a real sample).
    """

    def __init__(self, models: list[nn.Module], data: Dataset, hp: dict[str, Any]):
        self.k, self.task, self.device = len(models), data.task, data.x.device
        self.x, self.y = data.x, data.y
        self.params, self.buffers = stack_module_state(models)
        self.names = list(self.params)
        self.optimizer = StackedOptimizer(self.params, hp, self.k)
        self.active = torch.ones(self.k, device=self.device)  # 1.0 or 0.0: the optimizer's mask as is
        self.totals = torch.zeros(self.k, device=self.device)
        self.inverse_width: dict[int, torch.Tensor] = {}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.train()
        base = self.base

        def one_model(p, b, x):
            return functional_call(base, (p, b), (x,))

        self.forward = vmap(one_model, randomness="different")
        self.augment = batch_augmenter(data, hp)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        xb = self.x[idx]
        if self.augment is not None:
            xb = self.augment(xb.flatten(0, 1)).view_as(xb)
        per = per_sample_loss(self.task, self.forward(self.params, self.buffers, xb), self.y[idx])
        if mask is None:  # every model has a full batch of W samples
            width = idx.shape[1]
            if width not in self.inverse_width:
                self.inverse_width[width] = torch.full((self.k,), 1 / width, device=self.device)
            sums = per.sum(dim=1)
            weights, active = self.inverse_width[width], self.active
        else:
            sums, count = (per * mask).sum(dim=1), mask.sum(dim=1)
            weights, active = 1 / count.clamp(min=1), self.active * (count > 0)
        # Backward from the K sums weighted by 1/count: each model gets the gradient of its own
        # batch-mean loss (as train() computes it), without a scalar loss built on top.
        grads = torch.autograd.grad(sums, [self.params[n] for n in self.names], grad_outputs=weights)
        self.optimizer.update(self.params, dict(zip(self.names, grads)), active)
        self.totals.add_(sums.detach())

    def capture(self, shapes: list[tuple[int, bool]]) -> None:
        """Capture the step in a CUDA graph for each ``(width, masked)`` batch shape.

        Warm-up runs (on a side stream, as ``torch.cuda.graph`` asks) and the capture itself run
        with every model inactive, so weights, optimizer state and step counts stay as they were;
        batch-norm buffers, which a forward pass updates regardless, are put back afterwards.
        ``totals`` is left dirty: the caller zeroes it before each epoch.
        """
        active, saved = self.active.clone(), {n: b.clone() for n, b in self.buffers.items()}
        self.active.zero_()
        try:
            for width, masked in shapes:
                s_idx = torch.zeros((self.k, width), dtype=torch.long, device=self.device)
                s_mask = torch.ones((self.k, width), device=self.device) if masked else None
                with side_stream(self.device):
                    for _ in range(WARMUP_STEPS):
                        self(s_idx, s_mask)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self(s_idx, s_mask)
                self.graphs[(width, masked)] = (graph, s_idx, s_mask)
        finally:
            self.active.copy_(active)
            for n, b in self.buffers.items():
                b.copy_(saved[n])

    def run(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """The step: its captured graph when there is one for this shape, else eagerly."""
        captured = self.graphs.get((idx.shape[1], mask is not None))
        if captured is None:
            self(idx, mask)
            return
        graph, s_idx, s_mask = captured
        s_idx.copy_(idx)
        if mask is not None:
            s_mask.copy_(mask)
        graph.replay()

    @torch.no_grad()
    def predict(self, positions: torch.Tensor) -> torch.Tensor:
        """Every model's outputs on its own rows ``x[positions[k]]``, in eval mode: ``(K, n, C)``."""
        self.base.eval()
        try:
            width = max(1, EVAL_BATCH // self.k)
            return torch.cat([self.forward(self.params, self.buffers, self.x[positions[:, i:i + width]])
                              for i in range(0, positions.shape[1], width)], dim=1)
        finally:
            self.base.train()
