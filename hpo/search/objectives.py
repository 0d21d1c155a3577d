"""A trial's objectives and constraints: what it measures of its model, what it reports, how it is
judged, for studies of one objective or several (``spec.objectives``, ``spec.constraints``).

- Measures of the built model (``n_params`` always; ``latency_ms`` when an objective or a constraint
  names it, with the device it was timed on) are trial user attrs, set before any epoch.
- Constraints go through Optuna's ``trial.set_constraint`` (feasible when every value ≤ 0), so its
  samplers and ``study.best_trial`` / ``best_trials`` see them; the user attr ``feasible`` says the
  same for hpo's own queries (``hpo.store.statistics``). A constraint on a quantity known before
  training is checked before the first epoch: an infeasible configuration trains nothing and ends
  PRUNED with the reason (``pruned_by: "infeasible: n_params 2,304,010 > 100,000"``), its constraint
  values recorded, so TPE learns to avoid the region.
- Reports: Optuna takes no reports in a multi-objective study (``Trial.report`` raises), so there
  the learning metric's values by step go to the ``curve`` user attr, and the pruner is asked
  directly (``hpo.search.pareto``).
"""

from __future__ import annotations

import optuna
from torch import nn

from hpo.data.dataset import Dataset
from hpo.nn.measures import latency_ms, n_params
from hpo.search.pareto import CURVE_ATTR, PRUNED_BY_ATTR, ParetoPruner
from hpo.spec.schema import ConstraintSpec, StudySpec
from hpo.store import optuna_private
from hpo.training.trainer import TrainResult

FEASIBLE_ATTR = "feasible"


def _needs(spec: StudySpec, metric: str) -> bool:
    return metric in spec.metric_names or any(c.metric == metric for c in spec.constraints)


def measure_model(trial: optuna.Trial, spec: StudySpec, model: nn.Module, data: Dataset,
                  device_name: str) -> dict[str, float]:
    """The built model's measures (``n_params``; ``latency_ms`` when the study uses it), recorded as
    user attrs of ``trial``."""
    measures: dict[str, float] = {"n_params": n_params(model)}
    if _needs(spec, "latency_ms"):
        measures["latency_ms"] = round(latency_ms(model, data.in_shape, device=data.x.device), 4)
        trial.set_user_attr("latency_device", device_name)
    for key, value in measures.items():
        trial.set_user_attr(key, value)
    return measures


def _show(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def _violated(c: ConstraintSpec, value: float) -> str | None:
    if c.max is not None and value > c.max:
        return f"{c.metric} {_show(value)} > {_show(c.max)}"
    if c.min is not None and value < c.min:
        return f"{c.metric} {_show(value)} < {_show(c.min)}"
    return None


def _constrain(trial: optuna.Trial, spec: StudySpec, known: dict[str, float], *, final: bool) -> list[str]:
    """Record the constraint values of the metrics in ``known`` (a retry keeps its original's) and
    return what is violated; with ``final`` (all known), record ``feasible`` too."""
    if not spec.constraints:
        return []
    already = optuna_private.cached_frozen_trial(trial).constraints
    broken = []
    for c in spec.constraints:
        if c.metric not in known:
            continue
        for key, value in c.violations(known[c.metric]).items():
            if key not in already:
                trial.set_constraint(key, value)
        reason = _violated(c, known[c.metric])
        broken += [reason] if reason else []
    if broken or final:
        trial.set_user_attr(FEASIBLE_ATTR, not broken)
    return broken


def check_before_training(trial: optuna.Trial, spec: StudySpec, measures: dict[str, float]) -> None:
    """Check the constraints on what is known before training.

    Raises:
        optuna.TrialPruned: the configuration is infeasible (``pruned_by`` says why); no epoch runs.
    """
    broken = _constrain(trial, spec, measures, final=False)
    if broken:
        reason = "infeasible: " + "; ".join(broken)
        trial.set_user_attr(PRUNED_BY_ATTR, reason)
        trial.set_user_attr("epochs_run", 0)
        raise optuna.TrialPruned(reason)


def outcome(trial: optuna.Trial, spec: StudySpec, result: TrainResult,
            measures: dict[str, float]) -> float | list[float]:
    """The value (one objective) or values (several, in ``spec.objectives``' order) of a trained
    trial; the remaining constraints are recorded."""
    known = {**result.metrics, **measures, "train_seconds": round(result.seconds, 3)}
    _constrain(trial, spec, known, final=True)
    if not spec.multi_objective:
        return result.metrics[spec.metric]
    return [float(known[m]) for m in spec.metric_names]


def report(trial: optuna.Trial, spec: StudySpec, value: float, step: int) -> None:
    """Report the learning metric at ``step``: to Optuna, or (several objectives) to ``curve``."""
    if not spec.multi_objective:
        trial.report(value, step)
        return
    curve = dict(optuna_private.cached_frozen_trial(trial).user_attrs.get(CURVE_ATTR, {}))
    curve[str(step)] = float(value)
    trial.set_user_attr(CURVE_ATTR, curve)


def prune_reason(trial: optuna.Trial, spec: StudySpec) -> str | None:
    """Why the study's pruner prunes ``trial`` now, or ``None``."""
    pruner = trial.study.pruner
    if isinstance(pruner, ParetoPruner):
        return pruner.decide(trial.study, optuna_private.cached_frozen_trial(trial))
    if spec.multi_objective:
        return None  # spec checks allow only pareto and none here
    return spec.pruner.kind if trial.should_prune() else None
