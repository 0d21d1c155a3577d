"""The contract of Optuna's private API that hpo relies on (all of it lives in hpo/store/optuna_private.py).

Each check names what changed, so a newer Optuna that breaks hpo fails here, loudly, instead of
somewhere in a worker. Run it alone to try a newer Optuna: python -m pytest tests/store/test_optuna_private.py
"""

from __future__ import annotations

import inspect
import math

import optuna
import pytest
from optuna.trial import TrialState

from hpo.store import optuna_private

# The columns hpo's own SQL reads or writes, per table.
COLUMNS = {
    "STUDIES": ("study_id", "study_name"),
    "STUDY_DIRECTIONS": ("study_id", "direction", "objective"),
    "STUDY_USER_ATTRS": ("study_id", "key", "value_json"),
    "STUDY_SYSTEM_ATTRS": ("study_id", "key", "value_json"),
    "TRIALS": ("trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"),
    "TRIAL_PARAMS": ("trial_id", "param_name", "param_value", "distribution_json"),
    "TRIAL_VALUES": ("trial_id", "objective", "value", "value_type"),
    "TRIAL_INTERMEDIATE_VALUES": ("trial_id", "step", "intermediate_value", "intermediate_value_type"),
    "TRIAL_USER_ATTRS": ("trial_id", "key", "value_json"),
    "TRIAL_SYSTEM_ATTRS": ("trial_id", "key", "value_json"),
    "TRIAL_HEARTBEATS": ("trial_id", "heartbeat"),
}


def test_optuna_is_the_pinned_minor_release():
    major, minor = (int(x) for x in optuna.__version__.split(".")[:2])
    assert (major, minor) == (5, 0), (
        f"optuna {optuna.__version__} is installed; hpo is checked against 5.0. If this file passes on it, "
        "move the pin in pyproject.toml and this line together")


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_tables_have_the_columns_hpo_uses(name):
    table = getattr(optuna_private, name)
    missing = [c for c in COLUMNS[name] if c not in table.c]
    assert not missing, f"Optuna's table {table.name} lost column(s) {missing}"


def test_unique_keys_hpo_upserts_on():
    """Write-behind upserts and budget claims rely on these unique constraints."""
    def unique_sets(table):
        sets = {tuple(sorted(c.name for c in u.columns)) for u in table.constraints
                if u.__class__.__name__ == "UniqueConstraint"}
        return sets | {tuple(sorted(c.name for c in i.columns)) for i in table.indexes if i.unique}
    assert ("step", "trial_id") in unique_sets(optuna_private.TRIAL_INTERMEDIATE_VALUES)
    assert ("key", "trial_id") in unique_sets(optuna_private.TRIAL_USER_ATTRS)
    assert ("key", "study_id") in unique_sets(optuna_private.STUDY_SYSTEM_ATTRS)


def test_stored_value_forms():
    assert optuna_private.stored_intermediate_value(0.5)[0] == 0.5
    assert optuna_private.stored_intermediate_value(math.nan)[0] is None
    assert optuna_private.stored_intermediate_value(math.inf)[0] is None
    assert optuna_private.stored_trial_value(-math.inf)[0] is None


def test_study_and_trial_accessors():
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(optuna_private.study_id(study), int)
    assert isinstance(optuna_private.trial_id(trial), int)
    assert optuna_private.study_storage(study).get_trial(optuna_private.trial_id(trial)).number == trial.number
    trial.report(0.25, 1)
    frozen = optuna_private.cached_frozen_trial(trial)
    assert isinstance(frozen, optuna.trial.FrozenTrial), "Trial no longer caches its FrozenTrial"
    assert frozen.intermediate_values == {1: 0.25}, "Trial's cached FrozenTrial is not kept up to date"
    optuna_private.forget_cached_trials(study)
    assert len(study.trials) == 1


def test_in_optimize_says_when_study_stop_is_allowed():
    seen = []

    class Recording(optuna.samplers.RandomSampler):
        def after_trial(self, study, trial, state, values):
            # Told with Hyperband's per-bracket study, as the grid sampler's after_trial is.
            seen.append((type(study).__name__, optuna_private.in_optimize(study)))

    study = optuna.create_study(sampler=Recording(), pruner=optuna.pruners.HyperbandPruner(max_resource=4))
    study.optimize(lambda trial: 0.0, n_trials=1)
    study.tell(study.ask(), 0.0)
    assert seen == [("_BracketStudy", True), ("_BracketStudy", False)], (
        "Study no longer flags its optimize loop (_thread_local.in_optimize_loop), or Hyperband's "
        f"bracket study no longer keeps the study it filters as _study: {seen}")
    with pytest.raises(RuntimeError):
        study.stop()


def test_tell_without_reread():
    study = optuna.create_study()
    trial = study.ask()
    state, values, warning = optuna_private.tell(study, trial, 1.5, TrialState.COMPLETE)
    assert (state, values, warning) == (TrialState.COMPLETE, [1.5], None)
    # skip_if_finished: a trial finished elsewhere is left alone (its stored state comes back)
    state, _, warning = optuna_private.tell(study, trial, 2.0, TrialState.COMPLETE)
    assert state == TrialState.COMPLETE
    assert study.trials[0].value == 1.5
    params = inspect.signature(optuna.study._tell._tell_with_warning).parameters
    assert {"skip_if_finished", "suppress_warning"} <= set(params)


def test_rdb_storage_and_stored_values(tmp_path):
    assert optuna_private.rdb_storage(optuna.create_study()) is None
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'x.db'}")
    study = optuna.create_study(storage=storage)
    assert optuna_private.rdb_storage(study) is storage, "Optuna's cache no longer keeps the RDBStorage as _backend"
    for value in (0.25, math.inf, -math.inf):
        assert optuna_private.trial_value(*optuna_private.stored_trial_value(value)) == value


def test_hypervolume():
    # Two points of the unit square's corner to (2, 2): 1x2 + 2x1 - 1x1 overlap = 3.
    assert optuna_private.hypervolume([[1.0, 0.0], [0.0, 1.0]], [2.0, 2.0]) == pytest.approx(3.0)
