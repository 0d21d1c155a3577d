"""Which torch device a worker runs on (``--gpu K`` or ``--device cpu|cuda|cuda:K``) and how its
GPU is shared with other workers."""

from __future__ import annotations

import os

import torch

from hpo.errors import HpoError
from hpo.running.mps import GPU_SHARING_ENV, GPU_SHARING_MODES


def resolve_device(*, gpu: int | None = None, device: str | None = None) -> torch.device:
    """Validate and return the device.

    Raises:
        HpoError: when both are given, the name is not a device, or the GPU index does not exist.
    """
    if gpu is not None and device is not None:
        raise HpoError("give either --gpu or --device, not both")
    name = f"cuda:{gpu}" if gpu is not None else (device or "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise HpoError(f"--device: {name!r} is not a device; use cpu, cuda or cuda:K") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise HpoError(f"--device: {name!r} is not supported; use cpu, cuda or cuda:K")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if dev.index is None else dev.index
    if index < 0 or index >= count:
        available = f"0..{count - 1}" if count else "none (no CUDA device visible)"
        raise HpoError(f"--gpu: GPU {index} does not exist; available: {available}")
    return torch.device("cuda", index)


def gpu_sharing(device: torch.device) -> str | None:
    """How the worker's GPU is shared: ``mps``, ``time-slice`` or ``exclusive``, as ``hpo fleet``
    (or whoever starts the worker) says in ``HPO_GPU_SHARING``; ``None`` on the CPU, or when unset
    or not one of those."""
    if device.type != "cuda":
        return None
    value = os.environ.get(GPU_SHARING_ENV, "").strip()
    return value if value in GPU_SHARING_MODES else None
