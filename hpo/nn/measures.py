"""What a built model costs before any training: its parameter count and its forward latency.
Objectives and constraints of a study (``n_params``, ``latency_ms``) read them; they know nothing of
training or of Optuna."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

LATENCY_BATCH = 256
LATENCY_WARMUP = 3
LATENCY_REPEATS = 15


def n_params(model: nn.Module) -> int:
    """Trainable and frozen parameters of ``model`` (buffers such as batch-norm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(model: nn.Module, in_shape: tuple[int, ...], *, device: torch.device,
               batch: int = LATENCY_BATCH, warmup: int = LATENCY_WARMUP, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time in milliseconds of one forward pass of a batch of ``batch`` random inputs of
    shape ``in_shape`` on ``device``, in eval mode, after ``warmup`` passes (on CUDA: synchronised,
    so the time is the kernels', not the launch's). The model is put back in its training mode."""
    was_training = model.training
    model.eval()
    # Its own generator: timing must not move the global stream the trial's training draws from.
    x = torch.randn((batch, *in_shape), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    times = []
    try:
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0
