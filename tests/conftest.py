"""Shared fixtures: temporary stores, small specs, and the CLI through its real entry point."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"
HPO = [sys.executable, "-m", "hpo.cli"]


@pytest.fixture(scope="session", autouse=True)
def session_data_cache(tmp_path_factory):
    """Data fetched from the store never land in the user's cache, module-scoped fixtures included."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HPO_CACHE_DIR", str(tmp_path_factory.mktemp("data-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def data_cache(tmp_path: Path, monkeypatch) -> Path:
    """Each test's own cache of data fetched from the store (HPO_CACHE_DIR; the CLI inherits it)."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("HPO_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny models: thread hand-offs on a shared 2-core machine cost more than the arithmetic they split
    (the worker does the same)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh SQLite store in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'store' / 'hpo.db'}"


@pytest.fixture
def cli_env(tmp_path: Path, store_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HPO_STORAGE"] = store_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_hpo(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None,
            check: int | None = None) -> subprocess.CompletedProcess:
    """Run ``hpo ARGS`` in a subprocess; with ``check``, assert that exit code."""
    proc = subprocess.run([*HPO, *args], env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"hpo {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def small_regression_spec(tmp_path: Path, **overrides) -> Path:
    """The shipped regression spec made small (few epochs) so a study runs in seconds; returns its path."""
    raw = yaml.safe_load((STUDIES / "regression.yaml").read_text())
    raw["data"]["train"] = str(STUDIES / "data" / "regression_train.csv")
    raw["data"]["test"] = str(STUDIES / "data" / "regression_test.csv")
    raw["space"]["epochs"] = {"int": [20, 60], "step": 10}
    raw["report_every"] = 5
    raw["pruner"] = {"kind": "median", "n_startup_trials": 3, "n_warmup_steps": 5}
    raw["sampler"] = {"kind": "tpe", "n_startup_trials": 4}
    raw["budget"] = {"n_trials": 12}
    for key, value in overrides.items():
        raw[key] = value
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sqlite_locked_error(tmp_path: Path):
    """A real "database is locked" from SQLite: another connection holds the write lock."""
    import sqlite3

    import sqlalchemy

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    except sqlalchemy.exc.OperationalError as e:
        return e
    finally:
        holder.close()
        engine.dispose()
    raise AssertionError("the write did not wait for the lock")


# Real database servers for the shared-store tests: a fresh database per test, dropped afterwards.

def _pg_conn(dbname: str = "test"):
    import psycopg2

    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=dbname, connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL unreachable: {e}")
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def new_pg_database(prefix: str = "hpo_test"):
    """A freshly created PostgreSQL database's URL, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = _pg_conn()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        conn = _pg_conn()  # a new connection: the test may have restarted the server
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.fixture
def pg_url():
    """A freshly created PostgreSQL database, dropped afterwards."""
    with new_pg_database() as url:
        yield url


def pg_connections(url: str) -> int:
    """Client connections to the database of ``url`` right now (pg_stat_activity)."""
    conn = _pg_conn()
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (url.rsplit("/", 1)[1],))
        (n,) = cur.fetchone()
    conn.close()
    return n


@contextlib.contextmanager
def new_mysql_database(prefix: str = "hpo_test"):
    """A freshly created MariaDB database's URL, dropped afterwards."""
    import pymysql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3,
                               autocommit=True)
    except pymysql.err.OperationalError as e:
        pytest.skip(f"MariaDB unreachable: {e}")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


@pytest.fixture
def mysql_url():
    """A freshly created MariaDB database, dropped afterwards."""
    with new_mysql_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mysql", marks=pytest.mark.mysql)])
def any_url(request, store_url):
    """The same test on SQLite, the real PostgreSQL and the real MariaDB."""
    if request.param == "sqlite":
        return store_url
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "mysql_url")
