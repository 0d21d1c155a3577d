"""The study store: URL resolution, Optuna's RDBStorage tuned for workers, and the artifact store.

URL order: ``--storage`` flag, then ``HPO_STORAGE``, then ``sqlite:///storage/hpo.db``. Any
SQLAlchemy URL works: ``sqlite:///``, ``postgresql://`` / ``postgresql+psycopg2://``,
``mysql+pymysql://``. Artifacts (retrain weights, predictions) go to ``--artifacts``,
``HPO_ARTIFACTS``, or ``artifacts/`` beside a SQLite file (``storage/artifacts`` by default).

Environment knobs (seconds): ``HPO_HEARTBEAT_INTERVAL`` (10), ``HPO_GRACE_PERIOD`` (30: a RUNNING
trial without a heartbeat for this long belongs to a dead worker and is re-queued),
``HPO_STORE_RETRY`` (60: how long a worker retries a store that went away), ``HPO_MAX_RETRY``
(3: re-runs of one trial), ``HPO_CONNECT_TIMEOUT`` (5).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import re
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from hpo.errors import StoreError
from hpo.optuna_private import (STUDY_SYSTEM_ATTRS as _ATTRS, TRIAL_HEARTBEATS as _BEATS,
                                 TRIAL_INTERMEDIATE_VALUES as _VALUES, TRIAL_SYSTEM_ATTRS as _TRIAL_SYSTEM_ATTRS,
                                 TRIAL_USER_ATTRS as _USER_ATTRS, TRIALS as _TRIALS, stored_intermediate_value)

DEFAULT_URL = "sqlite:///storage/hpo.db"
SQLITE_TIMEOUT = 60  # seconds a SQLite writer waits for the lock
CLAIM_TRIES = 8  # claims tried upwards from the count of taken numbers before reading them all
FRESH = 1.0  # seconds: a trial this young cannot be stale (grace period > heartbeat interval >= 1 s)

_log = logging.getLogger("hpo.store")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise StoreError(f"{name}={raw!r} is not a number of seconds") from None


def resolve_url(flag: str | None = None) -> str:
    return flag or os.environ.get("HPO_STORAGE") or DEFAULT_URL


def mask_url(url: str) -> str:
    """The text with every URL password replaced by ``***`` (for every log line and error)."""
    text = re.sub(r"(\w[\w+.-]*://[^:/@\s]+:)\S*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", text, flags=re.IGNORECASE)


def driver_url(url: str) -> str:
    """``url`` with a driver that is installed: a bare ``postgresql://`` (or ``postgres://``) means
    psycopg 3 to SQLAlchemy 2.1, so it goes to psycopg2 when only that one is there."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def _prepare_sqlite(path: Path) -> None:
    """Create the folder, check it is writable, and switch the file to WAL once (it persists)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store folder {path.parent}: {e.strerror}") from e
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreError(f"the store {path} is not writable; pass --storage or set HPO_STORAGE")
    try:
        with sqlite3.connect(path, timeout=SQLITE_TIMEOUT) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the SQLite store {path}: {e}") from e


def engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    connect_timeout = int(_env_seconds("HPO_CONNECT_TIMEOUT", 5))
    # One worker keeps one idle connection; the heartbeat thread borrows a second one briefly,
    # so N workers hold about N connections. Pre-ping replaces connections a server restart killed.
    return {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 2, "pool_recycle": 3600,
            "connect_args": {"connect_timeout": connect_timeout}}


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a dropped or refused connection, or a busy lock."""
    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or error.__context__
    return False


def call_retrying(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried with backoff on transient store errors for ``seconds``."""
    deadline = time.monotonic() + seconds
    delay, attempt = 0.5, 0
    while True:
        try:
            return fn(*args, **kwargs)
        except optuna.exceptions.UpdateFinishedTrialError:
            # An earlier attempt committed before the connection dropped: the trial is finished.
            if attempt and getattr(fn, "__name__", "") == "set_trial_state_values":
                return True
            raise
        except sqlalchemy.exc.IntegrityError:
            # Likewise for a parameter: the earlier attempt stored it (unique trial/param pair).
            if attempt and getattr(fn, "__name__", "") == "_set_trial_param":
                return None
            raise
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            attempt += 1
            _log.warning("store unreachable (%s); retry %d in %.1fs", mask_url(_reason(e)), attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _retried(storage: optuna.storages.RDBStorage, fn, *args, **kwargs):
    """:func:`call_retrying` within ``storage``'s retry window (none for a plain RDBStorage)."""
    return call_retrying(getattr(storage, "_hpo_retry_seconds", 0), fn, *args, **kwargs)


def _retrying(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return call_retrying(self._hpo_retry_seconds, method, self, *args, **kwargs)
    return wrapper


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose calls ride out a restarting database: transient errors are retried
    with backoff for ``HPO_STORE_RETRY`` seconds. Opening the store is never retried, so a wrong
    URL fails at once."""

    _hpo_retry_seconds = 0.0


_RETRIED = (
    "create_new_trial", "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "get_best_trial", "record_heartbeat",
    "_get_stale_trial_ids", "set_study_user_attr", "set_study_system_attr",
    # Optuna wraps the storage in its _CachedStorage, which calls these private methods directly.
    "_get_trials", "_get_best_trial_id", "_create_new_trial", "_set_trial_param",
)
for _name in _RETRIED:
    setattr(RetryingRDBStorage, _name, _retrying(getattr(optuna.storages.RDBStorage, _name)))


RETRY_ATTR = "failed_trial"  # trial system attr of a re-queued retry (set by Optuna's retry callback): the original's number


def _state_of(trial_id: int) -> sa.Select:
    return sa.select(_TRIALS.c.state).where(_TRIALS.c.trial_id == trial_id)


def _upsert(conn: sa.Connection, table: sa.Table, rows: list[dict], unique: tuple[str, str]) -> None:
    """Insert ``rows``, replacing the rows they collide with on ``unique``: one statement."""
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = sa.dialects.postgresql.insert if dialect == "postgresql" else sa.dialects.sqlite.insert
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=list(unique), set_={
            c: stmt.excluded[c] for c in rows[0] if c not in unique})
    elif dialect in ("mysql", "mariadb"):
        stmt = sa.dialects.mysql.insert(table)
        stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in rows[0] if c not in unique})
    else:
        first, second = unique
        conn.execute(sa.delete(table).where(table.c[first] == rows[0][first],
                                            table.c[second].in_([row[second] for row in rows])))
        stmt = sa.insert(table)
    conn.execute(stmt, rows)


class WorkerStorage(RetryingRDBStorage):
    """A worker's store: the trials it creates are written behind and read back from memory.

    Intermediate values and user attrs wait in memory and go to the store together, in one
    transaction, when the trial is read back (``get_trial``), before its state changes
    (``set_trial_state_values``, so a finished trial always carries all of them), and at every
    :meth:`flush` (the worker's heartbeat). This is the persistence contract Optuna's own
    ``_CachedStorage`` states, applied to the two writes a trial makes most: a report costs no
    round trip, and 20 reports plus the worker's attrs cost one transaction instead of about a
    hundred statements. Writes of a trial that another worker has finished meanwhile (failed as
    stale) are refused as Optuna refuses them.

    A running trial this process created changes elsewhere only in its state (another worker
    fails it when it looks dead), so reading it back costs one query for the state instead of
    six for the whole trial: the rest is what this process wrote.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_write_behind()

    def _init_write_behind(self) -> None:
        self._pending: dict[int, tuple[dict[int, float], dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time, so an older batch never lands after a state change
        self._finished: set[int] = set()
        self._own: dict[int, optuna.trial.FrozenTrial] = {}  # running trials this process created, as written
        self._born: dict[int, float] = {}  # their creation, on this process's clock

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in ("_pending", "_pending_lock", "_flush_lock", "_finished", "_own", "_born"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_write_behind()

    def _buffer(self, trial_id: int) -> tuple[dict[int, float], dict[str, Any]]:
        if trial_id in self._finished:
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial_id} is already finished")
        return self._pending.setdefault(trial_id, ({}, {}))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._pending_lock:
            self._buffer(trial_id)[0][step] = intermediate_value
            if trial_id in self._own:
                self._own[trial_id].intermediate_values[step] = intermediate_value

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        json.dumps(value)  # a value the store cannot hold fails here, in the caller, not at the flush
        with self._pending_lock:
            self._buffer(trial_id)[1][key] = value
            if trial_id in self._own:
                self._own[trial_id].user_attrs[key] = copy.deepcopy(value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        with self._pending_lock:
            if trial_id in self._own:
                self._own[trial_id].system_attrs[key] = copy.deepcopy(value)

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution,
                         previous_distribution) -> None:
        super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
        with self._pending_lock:
            if trial_id in self._own:
                self._own[trial_id].distributions[param_name] = distribution
                self._own[trial_id].params[param_name] = distribution.to_external_repr(param_value_internal)

    def _create_new_trial(self, study_id: int, template_trial=None) -> optuna.trial.FrozenTrial:
        frozen = super()._create_new_trial(study_id, template_trial)
        if template_trial is None:  # a trial to run here (a template is someone's finished or queued trial)
            with self._pending_lock:
                self._own[frozen._trial_id] = copy.deepcopy(frozen)
                self._born[frozen._trial_id] = time.monotonic()
        return frozen

    def _disown(self, trial_id: int) -> None:
        with self._pending_lock:
            self._finished.add(trial_id)
            self._own.pop(trial_id, None)
            self._born.pop(trial_id, None)

    def flush(self, trial_id: int) -> TrialState | None:
        """Write ``trial_id``'s pending values and user attrs (retrying transient errors).

        Returns the trial's state as the write found it, or ``None`` when nothing was pending.
        """
        with self._flush_lock:
            with self._pending_lock:
                values, attrs = self._pending.pop(trial_id, ({}, {}))
            if not values and not attrs:
                return None
            try:
                state = call_retrying(self._hpo_retry_seconds, self._write, trial_id, values, attrs)
            except BaseException:
                with self._pending_lock:  # keep them for the next flush, under any newer ones
                    newer_values, newer_attrs = self._pending.get(trial_id, ({}, {}))
                    self._pending[trial_id] = ({**values, **newer_values}, {**attrs, **newer_attrs})
                raise
            if state.is_finished():
                self._disown(trial_id)
            return state

    def _state(self, trial_id: int) -> TrialState:
        with self.engine.connect() as conn:
            return conn.execute(_state_of(trial_id)).scalar_one()

    def _write(self, trial_id: int, values: dict[int, float], attrs: dict[str, Any]) -> TrialState:
        with self.engine.begin() as conn:
            state = conn.execute(_state_of(trial_id).with_for_update()).scalar_one()
            if state.is_finished():
                _log.warning("trial id %d was finished elsewhere; dropped %d values and %d attrs",
                             trial_id, len(values), len(attrs))
                return state
            if values:
                rows = []
                for step, value in values.items():
                    stored, kind = stored_intermediate_value(value)
                    rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                                 "intermediate_value_type": kind})
                _upsert(conn, _VALUES, rows, ("trial_id", "step"))
            if attrs:
                _upsert(conn, _USER_ATTRS, [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                                            for key, value in attrs.items()], ("trial_id", "key"))
        return state

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        state = self.flush(trial_id)
        if trial_id in self._own:
            if state is None and time.monotonic() - self._born.get(trial_id, -float("inf")) < FRESH:
                # Younger than any grace period (> heartbeat interval >= 1 s): no live worker
                # can have failed it yet, so it still runs (Optuna's Trial reads it right after ask).
                state = TrialState.RUNNING
            if state is None:
                state = call_retrying(self._hpo_retry_seconds, self._state, trial_id)
            with self._pending_lock:
                own = self._own.get(trial_id)
                if state == TrialState.RUNNING and own is not None:
                    return copy.deepcopy(own)
            self._disown(trial_id)
        return super().get_trial(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        self.flush(trial_id)
        changed = super().set_trial_state_values(trial_id, state=state, values=values)
        if changed and state.is_finished():
            self._disown(trial_id)
        return changed


def _reason(e: BaseException) -> str:
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ else e
    text = str(getattr(cause, "orig", None) or cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def open_storage(url: str | None = None, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """Open (and on first use create) the store at ``url``.

    With ``heartbeat`` (a worker's store: a :class:`WorkerStorage`), running trials send a
    heartbeat, a trial whose worker died is failed and re-queued with the same parameters (its
    retry count is in its system attrs), and trials' reports and user attrs are written behind.
    Once open, the store's calls retry transient connection errors for ``HPO_STORE_RETRY`` seconds.

    Raises:
        StoreError: when the store cannot be reached or created (password masked).
    """
    url = resolve_url(url)
    kwargs = {}
    if heartbeat:  # knobs first: a bad one leaves no store file behind
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        interval = max(1, int(_env_seconds("HPO_HEARTBEAT_INTERVAL", 10)))
        grace = max(1, int(_env_seconds("HPO_GRACE_PERIOD", 30)))
        if grace <= interval:
            # A live trial would look dead between two beats (and before its first one).
            raise StoreError(f"HPO_GRACE_PERIOD={grace} must be longer than HPO_HEARTBEAT_INTERVAL={interval} seconds")
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": grace,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=int(_env_seconds("HPO_MAX_RETRY", 3))),
        }
    path = sqlite_path(url)
    if path is not None:
        _prepare_sqlite(path)
    try:
        cls = WorkerStorage if heartbeat else RetryingRDBStorage
        storage = cls(driver_url(url), engine_kwargs=engine_kwargs(url), **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError,
            OSError) as e:
        raise StoreError(f"cannot open the store {mask_url(url)}: {mask_url(_reason(e))}") from e
    storage._hpo_retry_seconds = _env_seconds("HPO_STORE_RETRY", 60)
    return storage


def _claimed(storage: optuna.storages.RDBStorage, study_id: int, prefix: str) -> set[str]:
    with storage.engine.connect() as conn:
        rows = conn.execute(sa.select(_ATTRS.c.key).where(_ATTRS.c.study_id == study_id,
                                                          _ATTRS.c.key.like(prefix + "%")))
        return {row[0] for row in rows}


def claimed(storage: optuna.storages.RDBStorage, study_id: int, prefix: str) -> set[str]:
    """The study keys ``prefix + k`` taken with :func:`claim`."""
    return _retried(storage, _claimed, storage, study_id, prefix)


def _insert_claim(storage: optuna.storages.RDBStorage, study_id: int, key: str, value: object) -> bool:
    try:
        with storage.engine.begin() as conn:
            conn.execute(sa.insert(_ATTRS).values(study_id=study_id, key=key, value_json=json.dumps(value)))
        return True
    except sqlalchemy.exc.IntegrityError:
        return False  # another worker holds it


def _claim(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, *, limit: int | None = None,
           value: object = None) -> int | None:
    with storage.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(_ATTRS).where(
            _ATTRS.c.study_id == study_id, _ATTRS.c.key.like(prefix + "%"))).scalar_one()
    # Until a number is released the taken ones are 0..n-1, so n is the lowest free one: one
    # insert, and a few more when other workers claim at the same moment; no list to read.
    for k in range(n, n + CLAIM_TRIES if limit is None else min(limit, n + CLAIM_TRIES)):
        if _insert_claim(storage, study_id, f"{prefix}{k}", value):
            return k
    taken = _claimed(storage, study_id, prefix)
    k = 0
    while limit is None or k < limit:
        if f"{prefix}{k}" not in taken and _insert_claim(storage, study_id, f"{prefix}{k}", value):
            return k
        k += 1
    return None


def _release(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, k: int) -> None:
    with storage.engine.begin() as conn:
        conn.execute(sa.delete(_ATTRS).where(_ATTRS.c.study_id == study_id, _ATTRS.c.key == f"{prefix}{k}"))


def claim(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, *, limit: int | None = None,
          value: object = None) -> int | None:
    """Atomically claim a free number ``k`` (below ``limit``) under the study key ``prefix + k``:
    the lowest free one while none was released, else possibly one above a released one.

    The store's unique (study, key) constraint makes the claim atomic on every backend: two
    workers never hold the same number. Returns ``None`` only when every number below ``limit``
    is taken (checked against the full list).
    """
    return _retried(storage, _claim, storage, study_id, prefix, limit=limit, value=value)


def release(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, k: int) -> None:
    """Give back number ``k`` taken with :func:`claim`."""
    _retried(storage, _release, storage, study_id, prefix, k)


def silent_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[tuple[int, object]]:
    """(trial id, start time) of RUNNING trials that never sent a heartbeat.

    A worker killed between creating a trial and its first heartbeat leaves one; Optuna's
    stale-trial check skips those, so the caller fails them once silent for the grace period.
    """
    def query():
        with storage.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_TRIALS.c.trial_id, _TRIALS.c.datetime_start)
                .select_from(_TRIALS.outerjoin(_BEATS, _BEATS.c.trial_id == _TRIALS.c.trial_id))
                .where(_TRIALS.c.study_id == study_id, _TRIALS.c.state == TrialState.RUNNING, _BEATS.c.trial_id.is_(None)))
            return [tuple(row) for row in rows]
    return _retried(storage, query)


def waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[tuple[int, bool]]:
    """(trial id, is a re-queued retry) of the study's WAITING trials, oldest first. A retry
    carries Optuna's ``failed_trial`` system attr; the others were enqueued."""
    def query():
        retry = (sa.select(_TRIAL_SYSTEM_ATTRS.c.trial_id)
                 .where(_TRIAL_SYSTEM_ATTRS.c.trial_id == _TRIALS.c.trial_id, _TRIAL_SYSTEM_ATTRS.c.key == RETRY_ATTR)
                 .exists())
        with storage.engine.connect() as conn:
            rows = conn.execute(sa.select(_TRIALS.c.trial_id, retry)
                                .where(_TRIALS.c.study_id == study_id, _TRIALS.c.state == TrialState.WAITING)
                                .order_by(_TRIALS.c.trial_id))
            return [(row[0], bool(row[1])) for row in rows]
    return _retried(storage, query)


def artifact_dir(url: str | None = None, flag: str | None = None) -> Path:
    if flag or os.environ.get("HPO_ARTIFACTS"):
        return Path(flag or os.environ["HPO_ARTIFACTS"])
    path = sqlite_path(resolve_url(url))
    return (path.parent if path is not None else Path("storage")) / "artifacts"


def open_artifact_store(url: str | None = None, flag: str | None = None) -> FileSystemArtifactStore:
    path = artifact_dir(url, flag)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))
