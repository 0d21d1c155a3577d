"""Data sources from installed entry points (group ``hpo.data``), like model families (``hpo.nn.registry``).

A package declares one as ``[project.entry-points."hpo.data"] my_source = "mypkg.data:source"``,
where ``source`` is a :class:`Source`. hpo's own ``npz``, ``image_folder`` and torchvision's files
of ``cifar10``, ``cifar100``, ``svhn`` and ``kmnist`` are registered the same way in hpo's pyproject.
(``csv``, ``fashion_mnist`` and ``mnist`` predate the registry and are read by ``hpo.data.sources``.)

A source is read once, at ``create-study``, into :class:`Arrays`; hpo keeps them in the store
(``hpo.data.arrays``), so workers need neither the files nor the source's package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hpo.nn.registry import Installed, group_names, load_entry

GROUP = "hpo.data"
LEGACY = ("csv", "fashion_mnist", "mnist")


@dataclass(frozen=True)
class Arrays:
    """A data set as NumPy arrays: training pool ``x``/``y`` and held-out ``x_test``/``y_test``.

    ``x``: images ``(N, channels, height, width)`` as uint8 pixels, or features ``(N, F)`` as floats.
    ``y``: class indices ``(N,)`` (int, 0..len(classes)-1) for classification, values ``(N,)`` for
    regression. ``classes``: the class names (empty for regression).
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """A data source a spec names as ``data.source``.

    Attributes:
        name: the name (the entry point's must be the same).
        read: ``read(*, train, test, data_dir) -> Arrays``: the spec's ``data.train``/``data.test``
            paths (resolved against the spec's folder; None when not given) and ``data.data_dir``.
            Raise ``hpo.errors.DataError`` with one line naming the file on bad input.
        paths: which of ``train``/``test`` the spec must give (none: files found under data_dir).
        tasks: the tasks its data serve (``classification``, ``regression``).
        description: one line for ``hpo families``.
    """

    name: str
    read: Callable[..., Arrays]
    paths: tuple[str, ...] = ("train", "test")
    tasks: tuple[str, ...] = ("classification",)
    description: str = ""


def source_problem(name: str, obj: object) -> str:
    if not isinstance(obj, Source):
        return f"the entry point gives a {type(obj).__name__}, not an hpo.data.registry.Source"
    if obj.name != name:
        return f"the entry point is named {name!r} but its source {obj.name!r}"
    return ""


def names() -> tuple[str, ...]:
    """Every data source a spec may name: the legacy ones, then the installed entry points."""
    return LEGACY + tuple(n for n in group_names(GROUP) if n not in LEGACY)


def entry(name: str) -> Installed:
    """The installed entry of source ``name``, loaded.

    Raises:
        DataError: it is not installed, or cannot be used (why), in one line.
    """
    from hpo.errors import DataError

    e = load_entry(GROUP, name, source_problem)
    if e is None:
        raise DataError(f"data source {name!r} is not installed (installed: {', '.join(names())}); "
                        "install the package that provides it")
    if e.obj is None:
        raise DataError(f"data source {name!r} from {e.distribution} {e.version} cannot be used: {e.problem}")
    return e


def source(name: str) -> Source:
    """The installed source ``name`` (see :func:`entry`)."""
    return entry(name).obj  # type: ignore[return-value]
