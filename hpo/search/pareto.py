"""Pareto sets and the Pareto pruner: pruning for studies of several objectives.

Optuna's pruners refuse multi-objective studies (optuna/optuna#3450). The rule here follows
Schmucker et al., "Multi-objective Asynchronous Successive Halving" (2021) and Syne Tune's MOASHA
in the asynchronous, median-like form: at a report step, a trial's *point* is its best value of the
learning metric so far (as Optuna's median pruner takes it) together with the objectives already
known before training (``n_params``, ``latency_ms``); each COMPLETE trial's point at that step is its
reported value at that step with its own known objectives. The trial is pruned when more than half
of those points dominate its own.

On one objective this is the median rule: with ``n`` values at the step, "more than half are
strictly better" is "worse than the median" for odd ``n``; for even ``n`` the two differ only for a
value strictly between the two middle values and at most the worse one, which the median rule prunes
(it is worse than their mean) and this rule keeps (only ``n/2`` are better).

Every worker decides from the store (the study's trials), so all of them decide alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError

CURVE_ATTR = "curve"  # trial user attr of a multi-objective study: {step: value} of the learning metric
PRUNED_BY_ATTR = "pruned_by"


def minimizing(values: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    """``values`` turned so that smaller is better in every coordinate."""
    return tuple(-float(v) if d == "maximize" else float(v) for v, d in zip(values, directions))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (both minimizing): no worse anywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points (minimizing) that no other point dominates; equal points all stay."""
    if not len(points):
        return []
    p = np.asarray(points, dtype=float)
    keep = []
    for i in range(len(p)):
        no_worse = np.all(p <= p[i], axis=1)
        better = np.any(p < p[i], axis=1)
        if not np.any(no_worse & better):
            keep.append(i)
    return keep


def reported(trial: FrozenTrial) -> dict[int, float]:
    """The learning metric by step: Optuna's intermediate values, or (a multi-objective study, where
    Optuna takes no reports) the ``curve`` user attr."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    return {int(k): float(v) for k, v in trial.user_attrs.get(CURVE_ATTR, {}).items()}


class ParetoPruner(optuna.pruners.BasePruner):
    """Prune a trial whose point is dominated by more than half of the COMPLETE trials' points at
    its latest step (see the module's docstring).

    Args:
        direction: the learning metric's (``minimize`` / ``maximize``).
        known: (metric, direction) of the objectives known before training, read from each
            trial's user attrs of that name (``hpo.search.objective`` records them).
        n_startup_trials: no pruning before this many trials are COMPLETE.
        n_warmup_steps: no pruning before this step.
        max_age: the COMPLETE trials are read afresh at a trial's first check and at most every
            ``max_age`` seconds after that (they change only when one completes).
    """

    def __init__(self, *, direction: str, known: Sequence[tuple[str, str]] = (), n_startup_trials: int = 5,
                 n_warmup_steps: int = 0, max_age: float = 1.0):
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError(f"n_startup_trials and n_warmup_steps must be >= 0, got {n_startup_trials}, "
                             f"{n_warmup_steps}")
        self.direction, self.known = direction, tuple(known)
        self.n_startup_trials, self.n_warmup_steps, self.max_age = n_startup_trials, n_warmup_steps, max_age
        self._complete: list[FrozenTrial] = []
        self._read_at, self._checking = -float("inf"), None

    def _complete_trials(self, study: optuna.Study, trial_number: int) -> list[FrozenTrial]:
        now = time.monotonic()
        if trial_number != self._checking or now - self._read_at > self.max_age:
            self._complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            self._read_at, self._checking = now, trial_number
        return self._complete

    def _point(self, trial: FrozenTrial, learning: float) -> tuple[float, ...] | None:
        values = [learning, *(trial.user_attrs.get(m) for m, _ in self.known)]
        if any(v is None for v in values):
            return None
        return minimizing(values, [self.direction, *(d for _, d in self.known)])

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """Why ``trial`` is pruned at its latest step (``"pareto: dominated by 5 of 8 complete
        trials at step 20"``), or ``None`` to keep it."""
        steps = reported(trial)
        if not steps:
            return None
        step = max(steps)
        if step < self.n_warmup_steps:
            return None
        complete = self._complete_trials(study, trial.number)
        if not complete or len(complete) < self.n_startup_trials:
            return None
        values = np.asarray(list(steps.values()), dtype=float)
        best = float(np.nanmax(values) if self.direction == "maximize" else np.nanmin(values)) \
            if not np.all(np.isnan(values)) else math.nan
        if math.isnan(best):
            return f"pareto: no finite value of the learning metric by step {step}"
        mine = self._point(trial, best)
        if mine is None:
            return None
        points = []
        for other in complete:
            at = reported(other).get(step)
            if at is None or math.isnan(at):
                continue
            point = self._point(other, at)
            if point is not None:
                points.append(point)
        if not points:
            return None
        n_better = sum(dominates(p, mine) for p in points)
        if 2 * n_better > len(points):
            return f"pareto: dominated by {n_better} of {len(points)} complete trials at step {step}"
        return None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.decide(study, trial) is not None


def needs_trial(study: optuna.Study, command: str) -> HpoError:
    """The one-line refusal of ``command`` without ``--trial`` on a study of several objectives,
    listing its Pareto trials (feasible ones only, as ``study.best_trials``)."""
    members = sorted(t.number for t in study.best_trials)
    listed = ", ".join(map(str, members)) if members else "none yet (no feasible COMPLETE trial)"
    return HpoError(f"--trial: study {study.study_name!r} has {len(study.directions)} objectives and no single best "
                    f"trial; choose one of its Pareto trials ({listed}): {command} --study {study.study_name} --trial N")
