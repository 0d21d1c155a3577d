"""Every use of Optuna's private API, in one place.

hpo reads and writes Optuna's SQL schema directly where the public API would cost a round trip
per row (budget places, write-behind reports, aggregate statistics), and reaches into a few
private attributes of ``Study`` and ``Trial``. Nothing else in hpo may import an underscored
Optuna name: the rest of the package uses the public names below.

``tests/test_optuna_private.py`` checks every name this module takes from Optuna and fails naming
the one that changed. Optuna is pinned to the minor release that test passed on (pyproject); to
try a newer release, install it and run ``python -m pytest tests/test_optuna_private.py``.
"""

from __future__ import annotations

import optuna
from optuna.storages._rdb import models
from optuna.study._tell import _tell_with_warning

# Optuna's tables (SQLAlchemy Core), for queries that the storage API answers only row by row.
STUDIES = models.StudyModel.__table__
STUDY_DIRECTIONS = models.StudyDirectionModel.__table__
STUDY_USER_ATTRS = models.StudyUserAttributeModel.__table__
STUDY_SYSTEM_ATTRS = models.StudySystemAttributeModel.__table__
TRIALS = models.TrialModel.__table__
TRIAL_PARAMS = models.TrialParamModel.__table__
TRIAL_VALUES = models.TrialValueModel.__table__
TRIAL_INTERMEDIATE_VALUES = models.TrialIntermediateValueModel.__table__
TRIAL_USER_ATTRS = models.TrialUserAttributeModel.__table__
TRIAL_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
TRIAL_HEARTBEATS = models.TrialHeartbeatModel.__table__
METADATA = models.BaseModel.metadata


def stored_intermediate_value(value: float) -> tuple[float | None, object]:
    """``value`` as Optuna stores it: (number or None, its kind: finite, inf, -inf or nan)."""
    return models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)


def intermediate_value(stored: float | None, kind: object) -> float:
    """The reported value of a ``trial_intermediate_values`` row (its value and value-type columns)."""
    return models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(stored, kind)


def stored_trial_value(value: float) -> tuple[float | None, object]:
    """An objective value as Optuna stores it (same form as :func:`stored_intermediate_value`)."""
    return models.TrialValueModel.value_to_stored_repr(value)


def trial_value(stored: float | None, kind: object) -> float:
    """The objective value of a ``trial_values`` row (its ``value`` and ``value_type`` columns)."""
    return models.TrialValueModel.stored_repr_to_value(stored, kind)


def study_id(study: optuna.Study) -> int:
    """The store's id of ``study``."""
    return study._study_id


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The store's id of ``trial`` (unique across studies, unlike its number)."""
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage ``study`` talks to (Optuna's cache in front of an RDB store)."""
    return study._storage


def rdb_storage(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The SQL store behind ``study`` (Optuna wraps it in a cache), or None for any other storage."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def cached_frozen_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as read when the ``Trial`` was made, kept up to date by Optuna with its own
    suggestions, reports and attrs: no round trip."""
    return trial._cached_frozen_trial


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread cache of all trials (Optuna refills it at the next read)."""
    study._thread_local.cached_all_trials = None


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None,
         state: optuna.trial.TrialState) -> tuple[optuna.trial.TrialState, list[float] | None, str | None]:
    """``study.tell(trial, value, state, skip_if_finished=True)`` without its final re-read of
    the trial: returns (the state told, the values told, a warning or None)."""
    return _tell_with_warning(study, trial, value, state, skip_if_finished=True)
