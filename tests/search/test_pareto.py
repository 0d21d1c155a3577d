"""The Pareto pruner on a recorded history of real trials: on one objective it decides as Optuna's
median pruner; on two, a point dominated by more than half of the complete trials' points is
pruned and any other kept."""

from __future__ import annotations

import copy

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from test_objectives import spec_file
from test_parallel import create

from hpo.running.worker import run_worker
from hpo.search.pareto import ParetoPruner, dominates, non_dominated


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> list[optuna.trial.FrozenTrial]:
    """12 complete trials of the regression study (no pruning, random points, 10-30 epochs reported
    every 5): their learning curves and parameter counts."""
    tmp = tmp_path_factory.mktemp("history")
    url = f"sqlite:///{tmp / 'h.db'}"
    create(spec_file(tmp, "h", epochs=(10, 30), sampler={"kind": "random"}, pruner={"kind": "none"},
                     budget={"n_trials": 12}), url)
    run_worker("h", storage_url=url, echo=lambda line: None)
    trials = optuna.load_study(study_name="h", storage=url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    return trials


def cases(history):
    """(trial at a step, the other complete trials) for every trial and every step it reported."""
    for t in history:
        others = [o for o in history if o.number != t.number]
        for step in sorted(t.intermediate_values):
            at = copy.deepcopy(t)
            at.intermediate_values = {s: v for s, v in t.intermediate_values.items() if s <= step}
            at.state = TrialState.RUNNING
            yield at, others


def study_of(trials) -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    study.add_trials(trials)
    return study


def test_one_objective_is_the_median_rule(history):
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    pareto = ParetoPruner(direction="minimize", n_startup_trials=1, n_warmup_steps=0, max_age=0)
    decisions, differ = [], []
    for trial, others in cases(history):
        study = study_of(others)
        m, p = median.prune(study, trial), pareto.prune(study, trial)
        decisions.append(p)
        if m != p:
            differ.append((trial, others, m))
    assert any(decisions) and not all(decisions)  # both outcomes occur: the comparison means something
    # The one allowed difference: with an even count of values at the step, a best value above the
    # mean of the two middle values but no worse than the upper one. The median rule prunes it
    # (worse than the median), the Pareto rule keeps it (only half the values are better).
    for trial, others, median_pruned in differ:
        step = max(trial.intermediate_values)
        values = sorted(o.intermediate_values[step] for o in others if step in o.intermediate_values)
        best = min(trial.intermediate_values.values())
        k = len(values) // 2
        assert median_pruned and len(values) % 2 == 0
        assert (values[k - 1] + values[k]) / 2 < best <= values[k]


def test_two_objectives_dominated_by_more_than_half(history):
    """The learning metric with the parameter count, a known-before-training objective."""
    pareto = ParetoPruner(direction="minimize", known=[("n_params", "minimize")], n_startup_trials=1, max_age=0)
    outcomes = []
    for trial, others in cases(history):
        step = max(trial.intermediate_values)
        mine = (min(trial.intermediate_values.values()), trial.user_attrs["n_params"])
        points = [(o.intermediate_values[step], o.user_attrs["n_params"]) for o in others
                  if step in o.intermediate_values]
        better = sum(q[0] <= mine[0] and q[1] <= mine[1] and q != mine for q in points)
        pruned = pareto.prune(study_of(others), trial)
        assert pruned == (2 * better > len(points))
        outcomes.append(pruned)
    assert any(outcomes) and not all(outcomes)


def test_non_dominated_and_dominates():
    points = [(1, 5), (2, 2), (5, 1), (3, 3), (2, 2), (6, 6)]
    assert non_dominated(points) == [0, 1, 2, 4]
    assert dominates((2, 2), (3, 3)) and not dominates((2, 2), (2, 2)) and not dominates((1, 5), (5, 1))
    assert non_dominated(np.zeros((0, 2))) == []
