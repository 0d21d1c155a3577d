"""Grid studies: every point of the grid run once, however many workers share the study.

Optuna's ``GridSampler`` picks a trial's point (``grid_id``, an index into the grid as shuffled
by the sampler's seed) in ``before_trial``, after the trial was created, by reading which points
other trials hold. Workers that create trials at the same moment read the same answer and run the
same point twice (Optuna's documentation warns of it). Here the point is chosen in the transaction
that starts the trial and takes its budget place (:func:`hpo.store.budget.start_trial`), under the
study's lock: the lowest ``grid_id`` no trial of the study holds. A lone worker thus runs the
points in the order Optuna's own ``study.optimize`` would (trial k: ``grid_id`` k).

A retry (:func:`hpo.store.budget.fail_trial`) copies its original's system attrs and parameters, so it
re-runs the same point; Optuna's ``before_trial`` leaves a trial that carries a ``grid_id`` alone.

Every worker must shuffle the grid the same way: the grid's seed is the spec's, never a
per-worker one (see :func:`hpo.search.study.build_sampler`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.orm

from hpo.search.space import grid_space
from hpo.spec.schema import StudySpec
from hpo.store import optuna_private
from hpo.store.optuna_private import TRIAL_SYSTEM_ATTRS, TRIALS

GRID_ID_ATTR = "grid_id"  # trial system attrs Optuna's GridSampler reads: the point's index, and the grid
SEARCH_SPACE_ATTR = "search_space"


class StoreGridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` for trials started by hpo's workers.

    Differences: :meth:`point_attrs` gives a new trial its point inside the starting transaction,
    and :meth:`after_trial` calls ``study.stop()`` only inside ``study.optimize``. Optuna calls
    ``stop`` there once the grid is exhausted, which raises ``RuntimeError`` outside ``optimize``
    (hpo's workers tell trials outside it; ``stop`` is the only call on the tell path that Optuna
    allows only inside ``optimize``). A worker instead takes at most ``size`` budget places for
    the study and ends when they are gone (:func:`hpo.running.worker.run_worker`).

    Args:
        search_space: parameter name -> the values of that parameter in the grid.
        seed: shuffles the grid; every worker of a study must use the same one.
    """

    def __init__(self, search_space: dict[str, Sequence[Any]], *, seed: int):
        super().__init__(search_space, seed=seed)
        # As Optuna stores it in each trial (names sorted): its check of a trial's grid compares lists.
        self.search_space = {name: list(values) for name, values in sorted(search_space.items())}
        self.size = math.prod(len(values) for values in search_space.values())

    def point_attrs(self, session: sqlalchemy.orm.Session, study_id: int) -> dict[str, Any] | None:
        """The system attrs of a new trial: the lowest ``grid_id`` that no trial of ``study_id``
        holds, and the grid. ``None`` when every point is held.

        Run inside the transaction that creates the trial, after it took the study's lock (as
        :func:`hpo.store.budget.start_trial` does), so no other process picks a point meanwhile.
        """
        held = session.execute(sa.select(TRIAL_SYSTEM_ATTRS.c.value_json).join(
            TRIALS, TRIALS.c.trial_id == TRIAL_SYSTEM_ATTRS.c.trial_id).where(
            TRIALS.c.study_id == study_id, TRIAL_SYSTEM_ATTRS.c.key == GRID_ID_ATTR)).scalars()
        taken = {json.loads(value) for value in held}
        free = next((grid_id for grid_id in range(self.size) if grid_id not in taken), None)
        if free is None:
            return None
        return {SEARCH_SPACE_ATTR: self.search_space, GRID_ID_ATTR: free}

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        """Inside ``study.optimize``, Optuna's: stop the loop once the grid is exhausted. Outside
        it (hpo's workers), nothing: the end of the grid is the end of the study's budget places.
        (Optuna's own raises ``RuntimeError`` there: optuna/optuna issues #4121, #5141.)"""
        if optuna_private.in_optimize(study):
            super().after_trial(study, trial, state, values)


def grid_size(spec: StudySpec) -> int:
    """The number of points of a grid study's grid."""
    return math.prod(len(values) for values in grid_space(spec).values())


def trials_to_run(spec: StudySpec) -> int | None:
    """How many trials the study runs: ``budget.n_trials``, and for a grid study at most the
    grid's size (``None``: no limit)."""
    n_trials = spec.budget.n_trials
    if spec.sampler.kind != "grid":
        return n_trials
    size = grid_size(spec)
    return size if n_trials is None else min(n_trials, size)


def grid_note(spec: StudySpec) -> str | None:
    """One line for ``create-study`` when a grid study ends at its grid's size before its budget."""
    if spec.sampler.kind != "grid":
        return None
    size, n_trials = grid_size(spec), spec.budget.n_trials
    if n_trials is not None and n_trials <= size:
        return None
    budget = "no budget.n_trials" if n_trials is None else f"budget.n_trials is {n_trials}"
    trials = f"{size} trial{'s' * (size != 1)}"
    return f"the grid has {points(size)} and {budget}: the study ends after {trials}, one per point"


def points(n: int) -> str:
    """``n`` grid points, in words: "1 point", "18 points"."""
    return f"{n} point{'s' * (n != 1)}"
