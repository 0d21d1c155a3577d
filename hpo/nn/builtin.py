"""hpo's own families, ``mlp`` and ``cnn``, declared as any package declares one (``hpo.nn.family``)
and registered through hpo's own pyproject (``[project.entry-points."hpo.models"]``).

Their hyperparameters come from the vocabulary tables (``hpo.spec.hyperparams``, ``hpo.spec.domains``),
so the tables stay the one place that says what they are. Importing this module imports no torch:
the builders are imported when a network is built.
"""

from __future__ import annotations

from typing import Any

from hpo.nn.family import Family, Param
from hpo.spec.domains import DOMAINS
from hpo.spec.hyperparams import DEFAULTS, HYPERPARAMETERS


def _params(name: str) -> dict[str, Param]:
    return {hp_name: Param(DOMAINS[hp_name], DEFAULTS[hp_name], (hp.layers or {}).get(name))
            for hp_name, hp in HYPERPARAMETERS.items() if hp.families is not None and name in hp.families}


def _build_mlp(hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int):
    from hpo.nn.models import build_mlp

    return build_mlp(hp, in_shape=in_shape, out_features=out_features)


def _build_cnn(hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int):
    from hpo.nn.cnn import build_cnn

    return build_cnn(hp, in_shape=in_shape, out_features=out_features)


def _check_cnn(spec) -> str | None:
    from hpo.nn.cnn import check_cnn_spec  # torch: only CNN specs pay its import

    return check_cnn_spec(spec)


mlp = Family(name="mlp", hyperparameters=_params("mlp"), build=_build_mlp,
             description="fully connected layers (n_layers x width), any input (flattened)")
cnn = Family(name="cnn", hyperparameters=_params("cnn"), build=_build_cnn, image_input=True, check=_check_cnn,
             description="LeNet-style conv blocks (n_conv x filters), then n_dense dense layers")
