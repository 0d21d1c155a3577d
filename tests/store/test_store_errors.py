"""Which store errors are retried: real errors from the real servers, classified by the driver's
error class or code. Connection and lock faults are retried; schema, permission and data errors
are not (waiting would not fix them)."""

from __future__ import annotations

import time

import optuna
import pytest
import sqlalchemy as sa
import sqlalchemy.exc

from hpo.store import optuna_private
from hpo.store.config import driver_url
from hpo.store.retry import is_transient
from hpo.store.storage import open_storage


def _error(url: str, sql: str, **engine_kwargs) -> sqlalchemy.exc.DBAPIError:
    engine = sa.create_engine(driver_url(url), **engine_kwargs)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    except sqlalchemy.exc.DBAPIError as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError(f"{sql!r} did not fail")


@pytest.mark.parametrize("sql", ["SELECT * FROM no_such_table", "SELEKT 1", "INSERT INTO studies (study_id, study_name) VALUES (1, 'a'), (1, 'b')"])
def test_sqlite_schema_and_syntax_errors_are_not_retried(store_url, sql):
    open_storage(store_url, heartbeat=False)
    assert not is_transient(_error(store_url, sql))


@pytest.mark.postgres
@pytest.mark.parametrize("sql", [
    "SELECT * FROM no_such_table",  # 42P01 undefined table
    "SELECT 'x'::integer",  # 22P02 invalid input
    "INSERT INTO studies (study_id, study_name) VALUES (1, 'a'), (1, 'b')",  # 23505 unique violation
    "SET ROLE no_such_role",  # 22023 / 42704
])
def test_postgres_schema_permission_and_data_errors_are_not_retried(pg_url, sql):
    open_storage(pg_url, heartbeat=False)
    assert not is_transient(_error(pg_url, sql))


@pytest.mark.postgres
def test_postgres_connection_faults_are_retried(pg_url):
    refused = _error("postgresql+psycopg2://postgres@127.0.0.1:1/test", "SELECT 1")
    assert is_transient(refused)
    # The server ends the session (what a restart does to every open connection).
    storage = open_storage(pg_url, heartbeat=False)
    engine = sa.create_engine(driver_url(pg_url), pool_pre_ping=False)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with storage.engine.begin() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        time.sleep(0.2)
        with pytest.raises(sqlalchemy.exc.DBAPIError) as dropped:
            conn.exec_driver_sql("SELECT 1")
    engine.dispose()
    assert is_transient(dropped.value)
    wrong_role = _error("postgresql+psycopg2://nobody@127.0.0.1:5432/test", "SELECT 1")
    assert not is_transient(wrong_role)


@pytest.mark.mysql
def test_mysql_errors_are_classified(mysql_url):
    open_storage(mysql_url, heartbeat=False)
    assert not is_transient(_error(mysql_url, "SELECT * FROM no_such_table"))  # 1146
    assert not is_transient(_error(mysql_url.replace("root@", "root:wrong@"), "SELECT 1"))  # 1045 access denied
    assert is_transient(_error("mysql+pymysql://root@127.0.0.1:1/test", "SELECT 1"))  # 2003 cannot connect


def test_a_schema_error_is_raised_at_once_not_retried(store_url, monkeypatch):
    """A missing table (someone dropped it) is not a connection fault: the call fails at once,
    not after HPO_STORE_RETRY seconds."""
    monkeypatch.setenv("HPO_STORE_RETRY", "30")
    storage = open_storage(store_url, heartbeat=False)
    trial = optuna.create_study(study_name="s", storage=storage).ask()
    with storage.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE trial_heartbeats")
    start = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError) as raised:  # Optuna's wrapping of the driver's error
        storage.record_heartbeat(optuna_private.trial_id(trial))
    assert time.monotonic() - start < 5 and not is_transient(raised.value)
    cause = raised.value.__cause__
    assert isinstance(cause, sqlalchemy.exc.OperationalError) and "no such table: trial_heartbeats" in str(cause)
