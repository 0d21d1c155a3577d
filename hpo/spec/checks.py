"""Checks of a spec's values against their domains (``hpo.spec.domains``) and of its fields against
each other, each failing with one line: ``<file>: <field>: got <value>; allowed: <what>``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hpo.errors import SpecError
from hpo.spec.domains import Domain, domain_of, integer, number, show
from hpo.spec.hyperparams import HYPERPARAMETERS

if TYPE_CHECKING:
    from hpo.nn.family import Param

Vocabulary = Mapping[str, "Param"]  # a model's hyperparameters (hpo.nn.registry.vocabulary)


class Checker:
    """Builds one-line errors of the form ``<file>: <field>: got <value>; allowed: <what>``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: {where}: {message}")

    def refuse(self, where: str, value: Any, allowed: Any) -> SpecError:
        return self.fail(where, f"got {show(value)}; allowed: {allowed}")

    def mapping(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.refuse(where, value, "a mapping")
        return value

    def unknown_keys(self, d: dict, allowed: tuple[str, ...], where: str, what: str = "") -> None:
        for key in d:
            if key not in allowed:
                raise self.fail(f"{where}{key}" if where else key,
                                f"unknown key{what}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed) or 'none'}")

    def value(self, domain: Domain | str, value: Any, where: str | None = None) -> Any:
        """``value`` checked against a domain (or the domain of the field ``domain`` names); floats
        come back as floats and choices in their canonical spelling."""
        if isinstance(domain, str):
            domain, where = domain_of(domain), where or domain
        value = domain.canonical(value)
        if not domain.contains(value):
            hint = ""
            if domain.kind in ("int", "float") and isinstance(value, str) and _is_number(value):
                hint = f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-3)"
            raise self.refuse(where, value, f"{domain}{hint}")
        return float(value) if domain.kind == "float" and value is not None else value


def did_you_mean(key: object, allowed: Iterable[str]) -> str:
    """``; did you mean weight_decay?`` for a key close to one allowed (a typo), else ``""``."""
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.65) \
        or difflib.get_close_matches(key.lower(), list(allowed), n=1, cutoff=0.65)
    return f"; did you mean {close[0]}?" if close else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_value(c: Checker, vocab: Vocabulary, name: str, value: Any, where: str) -> Any:
    """Check one value of a hyperparameter of the model's vocabulary (scalar, or a list for per-layer ones)."""
    domain = domain_of(name, vocab[name].domain)
    if isinstance(value, list):
        if not vocab[name].per_layer:
            raise c.refuse(where, value, f"one value: {domain} ({name} is not a per-layer parameter)")
        if not value:
            raise c.refuse(where, value, f"one value, or a non-empty list (one per layer) of: {domain}")
        return [check_value(c, vocab, name, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return c.value(domain, value, where)


def known_name(c: Checker, vocab: Vocabulary, name: str, family: str, where: str) -> None:
    """Refuse a hyperparameter the model does not declare (naming the ones it does)."""
    if name in vocab:
        return
    hp = HYPERPARAMETERS.get(name)
    if hp is not None and hp.families is not None and family in ("mlp", "cnn"):
        raise c.fail(where, f"{name!r} does not apply to model {family!r} (only {', '.join(hp.families)})")
    builtin = family in ("mlp", "cnn")
    allowed = sorted(HYPERPARAMETERS) if builtin else sorted(vocab)
    of = "" if builtin else f" of model {family!r}"
    raise c.fail(where, f"unknown hyperparameter {name!r}{of}{did_you_mean(name, allowed)}; allowed: {', '.join(allowed)}")


def search_range(c: Checker, domain: Domain, name: str, kind: str, raw: dict, where: str) -> dict[str, Any]:
    """The bounds, step and log of ``int: [low, high]`` / ``float: [low, high]``, each inside the
    hyperparameter's ``domain``."""
    domain = domain_of(name, domain)
    bounds = raw[kind]
    if domain.kind in ("choice", "bool"):
        raise c.refuse(f"{where}.{kind}", bounds, f"choice: [...] of {domain} ({name} is categorical)")
    if kind == "float" and domain.kind == "int":
        raise c.refuse(f"{where}.float", bounds, f"int: [low, high] ({name} is an integer)")
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise c.refuse(f"{where}.{kind}", bounds, f"[low, high], each {domain}")
    inside = Domain(kind, domain.low, domain.high, domain.low_open, domain.high_open, note=domain.note)  # ints of a float domain too
    if not all(inside.contains(b) for b in bounds):
        raise c.refuse(f"{where}.{kind}", bounds, f"[low, high], each {inside}")
    low, high = (float(b) if kind == "float" else b for b in bounds)
    if not low < high:
        raise c.refuse(f"{where}.{kind}", bounds, f"low < high (for a fixed value use fixed.{name})")
    log = c.value("space.log", raw.get("log", False), f"{where}.log")
    if log and low <= 0:
        raise c.refuse(f"{where}.{kind}", bounds, "low > 0 with log: true")
    step = raw.get("step")
    if step is not None:
        span = high - low
        c.value(integer(1, span) if kind == "int" else number(0, span, low_open=True), step, f"{where}.step")
        if log:
            raise c.refuse(f"{where}.step", step, "no step with log: true (Optuna samples either)")
    return {"low": low, "high": high, "step": step, "log": log}


def check_references(c: Checker, space: tuple, fixed: dict) -> None:
    """Conditions and layer counts must refer to parameters defined earlier (or fixed)."""
    seen: dict[str, Any] = {}  # name -> the space's ParamSpec
    for p in space:
        for other, allowed in p.when.items():
            where = f"space.{p.name}.when.{other}"
            if other in seen:
                ref = seen[other]
                if ref.kind == "choice":
                    for v in allowed:
                        if v not in ref.choices:
                            raise c.fail(where, f"{v!r} is not among {other}'s choices {list(ref.choices)}")
            elif other not in fixed:
                raise c.fail(where, f"{other!r} must be searched above {p.name!r} or fixed")
        if p.per_layer:
            where = f"space.{p.name}.per_layer"
            ref = seen.get(p.per_layer)
            if ref is not None:
                if ref.kind != "int" and not (ref.kind == "choice" and all(isinstance(v, int) for v in ref.choices)):
                    raise c.fail(where, f"{p.per_layer!r} must be an integer parameter")
            elif not isinstance(fixed.get(p.per_layer), int):
                raise c.fail(where, f"{p.per_layer!r} must be searched above {p.name!r} or fixed to an integer")
        seen[p.name] = p


def check_layer_lists(c: Checker, vocab: Vocabulary, space: tuple, fixed: dict) -> None:
    """A per-layer list (fixed, a choice, or the default such as filters [6, 16]) must have one
    value per layer for every layer count the study can draw; a count of 0 needs none."""
    searched = {p.name: p for p in space}
    for name, param in vocab.items():
        count = param.per_layer
        if count is None:
            continue
        if count in searched:
            p = searched[count]
            where, given = f"space.{count}", list(p.choices) if p.kind == "choice" else [p.low, p.high]
            counts = list(p.choices) if p.kind == "choice" else range(int(p.low), int(p.high) + 1, int(p.step or 1))
        else:
            where, given = f"fixed.{count}", fixed.get(count, vocab[count].default)
            counts = [given]
        if name in fixed:
            lists = [(f"fixed.{name}", fixed[name])]
        elif name in searched:
            lists = [(f"space.{name}.choice[{i}]", v) for i, v in enumerate(searched[name].choices)]
        else:
            lists = [(None, param.default)]
        for list_where, values in lists:
            if not isinstance(values, list):
                continue
            misfit = next((n for n in counts if n and n != len(values)), None)
            if misfit is None:
                continue
            if list_where is None:
                raise c.refuse(where, given, f"{len(values)}, the length of the default {name} {show(values)} "
                                             f"(or give {name} one value for every layer, or a list per layer)")
            raise c.refuse(list_where, values, f"one value for every layer, or one per layer ({count} can be {misfit})")
