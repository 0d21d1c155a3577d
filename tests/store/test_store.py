"""The store: URLs and masking, clear errors, atomic claims, transient-error retries, on every backend."""

from __future__ import annotations

import subprocess
import threading
import time

import optuna
import pytest
import sqlalchemy.exc
from conftest import HPO, REPO, run_hpo, sqlite_locked_error

from hpo.errors import StoreError, StoreUnreachable
from hpo.store.config import engine_kwargs, mask_url, sqlite_path
from hpo.store.queries import claim, release
from hpo.store.retry import call_retrying, is_transient
from hpo.store.storage import open_storage

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL_ADMIN = "mysql+pymysql://root@127.0.0.1:3306/test"


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:s3cret@db:5432/hpo", "postgresql://u:***@db:5432/hpo"),
    ("postgresql+psycopg2://u:p@ss/w@rd@db/hpo", "postgresql+psycopg2://u:***@db/hpo"),
    ("mysql+pymysql://root:pw@127.0.0.1:3306/x", "mysql+pymysql://root:***@127.0.0.1:3306/x"),
    ("error at postgresql://u:pw@h/d; retry", "error at postgresql://u:***@h/d; retry"),
    ("postgresql://h/d?user=u&password=pw&sslmode=require", "postgresql://h/d?user=u&password=***&sslmode=require"),
    ("sqlite:///storage/hpo.db", "sqlite:///storage/hpo.db"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://user:{pw}@/db?host=/var/run/postgresql",
    "postgresql://:{pw}@db/hpo",
    "postgresql+psycopg2://u:{pw}@/hpo?host=h1:5432&host=h2:5433&target_session_attrs=read-write",
    "postgresql://u@h/d?password={pw}",
    "postgresql://u@h/d?sslmode=require&PASSWORD={pw}&application_name=x",
    "postgresql://u@h/d?sslpassword={pw}",
    "mysql+pymysql://u@h/d?passwd={pw}&charset=utf8mb4",
    "mysql+mysqldb://u:{pw}@h/d",
    "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC%7D%3BSERVER%3Dh%3BUID%3Du%3BPWD%3D{pw}%3BDATABASE%3Dd",
    "host=h dbname=d user=u password={pw} sslmode=require",
    "host=h password='{pw}' user=u",
])
@pytest.mark.parametrize("pw", ["s3cret", "p%40ss%3Aw%2Frd", "p@ss:w/rd", "a%20b"])
def test_mask_url_hides_the_password_in_every_form(url, pw):
    """Every URL form SQLAlchemy (and the drivers' DSNs in their errors) accept: what SQLAlchemy
    reads as the password never appears in the masked text."""
    text = url.format(pw=pw)
    if ("@" in pw or ":" in pw) and "?" in url and "{pw}@" not in url:
        pytest.skip("an unencoded @ or : is not valid in a query value")
    masked = mask_url(f"cannot open the store {text}: refused")
    assert pw not in masked and "***" in masked, masked
    if "://" in text and "@" not in pw:
        parsed = sqlalchemy.engine.make_url(text)
        for secret in (parsed.password, *(v for k, v in parsed.query.items() if "pass" in k.lower())):
            if secret:
                assert str(secret) not in masked, masked


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg2"])
def test_plain_postgresql_urls_work(scheme, pg_url):
    storage = open_storage(pg_url.replace("postgresql+psycopg2", scheme))
    optuna.create_study(study_name="plain", storage=storage)
    assert [s.study_name for s in storage.get_all_studies()] == ["plain"]
    storage.engine.dispose()


def test_hpo_connects_through_psycopg2_whatever_the_scheme_says():
    # SQLAlchemy 2.1 maps a bare scheme to psycopg 3 (there for plain Optuna and optuna-dashboard);
    # hpo's retry rules are written against psycopg2.
    from hpo.store.config import driver_url

    assert driver_url("postgresql://u@h/d") == driver_url("postgres://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert driver_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert driver_url("sqlite:///x.db") == "sqlite:///x.db"


def test_server_engines_are_sized_for_one_worker():
    kw = engine_kwargs("postgresql://u@h/d")
    assert kw["pool_pre_ping"] and kw["pool_size"] == 1 and kw["max_overflow"] == 0
    assert kw["connect_args"]["connect_timeout"] > 0


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg2://nobody:s3cretPW@127.0.0.1:5432/test", "s3cretPW"),  # unknown role
    ("postgresql+psycopg2://postgres:s3cretPW@127.0.0.1:5432/no_such_db", "s3cretPW"),  # missing database
    ("postgresql://u:s3cretPW@no-such-host.invalid:5432/test", "s3cretPW"),  # wrong host name
    ("mysql+pymysql://root:s3cretPW@127.0.0.1:3306/test", "s3cretPW"),  # wrong password
    ("mysql+pymysql://root@127.0.0.1:3306/no_such_db", "root@"),  # missing database
])
def test_bad_store_is_one_masked_line_and_exit_2(url, secret, cli_env):
    """A store URL that is wrong fails at once (no retry), in one line, password masked."""
    start = time.monotonic()
    proc = run_hpo("studies", "--storage", url, env=cli_env, check=2)
    assert time.monotonic() - start < 20
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpo: error: cannot open the store"), proc.stderr
    assert "retrying" not in proc.stderr
    if secret != "root@":
        assert secret not in proc.stderr + proc.stdout and "***" in lines[0]


def test_an_unreachable_store_says_at_once_that_it_retries_then_exits_75(cli_env):
    """Nothing listens on the port: a server starting up or failing over looks the same, so
    opening retries for HPO_STORE_RETRY, saying so on its first line, then exits 75."""
    env = dict(cli_env, HPO_STORE_RETRY="3")
    proc = subprocess.Popen([*HPO, "worker", "--study", "x", "--storage", "postgresql://u:s3cretPW@127.0.0.1:1/test"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # before the window ends: said at once
    assert proc.poll() is None, first
    assert "store unreachable" in first and "retrying for up to 3 s (HPO_STORE_RETRY sets it)" in first, first
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 75, first + rest
    lines = rest.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpo: error: cannot open the store postgresql://u:***@"), rest
    assert "unreachable since" in lines[0] and "s3cretPW" not in first + rest


def test_claims_are_atomic_and_bounded(any_url):
    storage = open_storage(any_url)
    optuna.create_study(study_name="claims", storage=storage)
    study_id = storage.get_study_id_from_name("claims")
    got: list[int | None] = []

    def grab():
        got.append(claim(open_storage(any_url), study_id, "hpo:budget:", limit=5, value="t"))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for k in got if k is not None) == [0, 1, 2, 3, 4]
    assert got.count(None) == 3
    release(storage, study_id, "hpo:budget:", 2)
    assert claim(storage, study_id, "hpo:budget:", limit=5) == 2
    assert claim(storage, study_id, "hpo:budget:", limit=5) is None
    assert claim(storage, study_id, "hpo:worker:") == 0
    assert {k for k in storage.get_study_system_attrs(study_id) if k.startswith("hpo:budget:")} == {f"hpo:budget:{k}" for k in range(5)}


def test_transient_errors_are_retried_then_given_up(tmp_path):
    calls = []
    locked = sqlite_locked_error(tmp_path)
    assert is_transient(locked)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise optuna.exceptions.StorageInternalError("commit failed") from locked
        return "ok"

    assert is_transient(optuna.exceptions.StorageInternalError("x").with_traceback(None)) is False
    assert call_retrying(10, flaky) == "ok" and len(calls) == 3

    def always():
        raise locked

    start = time.monotonic()
    with pytest.raises(StoreUnreachable, match=r"unreachable since .* UTC .*HPO_STORE_RETRY=1\): database is locked") as e:
        call_retrying(1.0, always)
    assert time.monotonic() - start < 3 and e.value.exit_code == 75
    assert isinstance(e.value.__cause__, sqlalchemy.exc.OperationalError)
    assert not is_transient(e.value)  # an outer retry loop does not wait the window again

    def bug():
        calls.append(1)
        raise ValueError("not a store problem")

    calls.clear()
    with pytest.raises(ValueError):
        call_retrying(10, bug)
    assert len(calls) == 1


@pytest.mark.parametrize("interval, grace", [("10", "soon"), ("10", "10"), ("5", "3")])
def test_bad_environment_knob_is_a_store_error(store_url, monkeypatch, interval, grace):
    monkeypatch.setenv("HPO_HEARTBEAT_INTERVAL", interval)
    monkeypatch.setenv("HPO_GRACE_PERIOD", grace)
    with pytest.raises(StoreError, match="HPO_GRACE_PERIOD"):
        open_storage(store_url)
    assert not sqlite_path(store_url).parent.exists()  # nothing written


def test_every_backend_call_of_optunas_cache_is_retried():
    """Optuna wraps the storage in _CachedStorage, which calls the RDB backend's private methods
    directly; each one that touches the database must reach a retried method (through the hook that
    hpo.store.optuna_private gives it), or a restart of the server in the middle of it ends the worker
    (seen once in CI before they were wrapped)."""
    import inspect
    import re

    from optuna.storages import _cached_storage

    from hpo.store.storage import RetryingRDBStorage
    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    not_db = {"create_new_study", "delete_study", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    assert called - not_db, "no backend calls found: Optuna's cache changed shape"
    hooks = RetryingRDBStorage.HOOKS
    unwrapped = sorted(name for name in called - not_db
                       if not hasattr(getattr(RetryingRDBStorage, hooks.get(name, name)), "__wrapped__"))
    assert unwrapped == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                                     pytest.param("mysql", marks=pytest.mark.mysql)])
def test_processes_opening_a_fresh_database_together_never_collide(tmp_path, request, backend, cli_env):
    """SLURM arrays and Kubernetes pods start together: several create-study and other commands on an
    empty database must not collide while creating the schema (once: a pg_type duplicate key)."""
    import subprocess

    from conftest import HPO, REPO, small_regression_spec

    url = cli_env["HPO_STORAGE"] if backend == "sqlite" else request.getfixturevalue(
        "pg_url" if backend == "postgres" else "mysql_url")
    env = dict(cli_env, HPO_STORAGE=url)
    spec = str(small_regression_spec(tmp_path))
    commands = [["create-study", spec]] * 3 + [["studies"]] * 2
    procs = [subprocess.Popen([*HPO, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in commands]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    text = "\n".join(out + err for out, err in outs)
    assert sorted(codes[:3]) == [0, 2, 2] and codes[3:] == [0, 0], text
    assert "Traceback" not in text and "duplicate" not in text.lower(), text
    assert sum("already exists" in err for _, err in outs[:3]) == 2, text
