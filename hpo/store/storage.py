"""Optuna's RDB store as hpo opens it: every call retried over a restarting database, and, for
workers, the running trials' reports and user attrs written behind.

The worker's store keeps Optuna's storage contract (``tests/store/test_storage_contract.py`` runs
Optuna's own storage test kit against it) with one documented bound: a trial finished by another
process while this one runs it is seen as finished at the next read of the trial and at the next
heartbeat, so writes to it are refused at the call within one heartbeat interval.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import warnings
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import StoreError, StoreUnreachable
from hpo.store import optuna_private, trials
from hpo.store.config import (
    SQLITE_TIMEOUT,
    Heartbeat,
    driver_url,
    engine_kwargs,
    env_seconds,
    mask_url,
    prepare_sqlite,
    resolve_url,
    sqlite_path,
)
from hpo.store.optuna_private import (
    TRIAL_INTERMEDIATE_VALUES,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIAL_VALUES,
    TRIALS,
)
from hpo.store.queries import upsert
from hpo.store.retry import Outage, call_retrying, reason, retrying
from hpo.store.schema import schema_lock, schema_revision

_log = logging.getLogger("hpo.store")


class RetryingRDBStorage(optuna_private.RDBStorage):
    """``RDBStorage`` whose calls ride out a restarting database: transient errors are retried
    with backoff for ``retry_seconds`` (``HPO_STORE_RETRY``) after the store stopped answering
    (``outage``: shared by the process's threads)."""

    retry_seconds = 0.0

    def __init__(self, *args, **kwargs):
        self.outage = Outage()
        super().__init__(*args, **kwargs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """Optuna's ``set_trial_state_values``, decided by one conditional update: the state
        changes only from a state that allows it (WAITING to RUNNING; WAITING or RUNNING to any
        other), so of two processes racing to finish a trial exactly one wins, on every backend.
        (Optuna reads the state, checks it, then writes: on SQLite, which takes no row locks, a
        tell could overwrite a FAIL another worker had just committed, together with its retry.)

        Raises:
            KeyError: no such trial.
            UpdateFinishedTrialError: the trial is already finished.
        """
        now = optuna_private.stored_now()
        if state == TrialState.RUNNING:
            allowed, changes = (TrialState.WAITING,), {"state": state, "datetime_start": now}
        else:
            allowed, changes = (TrialState.WAITING, TrialState.RUNNING), {"state": state}
            if state.is_finished():
                changes["datetime_complete"] = now
        with self.engine.begin() as conn:
            changed = conn.execute(sa.update(TRIALS).where(TRIALS.c.trial_id == trial_id, TRIALS.c.state.in_(allowed))
                                   .values(**changes)).rowcount
            if not changed:
                current = conn.execute(sa.select(TRIALS.c.state).where(TRIALS.c.trial_id == trial_id)).scalar()
            elif values is not None:
                rows = []
                for objective, value in enumerate(values):
                    stored, kind = optuna_private.stored_trial_value(value)
                    rows.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
                upsert(conn, TRIAL_VALUES, rows, ("trial_id", "objective"))
        if changed:
            return True
        # Outside the transaction: Optuna's check reads the trial on a connection of its own, and
        # a process holds one (a nested checkout would wait for itself until the pool times out).
        if current is None:
            raise KeyError(f"no trial with id {trial_id}")
        self.check_trial_is_updatable(trial_id, current)
        return False

    def read_trials(self, study_id, states, included_trial_ids, trial_id_greater_than):
        """Optuna's read, one query per table instead of its ORM's: a worker's first read of a
        10,000-trial study takes seconds instead of a minute (benchmarks/bench_scale.py)."""
        return trials.read_trials(self, study_id, states=states, included_trial_ids=included_trial_ids,
                                  trial_id_greater_than=trial_id_greater_than)

    def store_trial_param(self, trial_id, param_name, param_value_internal, distribution, previous_distribution):
        try:
            super().store_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
        except sqlalchemy.exc.IntegrityError:
            # (trial, param) is unique: an attempt whose commit's answer was lost stored it already.
            stored = self.get_trial(trial_id)
            if stored.params.get(param_name, object()) != distribution.to_external_repr(param_value_internal):
                raise


_RETRIED = (
    "create_new_trial", "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_best_trial", "record_heartbeat", "set_study_user_attr",
    "set_study_system_attr", *optuna_private.RDBStorage.HOOKS.values(),
)
for _name in _RETRIED:
    setattr(RetryingRDBStorage, _name, retrying(getattr(RetryingRDBStorage, _name)))


class WorkerStorage(RetryingRDBStorage):
    """A worker's store: the running trials it runs ("own" trials) are written behind.

    Intermediate values and user attrs of an own trial wait in memory and go to the store
    together, in one transaction, at every :meth:`refresh` (the worker's heartbeat), before the
    trial's state changes (so a finished trial always carries all of them), and when the trial
    is read whole. Every read of this process sees them at once. This is the persistence
    contract Optuna's own ``_CachedStorage`` states, applied to the two writes a trial makes most:
    a report costs no round trip, and 20 reports plus the worker's attrs cost one transaction
    instead of about a hundred statements.

    An own trial is read back as its state and system attrs (one query: other processes may
    change those) over what this process wrote. Writes to any other trial go straight to the
    store, as with Optuna's ``RDBStorage``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_write_behind()

    def _init_write_behind(self) -> None:
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one flush at a time, so an older batch never lands after a newer
        self._own: dict[int, FrozenTrial] = {}  # running trials this process runs, as written here
        self._pending: dict[int, tuple[dict[int, float], dict[str, Any]]] = {}
        self._finished: dict[int, TrialState] = {}  # own trials since finished (here or elsewhere)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in ("_lock", "_flush_lock", "_own", "_pending", "_finished"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_write_behind()

    # -- own trials -------------------------------------------------------------------------

    def adopt(self, trial: FrozenTrial) -> None:
        """Run ``trial`` (RUNNING, started by this process) with writes behind."""
        with self._lock:
            self._own[optuna_private.trial_id(trial)] = copy.deepcopy(trial)
            self._finished.pop(optuna_private.trial_id(trial), None)

    def is_own(self, trial_id: int) -> bool:
        return trial_id in self._own

    def finished_elsewhere(self, trial_id: int) -> TrialState | None:
        """The state of an own trial that was finished by another process, as last seen."""
        return self._finished.get(trial_id)

    def _disown(self, trial_id: int, state: TrialState) -> None:
        with self._lock:
            self._own.pop(trial_id, None)
            dropped = self._pending.pop(trial_id, None)
            self._finished[trial_id] = state
        if dropped and any(dropped):
            _log.warning("trial id %d was finished elsewhere (%s); dropped %d values and %d attrs written here",
                         trial_id, state.name, len(dropped[0]), len(dropped[1]))

    def drop(self, trial_id: int) -> None:
        """Stop running ``trial_id`` here without writing anything more to it (its study is gone):
        pending writes are dropped, later writes raise ``UpdateFinishedTrialError``."""
        with self._lock:
            self._own.pop(trial_id, None)
            self._pending.pop(trial_id, None)
            self._finished[trial_id] = TrialState.FAIL

    def _refuse_finished(self, trial_id: int) -> None:
        if trial_id in self._finished:
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial id {trial_id} is already finished ({self._finished[trial_id].name})")

    def create_trial_record(self, study_id, template_trial=None):
        frozen = super().create_trial_record(study_id, template_trial)
        if frozen.state == TrialState.RUNNING:
            self.adopt(frozen)
        return frozen

    # -- writes ------------------------------------------------------------------------------

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            own = self._own.get(trial_id)
            if own is not None:
                self._pending.setdefault(trial_id, ({}, {}))[0][step] = intermediate_value
                own.intermediate_values[step] = intermediate_value
                return
            self._refuse_finished(trial_id)
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        json.dumps(value)  # a value the store cannot hold fails here, in the caller, not at the flush
        with self._lock:
            own = self._own.get(trial_id)
            if own is not None:
                self._pending.setdefault(trial_id, ({}, {}))[1][key] = value
                own.user_attrs[key] = copy.deepcopy(value)
                return
            self._refuse_finished(trial_id)
        super().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            self._refuse_finished(trial_id)
        super().set_trial_system_attr(trial_id, key, value)
        with self._lock:
            if trial_id in self._own:
                self._own[trial_id].system_attrs[key] = copy.deepcopy(value)

    def store_trial_param(self, trial_id, param_name, param_value_internal, distribution, previous_distribution):
        with self._lock:
            self._refuse_finished(trial_id)
        super().store_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
        with self._lock:
            if trial_id in self._own:
                self._own[trial_id].distributions[param_name] = distribution
                self._own[trial_id].params[param_name] = distribution.to_external_repr(param_value_internal)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if trial_id in self._own:
            self.flush(trial_id)
        try:
            changed = super().set_trial_state_values(trial_id, state=state, values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            if trial_id in self._own:
                self._disown(trial_id, self.trial_state(trial_id))
            raise
        if changed and state.is_finished():
            self._disown(trial_id, state)
        elif changed and state == TrialState.RUNNING:
            self.adopt(super().get_trial(trial_id))  # popped from the queue here: runs here
        return changed

    def flush(self, trial_id: int) -> TrialState | None:
        """Write ``trial_id``'s pending values and user attrs in one transaction (retrying
        transient errors). Returns the trial's state as the write found it, or ``None`` when
        nothing was pending. A trial found finished elsewhere is disowned: its pending writes are
        dropped (Optuna would refuse them) and later writes raise ``UpdateFinishedTrialError``."""
        with self._flush_lock:
            with self._lock:
                values, attrs = self._pending.pop(trial_id, ({}, {}))
            if not values and not attrs:
                return None
            try:
                state = self._write(trial_id, values, attrs)
            except BaseException:
                with self._lock:  # keep them for the next flush, under any newer ones
                    newer_values, newer_attrs = self._pending.get(trial_id, ({}, {}))
                    self._pending[trial_id] = ({**values, **newer_values}, {**attrs, **newer_attrs})
                raise
            if state.is_finished():
                self._disown(trial_id, state)
            return state

    def refresh(self, trial_id: int) -> TrialState:
        """The heartbeat's check of an own trial: flush what is pending (else read its state);
        a trial found finished elsewhere is disowned. Returns its state."""
        state = self.flush(trial_id)
        if state is None:
            state = self.trial_state(trial_id)
            if state.is_finished() and trial_id in self._own:
                self._disown(trial_id, state)
        return state

    @retrying
    def trial_state(self, trial_id: int) -> TrialState:
        """``trial_id``'s state as stored now (one query).

        Raises:
            KeyError: no such trial.
        """
        with self.engine.connect() as conn:
            state = conn.execute(sa.select(TRIALS.c.state).where(TRIALS.c.trial_id == trial_id)).scalar()
        if state is None:
            raise KeyError(f"no trial with id {trial_id}")
        return state

    @retrying
    def _write(self, trial_id: int, values: dict[int, float], attrs: dict[str, Any]) -> TrialState:
        with self.engine.begin() as conn:
            state = conn.execute(sa.select(TRIALS.c.state).where(TRIALS.c.trial_id == trial_id)
                                 .with_for_update()).scalar_one()
            if state.is_finished():
                return state
            if values:
                rows = []
                for step, value in values.items():
                    stored, kind = optuna_private.stored_intermediate_value(value)
                    rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                                 "intermediate_value_type": kind})
                upsert(conn, TRIAL_INTERMEDIATE_VALUES, rows, ("trial_id", "step"))
            if attrs:
                upsert(conn, TRIAL_USER_ATTRS, [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                                                for key, value in attrs.items()], ("trial_id", "key"))
        return state

    # -- reads -------------------------------------------------------------------------------

    def _overlay(self, trial: FrozenTrial) -> FrozenTrial:
        """``trial`` as read from the store, with this process's pending writes on top."""
        with self._lock:
            values, attrs = self._pending.get(optuna_private.trial_id(trial), ({}, {}))
            if not values and not attrs:
                return trial
            trial = copy.copy(trial)
            trial.intermediate_values = {**trial.intermediate_values, **values}
            trial.user_attrs = {**trial.user_attrs, **copy.deepcopy(attrs)}
            return trial

    @retrying
    def _state_and_system_attrs(self, trial_id: int) -> tuple[TrialState, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(TRIALS.c.state, TRIAL_SYSTEM_ATTRS.c.key, TRIAL_SYSTEM_ATTRS.c.value_json)
                .select_from(TRIALS.outerjoin(TRIAL_SYSTEM_ATTRS, TRIAL_SYSTEM_ATTRS.c.trial_id == TRIALS.c.trial_id))
                .where(TRIALS.c.trial_id == trial_id)).all()
        if not rows:
            raise KeyError(f"no trial with id {trial_id}")
        return rows[0][0], {key: json.loads(value) for _, key, value in rows if key is not None}

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._own:
            state, system_attrs = self._state_and_system_attrs(trial_id)
            with self._lock:
                own = self._own.get(trial_id)
                if state == TrialState.RUNNING and own is not None:
                    own.system_attrs = system_attrs
                    return copy.deepcopy(own)
            self._disown(trial_id, state)
        return super().get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [self._overlay(t) for t in super().get_all_trials(study_id, deepcopy=deepcopy, states=states)]

    def read_trials(self, study_id, states, included_trial_ids, trial_id_greater_than):
        return [self._overlay(t) for t in super().read_trials(study_id, states, included_trial_ids,
                                                               trial_id_greater_than)]

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        attrs = super().get_trial_user_attrs(trial_id)
        with self._lock:
            return {**attrs, **copy.deepcopy(self._pending.get(trial_id, ({}, {}))[1])}


def _construct(cls: type[RetryingRDBStorage], url: str, engine_settings: dict, kwargs: dict) -> RetryingRDBStorage:
    """The store object, Optuna's schema created first if it is not there yet. The store is opened
    on one connection at a time, its pool's one: Optuna's own schema checks hold two at once, so
    they run on their own (creating the schema, under the schema lock, on connections closed
    after), and the version is checked on the connection that read it."""
    with warnings.catch_warnings():
        # Optuna marks heartbeat_interval/grace_period experimental; hpo's contract test covers them.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        revision = schema_revision(url)
        if revision is None:
            with schema_lock(url):
                maker = optuna.storages.RDBStorage(driver_url(url), engine_kwargs={
                    "poolclass": sa.pool.NullPool, "connect_args": engine_settings.get("connect_args", {})})
                maker.engine.dispose()
            revision = schema_revision(url)
        storage = cls(driver_url(url), engine_kwargs=engine_settings, skip_table_creation=True,
                      skip_compatibility_check=True, **kwargs)
    head = optuna_private.schema_head(storage)
    if revision != head:
        storage.engine.dispose()
        raise StoreError(f"the store's schema is at revision {revision!r}, this Optuna ({optuna.__version__}) "
                         f"needs {head!r}: upgrade it with `optuna storage upgrade --storage URL`, or use the "
                         f"Optuna that made it")
    return storage


def open_storage(url: str | None = None, *, heartbeat: bool | Heartbeat = True) -> optuna.storages.RDBStorage:
    """Open (and on first use create, under a lock safe for processes starting together) the store
    at ``url``.

    With ``heartbeat`` (a worker's store: a :class:`WorkerStorage`; ``True`` takes the interval and
    grace period from ``HPO_HEARTBEAT_INTERVAL``/``HPO_GRACE_PERIOD``), running trials send a
    heartbeat and their reports and user attrs are written behind. Opening, and every call of the
    store once open, retries transient connection errors (refused, reset, closed, too many
    connections, starting up) for ``HPO_STORE_RETRY`` seconds, saying so on one line at once; a
    wrong host name, a refused login or a missing database fail at once. A server store keeps one
    connection (``engine_kwargs``).

    Raises:
        StoreUnreachable: the store stayed unreachable for ``HPO_STORE_RETRY`` seconds.
        StoreError: when the store cannot be opened or created (password masked), or a knob is bad.
    """
    url = resolve_url(url)
    if heartbeat is True:  # knobs first: a bad one leaves no store file behind
        heartbeat = Heartbeat.from_env()
    retry_seconds = env_seconds("HPO_STORE_RETRY", 60)
    kwargs, sqlite_timeout = {}, SQLITE_TIMEOUT
    if heartbeat:
        kwargs = {"heartbeat_interval": heartbeat.interval, "grace_period": heartbeat.grace}
        # A writer waiting longer than the grace period would let other workers fail its live trial.
        sqlite_timeout = min(SQLITE_TIMEOUT, heartbeat.grace / 2)
    path = sqlite_path(url)
    if path is not None:
        prepare_sqlite(path)
    outage = Outage()
    try:
        storage = call_retrying(retry_seconds, _construct, WorkerStorage if heartbeat else RetryingRDBStorage, url,
                                engine_kwargs(url, sqlite_timeout=sqlite_timeout), kwargs, outage=outage)
    except StoreUnreachable as e:
        raise type(e)(f"cannot open the store {mask_url(url)}: {e}") from e
    except StoreError as e:
        raise StoreError(f"cannot open the store {mask_url(url)}: {e}") from e
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError,
            OSError) as e:
        raise StoreError(f"cannot open the store {mask_url(url)}: {mask_url(reason(e))}") from e
    storage.retry_seconds, storage.outage = retry_seconds, outage
    return storage
