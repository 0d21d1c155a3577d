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


PER_FEATURE_MAX = 256  # inputs of up to this many features get statistics per feature; larger ones (images) one set


def raw_input_stats(data: Dataset) -> dict:
    """Statistics of the training pool's inputs in raw units (before the stored normalisation), which
    an export keeps so that ``hpo predict`` can tell inputs on another scale.

    Returns:
        ``{"over": "feature" | "all", "count": rows, "min": [...], "max": [...], "mean": [...], "std": [...]}``:
        one value per feature for flat inputs of at most ``PER_FEATURE_MAX`` features, else one value over
        all values (every pixel of every image).
    """
    norm = data.normalization or {}
    x = data.x.float()
    per_feature = len(data.in_shape) == 1 and data.in_shape[0] <= PER_FEATURE_MAX
    shape = (1, *data.in_shape) if per_feature else (1, -1, *([1] * (len(data.in_shape) - 1)))
    # raw = (x * std + mean) / scale: the loaders' normalisation undone (per feature, or per channel for images)
    mean = torch.as_tensor(norm.get("mean", [0.0]), dtype=torch.float32, device=x.device).reshape(shape)
    std = torch.as_tensor(norm.get("std", [1.0]), dtype=torch.float32, device=x.device).reshape(shape)
    raw = (x * std + mean) / float(norm.get("scale", 1.0))
    raw = raw.reshape(len(raw), -1) if per_feature else raw.reshape(-1, 1)
    s, m = torch.std_mean(raw, dim=0, correction=0)
    return {"over": "feature" if per_feature else "all", "count": len(x),
            **{k: [round(float(v), 6) for v in t] for k, t in
               (("min", raw.min(dim=0).values), ("max", raw.max(dim=0).values), ("mean", m), ("std", s))}}
