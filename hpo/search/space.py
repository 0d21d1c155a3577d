"""The spec's search space turned into ``trial.suggest_*`` calls: the only module that calls them.

Parameter names are predictable: a scalar parameter keeps its name (``lr``), a per-layer one gets
``<name>_l<i>`` (``width_l0``, ``width_l1``), a ``search`` schedule adds ``<name>_schedule``.
"""

from __future__ import annotations

from typing import Any

import optuna

from hpo.nn.registry import resolved
from hpo.spec.schema import FAMILY, ParamSpec, StudySpec


def _suggest_one(trial: optuna.trial.BaseTrial, p: ParamSpec, name: str, high: float | None = None) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(name, list(p.choices))
    high = p.high if high is None else high
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, high, step=p.step, log=p.log)


def _suggest_layers(trial: optuna.trial.BaseTrial, p: ParamSpec, n: int) -> list:
    schedule = p.schedule
    if schedule == "search":
        schedule = trial.suggest_categorical(f"{p.name}_schedule", ["constant", "decreasing"])
    if schedule == "constant":
        return [_suggest_one(trial, p, p.name)] * n
    values: list = []
    for i in range(n):
        # "decreasing": each layer is at most as wide as the one before it (the seed's MNIST MLP).
        cap = values[-1] if schedule == "decreasing" and values else None
        if cap is not None and cap <= p.low:
            values.append(p.low)
            continue
        values.append(_suggest_one(trial, p, f"{p.name}_l{i}", cap))
    return values


def _active(p: ParamSpec, chosen: dict) -> bool:
    return all(chosen.get(k) in allowed for k, allowed in p.when.items())  # spellings canonical since parsing


def suggest(trial: optuna.trial.BaseTrial, spec: StudySpec) -> dict[str, Any]:
    """Sample one configuration: the fixed settings, then each searched parameter in spec order.

    Conditional parameters (``when``) are only suggested when their condition holds, so e.g.
    momentum never appears in an Adam trial. A searched family (``model: {choice: [...]}``) is
    drawn first, as the parameter ``model``; only its parameters follow, and ``hp["model"]`` names
    it. Returns the full hyperparameter dict, defaults filled.
    """
    chosen: dict[str, Any] = {}
    if spec.searches_family:
        chosen[FAMILY] = trial.suggest_categorical(FAMILY, list(spec.families))
        spec = spec.for_family(chosen[FAMILY])
    chosen.update(spec.fixed)
    for p in spec.space:
        if not _active(p, chosen):
            continue
        if p.per_layer:
            chosen[p.name] = _suggest_layers(trial, p, int(chosen[p.per_layer]))
        else:
            chosen[p.name] = _suggest_one(trial, p, p.name)
    return resolved(spec.families[0], chosen)


def hyperparams_from_params(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the hyperparameters of a finished trial from its recorded ``params``."""
    return suggest(optuna.trial.FixedTrial(params), spec)


def grid_space(spec: StudySpec) -> dict[str, list]:
    """The search space as StoreGridSampler wants it: every Optuna parameter name with its values."""
    grid: dict[str, list] = {}
    max_count = {p.name: (int(p.high) if p.kind == "int" else max(p.choices)) for p in spec.space if p.kind != "float"}
    max_count.update({k: v for k, v in spec.fixed.items() if isinstance(v, int)})
    for p in spec.space:
        if p.kind == "choice":
            values = list(p.choices)
        else:
            step = p.step or 1
            n = int(round((p.high - p.low) / step)) + 1
            values = [p.low + i * step for i in range(n)]
            values = [int(v) for v in values] if p.kind == "int" else values
        if p.per_layer:
            if p.schedule == "search":
                grid[f"{p.name}_schedule"] = ["constant", "decreasing"]
            if p.schedule in ("constant", "search"):
                grid[p.name] = values
            if p.schedule != "constant":  # a constant schedule suggests only the one shared value
                for i in range(max_count[p.per_layer]):
                    grid[f"{p.name}_l{i}"] = values
        else:
            grid[p.name] = values
    return grid
