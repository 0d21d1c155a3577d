"""The data set type every stage shares: the whole set as tensors (on the device, for workers),
batches taken by index, splits as recorded index arrays (``hpo.data.splits``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Dataset:
    """Training pool (``x``/``y``, split into ``train_idx``/``val_idx``) and a held-out test set."""

    task: str
    x: torch.Tensor
    y: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    in_shape: tuple[int, ...]
    out_features: int
    classes: tuple[str, ...] = ()
    normalization: dict = field(default_factory=dict)  # raw x -> (x * scale - mean) / std; scale defaults to 1

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("x", "y", "train_idx", "val_idx", "x_test", "y_test")})
