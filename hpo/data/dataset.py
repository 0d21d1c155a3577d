"""The data set type every stage shares, and its seeded train/validation split: the whole set as
tensors (on the device, for workers), batches taken by index, splits as recorded index arrays."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
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


def split_indices(n: int, *, val_fraction: float, seed: int, labels: np.ndarray | None = None,
                  train_subset: int | None = None, val_subset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)`` (stratified when labels are given), optionally
    cut to subsets of the given sizes (the seeds searched on 10k/5k, then retrained on all)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, shuffle=True, stratify=labels)
    except ValueError:
        if labels is None:
            raise
        # A class too rare to stratify (a handful of rows): split without stratification.
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, shuffle=True)
    if train_subset is not None:
        train = train[:train_subset]
    if val_subset is not None:
        val = val[:val_subset]
    return np.sort(train), np.sort(val)
