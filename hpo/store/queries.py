"""Coordination queries on Optuna's tables that the storage API answers only row by row: atomic
claims of study keys, upserts, and the trials a worker must look at (silent, waiting).

Every query here is retried on transient errors within the storage's retry window and is safe to
run again: claims carry a token that finds an earlier attempt whose commit's answer was lost.
"""

from __future__ import annotations

import json
import uuid

import optuna
import sqlalchemy as sa
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.exc
from optuna.trial import TrialState

from hpo.store.optuna_private import (
    STUDIES,
    STUDY_SYSTEM_ATTRS,
    TRIAL_HEARTBEATS,
    TRIAL_SYSTEM_ATTRS,
    TRIALS,
)
from hpo.store.retry import call_retrying

RETRY_ATTR = "failed_trial"  # trial system attr of a re-queued retry (Optuna's retry callback): the original's number


def retried(storage: optuna.storages.RDBStorage, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` retried within ``storage``'s retry window (none for a plain RDBStorage)."""
    return call_retrying(getattr(storage, "retry_seconds", 0), fn, *args, outage=getattr(storage, "outage", None),
                         **kwargs)


def upsert(conn: sa.Connection, table: sa.Table, rows: list[dict], unique: tuple[str, str]) -> None:
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


def _claim_once(storage, study_id: int, prefix: str, limit: int | None, value: object, token: str) -> int | None:
    keys = STUDY_SYSTEM_ATTRS.c.key.like(prefix + "%")
    with storage.engine.connect() as conn:
        mine = conn.execute(sa.select(STUDY_SYSTEM_ATTRS.c.key).where(
            STUDY_SYSTEM_ATTRS.c.study_id == study_id, keys,
            STUDY_SYSTEM_ATTRS.c.value_json.like(f"%{token}%"))).scalar()
        if mine is not None:  # an earlier attempt committed, and its answer was lost
            return int(mine[len(prefix):])
        taken = {row[0] for row in conn.execute(sa.select(STUDY_SYSTEM_ATTRS.c.key).where(
            STUDY_SYSTEM_ATTRS.c.study_id == study_id, keys))}
    k = 0
    while limit is None or k < limit:
        if f"{prefix}{k}" not in taken:
            try:
                with storage.engine.begin() as conn:
                    conn.execute(sa.insert(STUDY_SYSTEM_ATTRS).values(
                        study_id=study_id, key=f"{prefix}{k}", value_json=json.dumps({"value": value, "token": token})))
                return k
            except sqlalchemy.exc.IntegrityError:
                pass  # another process took it meanwhile
        k += 1
    return None


def claim(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, *, limit: int | None = None,
          value: object = None) -> int | None:
    """Atomically claim the lowest free number ``k`` (below ``limit``) as the study key
    ``prefix + k``, holding ``value``. ``None`` when every number below ``limit`` is taken.

    The store's unique (study, key) constraint makes the claim atomic on every backend: two
    processes never hold the same number. A retry after a lost commit answer finds the number
    the first attempt took (by its token) instead of taking a second one.
    """
    return retried(storage, _claim_once, storage, study_id, prefix, limit, value, uuid.uuid4().hex)


def release(storage: optuna.storages.RDBStorage, study_id: int, prefix: str, k: int) -> None:
    """Give back number ``k`` taken with :func:`claim`."""
    def delete():
        with storage.engine.begin() as conn:
            conn.execute(sa.delete(STUDY_SYSTEM_ATTRS).where(STUDY_SYSTEM_ATTRS.c.study_id == study_id,
                                                             STUDY_SYSTEM_ATTRS.c.key == f"{prefix}{k}"))
    retried(storage, delete)


def count_keys(conn: sa.Connection, study_id: int, prefix: str) -> int:
    """How many study keys start with ``prefix``."""
    return conn.execute(sa.select(sa.func.count()).select_from(STUDY_SYSTEM_ATTRS).where(
        STUDY_SYSTEM_ATTRS.c.study_id == study_id, STUDY_SYSTEM_ATTRS.c.key.like(prefix + "%"))).scalar_one()


def silent_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """Ids of RUNNING trials that never sent a heartbeat.

    A worker killed between starting a trial and its first heartbeat leaves one; Optuna's
    stale-trial check skips those, so the caller fails them once silent for the grace period.
    """
    def query():
        with storage.engine.connect() as conn:
            rows = conn.execute(
                sa.select(TRIALS.c.trial_id)
                .select_from(TRIALS.outerjoin(TRIAL_HEARTBEATS, TRIAL_HEARTBEATS.c.trial_id == TRIALS.c.trial_id))
                .where(TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.RUNNING,
                       TRIAL_HEARTBEATS.c.trial_id.is_(None)))
            return [row[0] for row in rows]
    return retried(storage, query)


def waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[tuple[int, bool]]:
    """(trial id, is a re-queued retry) of the study's WAITING trials: retries first, then
    enqueued ones, oldest first within each."""
    def query():
        retry = (sa.select(TRIAL_SYSTEM_ATTRS.c.trial_id)
                 .where(TRIAL_SYSTEM_ATTRS.c.trial_id == TRIALS.c.trial_id, TRIAL_SYSTEM_ATTRS.c.key == RETRY_ATTR)
                 .exists())
        with storage.engine.connect() as conn:
            rows = conn.execute(sa.select(TRIALS.c.trial_id, retry)
                                .where(TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.WAITING)
                                .order_by(TRIALS.c.trial_id))
            found = [(row[0], bool(row[1])) for row in rows]
        return sorted(found, key=lambda row: not row[1])
    return retried(storage, query)


def unfinished(storage: optuna.storages.RDBStorage, study_id: int) -> tuple[int, int]:
    """(RUNNING trials, WAITING retries) of the study: work that may still come back to a worker."""
    def query():
        retry = (sa.select(TRIAL_SYSTEM_ATTRS.c.trial_id)
                 .where(TRIAL_SYSTEM_ATTRS.c.trial_id == TRIALS.c.trial_id, TRIAL_SYSTEM_ATTRS.c.key == RETRY_ATTR)
                 .exists())
        with storage.engine.connect() as conn:
            running = conn.execute(sa.select(sa.func.count()).select_from(TRIALS).where(
                TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.RUNNING)).scalar_one()
            waiting = conn.execute(sa.select(sa.func.count()).select_from(TRIALS).where(
                TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.WAITING, retry)).scalar_one()
        return running, waiting
    return retried(storage, query)


def study_identity(storage: optuna.storages.RDBStorage, name: str, key: str) -> tuple[int, object] | None:
    """(id, value of the study system attr ``key`` or ``None``) of study ``name``, or ``None`` when
    there is no such study: one query."""
    def query():
        with storage.engine.connect() as conn:
            row = conn.execute(sa.select(STUDIES.c.study_id, STUDY_SYSTEM_ATTRS.c.value_json).select_from(
                STUDIES.outerjoin(STUDY_SYSTEM_ATTRS, sa.and_(STUDY_SYSTEM_ATTRS.c.study_id == STUDIES.c.study_id,
                                                              STUDY_SYSTEM_ATTRS.c.key == key)))
                .where(STUDIES.c.study_name == name)).first()
        if row is None:
            return None
        return row[0], None if row[1] is None else json.loads(row[1])
    return retried(storage, query)
