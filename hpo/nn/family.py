"""The public type of a model family: what a package gives hpo to make its networks searchable.

A package declares a family through the entry-point group ``hpo.models``::

    # pyproject.toml of the package
    [project.entry-points."hpo.models"]
    resnet_small = "mypkg.hpo_family:family"

    # mypkg/hpo_family.py
    from hpo.nn.family import Family, Param, integer, number

    def build(hp, *, in_shape, out_features):        # -> torch.nn.Module
        ...

    family = Family(
        name="resnet_small",
        hyperparameters={
            "blocks": Param(integer(1, 8), 2),
            "width": Param(integer(4, 512), 32, per_layer="blocks"),  # one value, or one per block
            "dropout": Param(number(0, 1, high_open=True), 0.0),
        },
        build=build,
        image_input=True,
    )

A spec then names it as it names the built-in ones (``model: resnet_small``) and may search or fix
the declared hyperparameters, besides the training ones every family shares (epochs, batch_size,
lr, optimizer, ... in ``hpo.spec.hyperparams``). Values are checked against the declared domains at
``create-study``, with the same one-line errors as the built-in families'. ``build`` gets every
hyperparameter resolved (defaults filled; a per-layer one as a scalar or a list of one value per
layer: ``hpo.nn.layers.per_layer`` broadcasts) and the input shape of one sample: ``(features,)``
for tables, ``(channels, height, width)`` for images.

The built-in ``mlp`` and ``cnn`` are declared the same way (``hpo.nn.builtin``, registered in
hpo's own pyproject). Free of torch: validating a spec stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpo.spec.domains import BOOL, Domain, integer, number, one_of

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BOOL", "Domain", "Family", "Param", "integer", "number", "one_of"]


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a family.

    Attributes:
        domain: its allowed values (``integer(low, high)``, ``number(low, high, log-free bounds)``,
            ``one_of((...))``, ``BOOL``): a fixed value, every choice and both ends of a search
            range must lie inside it.
        default: the value when a spec neither fixes nor searches it (inside ``domain``; for a
            per-layer parameter, a scalar or a list).
        per_layer: the name of the family's integer parameter that counts the layers this one
            belongs to (``width`` per ``blocks``), or None for a scalar.
    """

    domain: Domain
    default: Any
    per_layer: str | None = None


@dataclass(frozen=True)
class Family:
    """A model family: a name, its hyperparameters, and how to build a network from them.

    Attributes:
        name: what a spec's ``model:`` names (the entry point's name must be the same).
        hyperparameters: name -> :class:`Param`. Must not reuse a training setting's name.
        build: ``build(hp, *, in_shape, out_features) -> torch.nn.Module``; raise
            ``hpo.errors.TrainingError`` (one line) when the hyperparameters do not fit the input.
        image_input: the network takes images ``(channels, height, width)``; a spec on a table
            source is refused at create-study.
        stackable: its modules can be trained K at a time with ``torch.func`` (parameters and
            buffers stacked); False makes ``hpo retrain`` train them one after another, saying why.
        description: one line for ``hpo families``.
        check: optional ``check(spec) -> warning or None``, run by ``create-study`` on the parsed
            ``StudySpec`` (raise ``hpo.errors.SpecError`` when no configuration can work, e.g. the
            built-in cnn's layers never fit the images).
    """

    name: str
    hyperparameters: Mapping[str, Param]
    build: Callable[..., nn.Module]
    image_input: bool = False
    stackable: bool = True
    description: str = ""
    check: Callable[[Any], str | None] | None = field(default=None, repr=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.hyperparameters.items()}
