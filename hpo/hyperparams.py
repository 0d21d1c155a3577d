"""The vocabulary of hyperparameters a spec may search over or fix.

Each entry says the value type, the allowed values for categorical ones, whether it may be given
per layer, and which model families use it (``None``: every family, i.e. a training setting).
Kept free of torch and optuna so that validating a spec is instant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hyperparameter:
    type: type
    choices: tuple | None = None
    per_layer: bool = False
    families: tuple[str, ...] | None = None


OPTIMIZERS = ("Adam", "SGD", "RMSprop")
ACTIVATIONS = ("relu", "leaky_relu", "selu", "sigmoid", "tanh", "gelu")
INITS = ("default", "zero", "normal", "glorot", "kaiming")
SCHEDULERS = ("none", "plateau", "exponential")
POOLINGS = ("max", "avg", "stride2")

_MLP = ("mlp",)
_CNN = ("cnn",)
_ANY_NET = ("mlp", "cnn")

HYPERPARAMETERS: dict[str, Hyperparameter] = {
    # training (every family)
    "epochs": Hyperparameter(int),
    "batch_size": Hyperparameter(int),
    "lr": Hyperparameter(float),
    "weight_decay": Hyperparameter(float),
    "optimizer": Hyperparameter(str, OPTIMIZERS),
    "momentum": Hyperparameter(float),
    "scheduler": Hyperparameter(str, SCHEDULERS),
    "plateau_factor": Hyperparameter(float),
    "plateau_patience": Hyperparameter(int),
    "plateau_cooldown": Hyperparameter(int),
    "lr_decay": Hyperparameter(float),  # gamma of the exponential scheduler, per epoch
    "early_stopping": Hyperparameter(int),  # patience in epochs on validation loss; 0 = off
    "augment": Hyperparameter(bool),
    # shared by the networks
    "activation": Hyperparameter(str, ACTIVATIONS, families=_ANY_NET),
    "init": Hyperparameter(str, INITS, families=_ANY_NET),
    # MLP
    "n_layers": Hyperparameter(int, families=_MLP),
    "width": Hyperparameter(int, per_layer=True, families=_MLP),
    "dropout": Hyperparameter(float, per_layer=True, families=_ANY_NET),
    # CNN (LeNet-5 family)
    "n_conv": Hyperparameter(int, families=_CNN),
    "filters": Hyperparameter(int, per_layer=True, families=_CNN),
    "kernel_size": Hyperparameter(int, families=_CNN),
    "padding": Hyperparameter(int, per_layer=True, families=_CNN),  # one number pads the first conv only
    "batch_norm": Hyperparameter(bool, families=_CNN),
    "pooling": Hyperparameter(str, POOLINGS, families=_CNN),
    "conv_dropout": Hyperparameter(float, families=_CNN),
    "n_dense": Hyperparameter(int, families=_CNN),
    "dense_width": Hyperparameter(int, per_layer=True, families=_CNN),
}

DEFAULTS: dict[str, object] = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "optimizer": "Adam",
    "momentum": 0.0,
    "scheduler": "none",
    "plateau_factor": 0.5,
    "plateau_patience": 10,
    "plateau_cooldown": 0,
    "lr_decay": 0.97,
    "early_stopping": 0,
    "augment": False,
    "activation": "relu",
    "init": "default",
    "n_layers": 2,
    "width": 128,
    "dropout": 0.0,
    "n_conv": 2,
    "filters": [6, 16],
    "kernel_size": 5,
    "padding": 2,
    "batch_norm": False,
    "pooling": "max",
    "conv_dropout": 0.0,
    "n_dense": 2,
    "dense_width": [120, 84],
}

def canonical_choice(name: str, value: object) -> object:
    """Return the canonical spelling of a categorical value (case-insensitive match), else the value."""
    hp = HYPERPARAMETERS.get(name)
    if hp is None or hp.choices is None or not isinstance(value, str):
        return value
    for choice in hp.choices:
        if choice.lower() == value.lower():
            return choice
    return value


def resolve(params: dict) -> dict:
    """Fill defaults under explicit values; per-layer scalars stay scalars (the builders broadcast)."""
    out = dict(DEFAULTS)
    out.update(params)
    return out
