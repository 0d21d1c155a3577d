"""Warm starts: parameter sets put first in a study's queue (``hpo enqueue``), and the best
configurations of another study that fit this one's space (``create-study --warm-start``).

A set names Optuna parameters as the space suggests them (``lr``, ``n_layers``, ``width_l0``, a
``search`` schedule's ``width_schedule``); each value is checked against its range or choices, with
the usual one-line errors. Parameters a set leaves out are sampled. Enqueued sets are Optuna's
WAITING trials (``study.enqueue_trial``): a worker takes each in the transaction that gives it a
budget place (``hpo.store.budget.start_trial``), so each runs exactly once and counts against the
budget, before any new trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import SpecError
from hpo.spec.checks import Checker
from hpo.spec.domains import show
from hpo.spec.schema import FAMILY, ParamSpec, StudySpec


def _parameters(spec: StudySpec) -> dict[str, ParamSpec | None]:
    """Every Optuna parameter name the space can suggest, with its range (``None``: a schedule)."""
    counts = {p.per_layer for p in spec.space if p.per_layer}
    most = {p.name: int(p.high if p.kind == "int" else max(p.choices)) for p in spec.space if p.name in counts}
    most.update({k: int(v) for k, v in spec.fixed.items() if k in counts})
    names: dict[str, ParamSpec | None] = {}
    if spec.searches_family:  # drawn first (hpo.search.space)
        names[FAMILY] = ParamSpec(name=FAMILY, kind="choice", choices=spec.families)
    for p in spec.space:
        if not p.per_layer:
            names[p.name] = p
            continue
        if p.schedule == "search":
            names[f"{p.name}_schedule"] = None
        if p.schedule in ("constant", "search"):
            names[p.name] = p
        if p.schedule != "constant":
            names.update({f"{p.name}_l{i}": p for i in range(most.get(p.per_layer, 1))})
    return names


def _allowed(p: ParamSpec | None) -> str:
    if p is None:
        return "constant or decreasing"
    if p.kind == "choice":
        return ", ".join(show(c) for c in p.choices)
    return f"{'an integer' if p.kind == 'int' else 'a number'} in [{show(p.low)}, {show(p.high)}]"


def _fits(p: ParamSpec | None, value: Any) -> bool:
    if p is None:
        return value in ("constant", "decreasing")
    if p.kind == "choice":
        return any(value == c and type(value) is type(c) for c in p.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (p.kind == "int" and not isinstance(value, int)):
        return False
    return p.low <= value <= p.high


def misfit(spec: StudySpec, params: dict[str, Any]) -> tuple[str, Any, str] | None:
    """(name, value, what is allowed) of the first parameter of ``params`` outside ``spec``'s space."""
    names = _parameters(spec)
    for name, value in params.items():
        if name not in names:
            return name, value, f"a parameter of the space ({', '.join(names)})"
        if not _fits(names[name], value):
            return name, value, _allowed(names[name])
    return None


def read_sets(path: str | Path, spec: StudySpec) -> list[dict[str, Any]]:
    """The parameter sets of a YAML/JSON file (a list of mappings), each checked against ``spec``.

    Raises:
        SpecError: one line ``FILE: [i].NAME: got VALUE; allowed: ...``.
    """
    c = Checker(str(path))
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from e
    try:
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: malformed {'JSON' if str(path).endswith('.json') else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from e
    if not isinstance(raw, list) or not raw:
        raise c.refuse("top level", raw, "a non-empty list of parameter sets ({lr: 0.001, n_layers: 2, ...})")
    sets = []
    for i, item in enumerate(raw):
        item = c.mapping(item, f"[{i}]")
        bad = misfit(spec, item)
        if bad is not None:
            raise c.refuse(f"[{i}].{bad[0]}", bad[1], bad[2])
        sets.append(dict(item))
    return sets


def enqueue(study: optuna.Study, sets: list[dict[str, Any]]) -> int:
    """Queue ``sets`` (checked) as WAITING trials; returns how many."""
    for params in sets:
        study.enqueue_trial(params, skip_if_exists=False)
    return len(sets)


def best_sets(other: optuna.Study, spec: StudySpec, top: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The parameters of ``other``'s best ``top`` COMPLETE trials (one objective: by value; several:
    by Pareto rank, then trial number) that fit ``spec``'s space, and a line for each that does not."""
    complete: list[FrozenTrial] = other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(other.directions) == 1:
        sign = -1.0 if other.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        ranked = sorted(complete, key=lambda t: (sign * t.value, t.number))
    else:
        front = {t.number for t in other.best_trials}
        ranked = sorted(complete, key=lambda t: (t.number not in front, t.number))
    fitting, skipped = [], []
    for t in ranked[:top]:
        bad = misfit(spec, t.params)
        if bad is None:
            fitting.append(dict(t.params))
        else:
            skipped.append(f"trial {t.number}: {bad[0]}={show(bad[1])} does not fit (allowed: {bad[2]})")
    return fitting, skipped


def open_other(name: str, storage_url: str | None) -> optuna.Study:
    """Study ``name`` of the store at ``storage_url``, to warm-start from.

    Raises:
        StoreError: the store cannot be opened or has no such study.
    """
    from hpo.search.study import study_id
    from hpo.store.storage import open_storage

    storage = open_storage(storage_url, heartbeat=False)
    study_id(storage, name)
    return optuna.load_study(study_name=name, storage=storage)


def enqueue_file(study_name: str, path: str, *, storage_url: str | None = None) -> int:
    """``hpo enqueue``: check the sets of ``path`` against the study's space, then queue them all
    (nothing is queued when one is refused). Returns how many were queued.

    Raises:
        StoreError: no such study. SpecError: a set outside the space (one line naming it).
    """
    from hpo.search.study import open_study

    study, spec = open_study(study_name, storage_url)
    return enqueue(study, read_sets(path, spec))
