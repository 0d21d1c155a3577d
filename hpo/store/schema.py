"""Creating the store's schema safely when several processes open a fresh database at once.

SLURM arrays and Kubernetes pods start their workers together: without a lock, two processes
creating Optuna's tables on an empty PostgreSQL database collide in the catalog
(``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``), and two on a
fresh SQLite file in "table already exists". Schema creation therefore runs under a lock the
database itself provides: an advisory lock on PostgreSQL, ``GET_LOCK`` on MySQL/MariaDB, and an
exclusive ``flock`` on a file beside a SQLite store.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from hpo.store.config import driver_url, engine_kwargs, sqlite_path

LOCK_NAME = "hpo_schema"
PG_LOCK_KEY = 0x6870_6F5F  # "hpo_": an arbitrary 64-bit key, the same in every hpo process
LOCK_TIMEOUT_S = 120


def schema_revision(url: str) -> str | None:
    """The revision of Optuna's schema at ``url`` (alembic's), or ``None`` when the schema is not
    all there yet: then opening the store creates it, under :func:`schema_lock`. Read on one
    connection, closed after.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the database cannot be reached.
    """
    from hpo.store.optuna_private import METADATA

    kwargs = engine_kwargs(url)
    engine = sa.create_engine(driver_url(url), poolclass=sa.pool.NullPool,
                              connect_args=kwargs.get("connect_args", {}))
    try:
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
            if not {t.name for t in METADATA.sorted_tables} <= names or "alembic_version" not in names:
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Hold the store-wide schema lock of ``url`` for the block (other holders wait).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the database cannot be reached (or the lock is not
            granted within two minutes, on MySQL/MariaDB).
    """
    path = sqlite_path(url)
    if path is not None:
        if str(path) in ("", ":memory:"):
            yield
            return
        with open(Path(f"{path}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    engine = sa.create_engine(driver_url(url), **{**engine_kwargs(url), "pool_size": 1, "max_overflow": 0})
    try:
        with engine.connect() as conn:
            dialect = conn.dialect.name
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
                release = sa.text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY}
            elif dialect in ("mysql", "mariadb"):
                got = conn.execute(sa.text("SELECT GET_LOCK(:name, :timeout)"),
                                   {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_S}).scalar()
                if got != 1:
                    raise sa.exc.OperationalError("GET_LOCK", {}, TimeoutError(f"schema lock {LOCK_NAME} not granted"))
                release = sa.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME}
            else:
                release = None
            conn.commit()
            try:
                yield
            finally:
                if release is not None:
                    conn.execute(*release)
                    conn.commit()
    finally:
        engine.dispose()
