"""The installed model families (entry-point group ``hpo.models``) and the distributions giving them.

The one path for every family, built-in or not: hpo's own ``mlp`` and ``cnn`` are entry points of
hpo's pyproject like any package's. Only installed entry points load; nothing in a spec or a store
names a module path, so a study can never make a worker import code it did not install.

Only the entry point a spec names is imported. A broken plugin (it fails to import, gives no
:class:`~hpo.nn.family.Family`, or declares a hyperparameter badly) does not break the others: it is
refused, with its reason, when a spec names it.

The API: :func:`names` (installed families, nothing imported), :func:`family` (the loaded
``Family``), :func:`entry` (with its distribution and version), :func:`vocabulary` (what a spec of
that family may search or fix, with domains and defaults), :func:`resolved` (a trial's
hyperparameters with the defaults filled), :func:`refresh` (forget what was found).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpo.errors import SpecError
from hpo.nn.family import Family, Param
from hpo.spec.domains import DOMAINS
from hpo.spec.hyperparams import DEFAULTS, HYPERPARAMETERS, resolve

GROUP = "hpo.models"
TRAINING = frozenset(name for name, hp in HYPERPARAMETERS.items() if hp.families is None)


@dataclass(frozen=True)
class Installed:
    """One entry point of a plugin group: its name, the distribution and version giving it, and the
    loaded object (None when it failed to load, with ``problem`` saying why)."""

    name: str
    distribution: str
    version: str
    value: str  # the entry point's "module:attribute", shown by `hpo families`
    obj: object | None
    problem: str = ""

    @property
    def provenance(self) -> dict[str, str]:
        """``{"name", "distribution", "version"}``: what a study records (names, never code)."""
        return {"name": self.name, "distribution": self.distribution, "version": self.version}


@functools.cache
def _entry_points(group: str) -> dict[str, tuple[md.EntryPoint, ...]]:
    found: dict[str, tuple[md.EntryPoint, ...]] = {}
    for ep in md.entry_points(group=group):
        found[ep.name] = found.get(ep.name, ()) + (ep,)
    return found


def group_names(group: str) -> tuple[str, ...]:
    """The names of every entry point of ``group`` (nothing is imported)."""
    return tuple(_entry_points(group))


@functools.cache
def load_entry(group: str, name: str, check: Callable[[str, object], str]) -> Installed | None:
    """The entry point ``name`` of ``group``, loaded (once per process) and checked by
    ``check(name, obj) -> problem or ""``; None when there is none. Only that entry point's module
    is imported. Two distributions giving one name make it unusable (which one would a worker load?).
    """
    eps = _entry_points(group).get(name)
    if not eps:
        return None
    dists = list(dict.fromkeys(ep.dist.name if ep.dist is not None else "?" for ep in eps))
    ep = eps[0]
    dist, version = dists[0], ep.dist.version if ep.dist is not None else "?"
    if len(dists) > 1:
        return Installed(name, dist, version, ep.value, None,
                         f"given by several distributions ({', '.join(dists)}): uninstall all but one")
    try:
        obj = ep.load()
    except Exception as e:  # a plugin's import error must not break hpo or the other plugins
        first = str(e).splitlines()[0] if str(e) else ""
        return Installed(name, dist, version, ep.value, None, f"cannot import {ep.value}: {type(e).__name__}: {first}")
    problem = check(name, obj)
    return Installed(name, dist, version, ep.value, None if problem else obj, problem)


def family_problem(name: str, obj: object) -> str:
    """Why ``obj`` is not a usable family named ``name``, or ""."""
    if not isinstance(obj, Family):
        return f"the entry point gives a {type(obj).__name__}, not an hpo.nn.family.Family"
    if obj.name != name:
        return f"the entry point is named {name!r} but its family {obj.name!r}"
    for hp_name, p in obj.hyperparameters.items():
        if hp_name in TRAINING:
            return f"hyperparameter {hp_name!r} is a training setting every family shares: rename it"
        if hp_name == "model":
            return "hyperparameter 'model' is reserved (the parameter of a searched family): rename it"
        if p.per_layer is not None:
            count = obj.hyperparameters.get(p.per_layer)
            if count is None or count.domain.kind != "int":
                return f"hyperparameter {hp_name!r}: per_layer {p.per_layer!r} is not an integer hyperparameter of the family"
        defaults = p.default if isinstance(p.default, list) and p.per_layer else [p.default]
        if not all(p.domain.contains(p.domain.canonical(v)) for v in defaults):
            return f"hyperparameter {hp_name!r}: default {p.default!r} is outside its domain ({p.domain})"
    return ""


def names() -> tuple[str, ...]:
    """The names of the installed families (usable or not), built-in first, the others sorted."""
    return tuple(sorted(group_names(GROUP), key=lambda n: (n not in ("mlp", "cnn"), n != "mlp", n)))


def installed() -> dict[str, Installed]:
    """Every installed family, loaded (``hpo families``)."""
    return {n: load_entry(GROUP, n, family_problem) for n in names()}


def entry(name: str) -> Installed:
    """The installed entry of family ``name``, loaded.

    Raises:
        SpecError: one line: the family is not installed (naming the installed ones) or is broken (why).
    """
    e = load_entry(GROUP, name, family_problem) if isinstance(name, str) else None
    if e is None:
        hint = ("; hpo's own families are missing too: reinstall hpo (pip install -e .)" if "mlp" not in names()
                else "; install the package that provides it (hpo families lists the installed ones)")
        raise SpecError(f"model family {name!r} is not installed (installed: {', '.join(names()) or 'none'}){hint}")
    if e.obj is None:
        raise SpecError(f"model family {name!r} from {e.distribution} {e.version} cannot be used: {e.problem}")
    return e


def family(name: str) -> Family:
    """The installed family ``name`` (see :func:`entry` for the errors)."""
    return entry(name).obj  # type: ignore[return-value]


def vocabulary(name: str) -> dict[str, Param]:
    """Every hyperparameter a spec of family ``name`` may search or fix: the training settings every
    family shares (``hpo.spec.hyperparams``), then the family's own.

    Raises:
        SpecError: as :func:`entry`.
    """
    own = family(name).hyperparameters
    return {**{n: Param(DOMAINS[n], DEFAULTS[n]) for n in HYPERPARAMETERS if n in TRAINING}, **own}


def resolved(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a network of family ``name`` is built and trained with: ``params`` over
    the defaults (for the built-in families, every default of ``hpo.spec.hyperparams``, as before
    the registry; per-layer scalars stay scalars, the builders broadcast).

    Raises:
        SpecError: as :func:`entry`.
    """
    if name in ("mlp", "cnn"):
        return resolve(params)
    return {**{n: DEFAULTS[n] for n in TRAINING}, **family(name).defaults, **params}


def refresh() -> None:
    """Forget what was found and loaded: the next look-up reads the installed entry points again
    (after a package is installed into a running process, e.g. in tests)."""
    _entry_points.cache_clear()
    load_entry.cache_clear()
