"""Every use of Optuna's private API, in one place.

hpo reads and writes Optuna's SQL schema directly where the public API would cost a round trip
per row (budget places, write-behind reports, aggregate statistics), and reaches into a few
private attributes of ``Study`` and ``Trial``. Nothing else in hpo may import an underscored
Optuna name: the rest of the package uses the public names below.

``tests/store/test_optuna_private.py`` checks every name this module takes from Optuna and fails naming
the one that changed. Optuna is pinned to the minor release that test passed on (pyproject); to
try a newer release, install it and run ``python -m pytest tests/store/test_optuna_private.py``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
from collections.abc import Iterator

import optuna
import sqlalchemy.orm
from optuna._hypervolume import compute_hypervolume
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState

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


def stored_now() -> datetime.datetime:
    """Now, as Optuna 5 writes trial times into its tables (``datetime_start``, ``datetime_complete``):
    UTC without a time zone (its models convert on the way in and out; optuna#6708, PR #6776)."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def stored_time(value: datetime.datetime | None) -> datetime.datetime | None:
    """A trial time read from Optuna's tables as Optuna 5's models return it: local time, naive."""
    return None if value is None else value.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


def stored_intermediate_value(value: float) -> tuple[float | None, object]:
    """``value`` as Optuna stores it: (number or None, its kind: finite, inf, -inf or nan)."""
    return models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)


def intermediate_value(stored: float | None, kind: object) -> float:
    """The reported value of a ``trial_intermediate_values`` row (its value and value-type columns)."""
    return models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(stored, kind)


# Optuna stores a non-finite report as NULL with the name of its kind; these are the reports by name.
NON_FINITE_INTERMEDIATE_VALUES = {
    kind.name: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(None, kind)
    for kind in models.TrialIntermediateValueModel.TrialIntermediateValueType if kind.name != "FINITE"}


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


def in_optimize(study: optuna.Study) -> bool:
    """Whether ``study.optimize`` is running in this thread: ``study.stop()`` raises
    ``RuntimeError`` otherwise. A study a pruner filtered (Hyperband's per-bracket study, which
    forwards ``stop`` to the study it filters) answers for that study."""
    study = getattr(study, "_study", study)
    return study._thread_local.in_optimize_loop


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread cache of all trials (Optuna refills it at the next read)."""
    study._thread_local.cached_all_trials = None


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None,
         state: optuna.trial.TrialState) -> tuple[optuna.trial.TrialState, list[float] | None, str | None]:
    """``study.tell(trial, value, state, skip_if_finished=True)`` without its final re-read of
    the trial: returns (the state told, the values told, a warning or None)."""
    return _tell_with_warning(study, trial, value, state, skip_if_finished=True)


def schema_head(storage: optuna.storages.RDBStorage) -> str:
    """The schema revision this Optuna writes (alembic's head; read from Optuna's files)."""
    return storage._version_manager.get_head_version()


def hypervolume(points, reference_point) -> float:
    """The hypervolume that ``points`` (an n x k array, every objective minimized) dominate up to
    ``reference_point``: Optuna's own computation (``optuna._hypervolume``; Optuna 5.0 has no public
    name for it), the one its hypervolume history and multi-objective TPE use."""
    import numpy as np

    return float(compute_hypervolume(np.asarray(points, dtype=float), np.asarray(reference_point, dtype=float)))


def cache_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Tell Optuna's cache in front of the store about ``trial``, created or started by hpo's own
    transaction (Optuna's ``create_new_trial`` does this for the trials it creates)."""
    storage = study._storage
    if isinstance(storage, _CachedStorage):
        with storage._lock:
            storage._studies.setdefault(study._study_id, _StudyInfo())
            storage._add_trials_to_cache(study._study_id, [trial])


class RDBStorage(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` with the private methods Optuna's own cache calls exposed under
    public hook names, and one-transaction primitives for hpo's coordination.

    Optuna wraps every RDB store in its ``_CachedStorage``, which calls the backend's private
    ``_create_new_trial``, ``_set_trial_param``, ``_get_trials`` and ``_get_best_trial_id``
    directly; ``fail_stale_trials`` calls ``_get_stale_trial_ids``. Subclasses override the hooks
    (``create_trial_record``, ``store_trial_param``, ``read_trials``, ``best_trial_id``,
    ``stale_trial_ids``), never the private names.
    """

    # Optuna's private backend methods and the public hooks they forward to.
    HOOKS = {"_create_new_trial": "create_trial_record", "_set_trial_param": "store_trial_param",
             "_get_trials": "read_trials", "_get_best_trial_id": "best_trial_id",
             "_get_stale_trial_ids": "stale_trial_ids"}

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        return self.create_trial_record(study_id, template_trial)

    def create_trial_record(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        """A new trial of ``study_id`` (RUNNING, or a copy of ``template_trial``), as stored."""
        return super()._create_new_trial(study_id, template_trial)

    def _set_trial_param(self, trial_id, param_name, param_value_internal, distribution, previous_distribution):
        self.store_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)

    def store_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                          distribution: optuna.distributions.BaseDistribution,
                          previous_distribution: optuna.distributions.BaseDistribution | None) -> None:
        """Store one parameter (its distribution checked against ``previous_distribution``)."""
        super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)

    def _get_trials(self, study_id, states, included_trial_ids, trial_id_greater_than):
        return self.read_trials(study_id, states, included_trial_ids, trial_id_greater_than)

    def read_trials(self, study_id: int, states, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        """Trials of ``study_id`` with an id in ``included_trial_ids`` or above ``trial_id_greater_than``."""
        return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)

    def _get_best_trial_id(self, study_id, direction):
        return self.best_trial_id(study_id, direction)

    def best_trial_id(self, study_id: int, direction: optuna.study.StudyDirection) -> int:
        return super()._get_best_trial_id(study_id, direction)

    def _get_stale_trial_ids(self, study_id):
        return self.stale_trial_ids(study_id)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials whose last heartbeat is older than the grace period (the database's clock)."""
        return super()._get_stale_trial_ids(study_id)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlalchemy.orm.Session]:
        """One transaction: committed when the block ends, rolled back when it raises. SQLAlchemy
        errors come out as Optuna's ``StorageInternalError`` (the cause attached), integrity
        errors as they are."""
        with _create_scoped_session(self.scoped_session) as session:
            yield session

    @staticmethod
    def lock_study(session: sqlalchemy.orm.Session, study_id: int) -> None:
        """Hold ``study_id``'s row until the transaction ends, as Optuna does to number trials
        (no-op on SQLite, whose writers are serialised anyway).

        Raises:
            KeyError: no such study.
        """
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)

    def add_trial_in(self, session: sqlalchemy.orm.Session, study_id: int,
                     template: FrozenTrial | None = None) -> FrozenTrial:
        """Add a trial inside ``session``'s transaction: RUNNING and empty, or a copy of
        ``template`` (params, attrs, values, state); numbered as Optuna numbers trials."""
        model = self._get_prepared_new_trial(study_id, template, session)
        session.flush()
        if template is not None:
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start, frozen._trial_id = model.number, model.datetime_start, model.trial_id
            return frozen
        return FrozenTrial(number=model.number, state=TrialState.RUNNING, value=None, values=None,
                           datetime_start=model.datetime_start, datetime_complete=None, params={},
                           distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                           trial_id=model.trial_id)
