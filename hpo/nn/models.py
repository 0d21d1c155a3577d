"""Model builders. They take resolved hyperparameters and shapes; they know nothing of training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpo.errors import TrainingError
from hpo.nn import registry
from hpo.nn.layers import activation, init_weights, per_layer


def build_mlp(hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int) -> nn.Sequential:
    """An MLP: ``n_layers`` hidden layers of ``width[i]`` units, each followed by ``activation[i]``
    and ``dropout[i]``; the input is flattened, so images work too."""
    n = int(hp["n_layers"])
    widths = per_layer(hp["width"], n, "width")
    dropouts = per_layer(hp["dropout"], n, "dropout")
    activations = per_layer(hp["activation"], n, "activation")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(in_shape)
    for width, p, act in zip(widths, dropouts, activations):
        layers += [nn.Linear(fan_in, int(width)), activation(act)]
        if p > 0:
            layers.append(nn.Dropout(p))
        fan_in = int(width)
    layers.append(nn.Linear(fan_in, out_features))
    model = nn.Sequential(*layers)
    init_weights(model, hp["init"], activations[0] if activations else "relu")
    return model


def build_model(family: str, hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """Build the network of one installed model family (``hpo.nn.registry``) from resolved hyperparameters.

    Raises:
        TrainingError: when the hyperparameters do not fit the input (e.g. an image shrinks below 1x1),
            or the family's builder gives no ``nn.Module``.
        SpecError: when the family is not installed (one line naming it).
    """
    model = registry.family(family).build(hp, in_shape=tuple(in_shape), out_features=int(out_features))
    if not isinstance(model, nn.Module):
        raise TrainingError(f"model family {family!r}: build() gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def rebuild(info: dict[str, Any], weights_path: str | Path) -> nn.Module:
    """A retrained fold model from its ``model.json`` description and ``fold_<i>.pt`` state dict,
    read with ``weights_only=True``, on the CPU and in eval mode.

    Raises:
        TrainingError / ValueError: as ``build_model``; torch's errors for unreadable or unfitting weights.
    """
    model = build_model(info["family"], info["hyperparams"], in_shape=tuple(info["in_shape"]),
                        out_features=int(info["out_features"]))
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()
