"""hpo.store.trials.read_trials returns what Optuna's own read does, on every trial state and backend."""

from __future__ import annotations

import math

import optuna
from test_statistics import every_state

from hpo.store.storage import open_storage
from hpo.store.trials import read_trials


def comparable(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's fields with nan made equal to itself and dicts in key order."""
    def plain(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, dict):
            return sorted((k, plain(v)) for k, v in value.items())
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return {k: plain(v) for k, v in vars(trial).items()}


def test_read_trials_equals_optunas_read(any_url):
    storage = open_storage(any_url, heartbeat=False)
    study = optuna.create_study(study_name="read", storage=storage, sampler=optuna.samplers.RandomSampler(seed=2))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("device", "cpu")
    trial.set_user_attr("nested", {"a": [1, 2]})
    study.tell(trial, -math.inf)
    every_state(study, [0.3, math.inf, 0.1, 0.2])
    other = optuna.create_study(study_name="other", storage=storage)  # another study's trials stay out
    other.tell(other.ask(), 1.0)
    ours = read_trials(storage, storage.get_study_id_from_name("read"))
    theirs = study.get_trials()
    assert len(ours) == len(theirs) > 12
    assert [comparable(t) for t in ours] == [comparable(t) for t in theirs]
    assert {t.state for t in ours} == set(optuna.trial.TrialState)
