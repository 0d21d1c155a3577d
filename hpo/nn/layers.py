"""Pieces every network builder shares: the activations by name, the broadcast of per-layer
settings, and weight initialisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpo.errors import TrainingError

ACTIVATIONS: dict[str, type[nn.Module]] = {  # hpo.spec.hyperparams.ACTIVATIONS, by name
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def per_layer(value: Any, n: int, name: str) -> list:
    """Broadcast a scalar to ``n`` layers; check a list has exactly ``n`` entries (none for no layers)."""
    if n == 0:
        return []
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise TrainingError(f"{name} has {len(value)} values for {n} layers: {list(value)}")
        return list(value)
    return [value] * n


def init_weights(model: nn.Module, scheme: str, activation_name: str = "relu") -> None:
    """Initialise every Linear/Conv layer: ``zero``, ``normal`` (std 0.01), ``glorot``, ``kaiming``.

    ``default`` keeps PyTorch's own initialisation. Biases start at zero for every other scheme.
    """
    if scheme == "default":
        return
    nonlinearity = "leaky_relu" if activation_name == "leaky_relu" else "relu"
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        with torch.no_grad():
            if scheme == "zero":
                module.weight.zero_()
            elif scheme == "normal":
                module.weight.normal_(0.0, 0.01)
            elif scheme == "glorot":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, nonlinearity=nonlinearity)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if module.bias is not None:
                module.bias.zero_()
