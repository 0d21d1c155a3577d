"""The vocabulary of hyperparameters a spec may search over or fix.

Each entry says which model families use it (``None``: every family, i.e. a training setting) and,
for one that may be given per layer, which count parameter says how many layers there are.
Allowed values are in ``hpo.spec.domains``. Kept free of torch and optuna so that validating a spec is
instant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hyperparameter:
    families: tuple[str, ...] | None = None
    layers: dict[str, str] | None = None  # per-layer: model family -> the count parameter (n_layers, ...)

    @property
    def per_layer(self) -> bool:
        return self.layers is not None


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
    "epochs": Hyperparameter(),
    "batch_size": Hyperparameter(),
    "lr": Hyperparameter(),
    "weight_decay": Hyperparameter(),
    "optimizer": Hyperparameter(),
    "momentum": Hyperparameter(),
    "scheduler": Hyperparameter(),
    "plateau_factor": Hyperparameter(),
    "plateau_patience": Hyperparameter(),
    "plateau_cooldown": Hyperparameter(),
    "lr_decay": Hyperparameter(),  # gamma of the exponential scheduler, per epoch
    "early_stopping": Hyperparameter(),  # patience in epochs on validation loss; 0 = off
    "augment": Hyperparameter(),
    # shared by the networks
    "activation": Hyperparameter(_ANY_NET, {"mlp": "n_layers"}),  # per layer in an MLP (the seed: selu, sigmoid)
    "init": Hyperparameter(_ANY_NET),
    # MLP
    "n_layers": Hyperparameter(_MLP),
    "width": Hyperparameter(_MLP, {"mlp": "n_layers"}),
    "dropout": Hyperparameter(_ANY_NET, {"mlp": "n_layers", "cnn": "n_dense"}),
    # CNN (LeNet-5 family)
    "n_conv": Hyperparameter(_CNN),
    "filters": Hyperparameter(_CNN, {"cnn": "n_conv"}),
    "kernel_size": Hyperparameter(_CNN),
    "padding": Hyperparameter(_CNN, {"cnn": "n_conv"}),  # one number pads the first conv only
    "batch_norm": Hyperparameter(_CNN),
    "pooling": Hyperparameter(_CNN),
    "conv_dropout": Hyperparameter(_CNN),
    "n_dense": Hyperparameter(_CNN),
    "dense_width": Hyperparameter(_CNN, {"cnn": "n_dense"}),
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

def resolve(params: dict) -> dict:
    """Fill defaults under explicit values; per-layer scalars stay scalars (the builders broadcast)."""
    out = dict(DEFAULTS)
    out.update(params)
    return out
