"""Which torch device a worker runs on: ``--gpu K`` or ``--device cpu|cuda|cuda:K``."""

from __future__ import annotations

import torch

from hpo.errors import HpoError


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
