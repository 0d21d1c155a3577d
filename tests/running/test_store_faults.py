"""Store faults at every moment of a worker's life, on the real servers: an outage longer than the
retry window (a TCP proxy the test cuts), a full disk under SQLite, connections killed while
workers start, a role limited to N connections. None of them is booked as a trial's failure: the
budget stays exact and nothing is left RUNNING once a worker returns."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid

import pytest
from optuna.trial import TrialState
from tcp_proxy import Proxy
from test_faults import FAST_HEARTBEAT, LONG_EPOCHS, create, running_with_reports, slow_spec, trials_of, wait_for
from test_parallel import budget_trials, fast_spec, start_worker


def _pg_conn():
    """An autocommit connection to the test server as its superuser."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)
    conn.autocommit = True
    return conn


LOADED = 900  # seconds: CI machines run many suites at once (a LONG_EPOCHS trial took minutes there)


def _log(path) -> str:
    return path.read_text() if path.exists() else ""


def _assert_nothing_lost(url: str, budget: int, victim) -> None:
    trials = {t.number: t for t in trials_of(url)}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert len(budget_trials(url, "regression")) == budget
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["fail_reason"].startswith("worker lost"), trials[victim.number].user_attrs
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state.is_finished()
    store_faults = [t.number for t in trials.values() if "Error" in t.user_attrs.get("fail_reason", "")]
    assert not store_faults, f"trials failed for the store's fault: {store_faults}"


@pytest.mark.postgres
@pytest.mark.slow
def test_an_outage_longer_than_the_retry_window_stops_the_worker_and_costs_no_budget(tmp_path, pg_url):
    create(slow_spec(tmp_path, 2, LONG_EPOCHS), pg_url)
    proxy = Proxy(("127.0.0.1", 5432))
    try:
        env = dict(os.environ, HPO_STORAGE=proxy.url(pg_url), HPO_STORE_RETRY="3", **FAST_HEARTBEAT)
        proc = start_worker(env, "regression", tmp_path / "lost.log")
        victim = wait_for(lambda: running_with_reports(pg_url, proc.pid), timeout=LOADED)
        proxy.cut()
        cut_at = time.monotonic()
        assert proc.wait(timeout=LOADED) == 75, _log(tmp_path / "lost.log")
        # It stopped training at the first beat past the window, not at the end of the trial.
        assert time.monotonic() - cut_at < 60, _log(tmp_path / "lost.log")
        text = _log(tmp_path / "lost.log")
        assert "store unreachable" in text and "retrying for up to 3 s (HPO_STORE_RETRY sets it)" in text, text
        last = text.strip().splitlines()[-1]
        assert last.startswith("hpo: error: worker 0 stopped: ") and "unreachable since" in last, text
        assert f"its trial {victim.number} stays RUNNING" in last and "Traceback" not in text, text
        # Not booked as the trial's failure: it is still RUNNING, in its budget place.
        assert {t.number: t.state for t in trials_of(pg_url)}[victim.number] == TrialState.RUNNING
        proxy.restore()
        after = start_worker(env, "regression", tmp_path / "next.log")
        assert after.wait(timeout=LOADED) == 0, _log(tmp_path / "next.log")
    finally:
        proxy.close()
    _assert_nothing_lost(pg_url, 2, victim)


@contextlib.contextmanager
def _small_filesystem(path, megabytes: int):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder) -> None:
    """Write a file until the file system has no space left."""
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


@pytest.mark.slow
def test_a_full_disk_under_a_sqlite_store_is_one_line_and_nothing_is_lost(tmp_path):
    import sqlite3

    with _small_filesystem(tmp_path / "fs", 16) as fs:
        url = f"sqlite:///{fs / 'hpo.db'}"
        create(slow_spec(tmp_path, 2, LONG_EPOCHS), url)
        env = dict(os.environ, HPO_STORAGE=url, **FAST_HEARTBEAT)
        proc = start_worker(env, "regression", tmp_path / "full.log")
        victim = wait_for(lambda: running_with_reports(url, proc.pid), timeout=LOADED)
        _fill(fs)
        code = proc.wait(timeout=LOADED)
        text = _log(tmp_path / "full.log")
        assert code == 74 and "Traceback" not in text, text
        last = text.strip().splitlines()[-1]
        assert last.startswith("hpo: error: worker 0 stopped: ") and "disk is full" in last, text
        (fs / "filler").unlink()
        conn = sqlite3.connect(fs / "hpo.db")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
        assert {t.number: t.state for t in trials_of(url)}[victim.number] == TrialState.RUNNING
        after = start_worker(env, "regression", tmp_path / "next.log")
        assert after.wait(timeout=LOADED) == 0, _log(tmp_path / "next.log")
        _assert_nothing_lost(url, 2, victim)


def _kill_connections(dbname: str, stop: threading.Event, every: float) -> None:
    conn = _pg_conn()
    with conn.cursor() as cur:
        while not stop.wait(every):
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
    conn.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_four_workers_start_while_connections_are_killed_every_0_2_s(tmp_path, pg_url):
    create(fast_spec(tmp_path, 8, epochs=(5, 15)), pg_url)
    env = dict(os.environ, HPO_STORAGE=pg_url, PYTHONUNBUFFERED="1")
    stop = threading.Event()
    killer = threading.Thread(target=_kill_connections, args=(pg_url.rsplit("/", 1)[1], stop, 0.2), daemon=True)
    killer.start()
    try:
        logs = [tmp_path / f"w{i}.log" for i in range(4)]
        procs = [start_worker(env, "regression", log) for log in logs]
        # Every worker past its start (it said which worker it is) while the kills go on.
        wait_for(lambda: all("for study 'regression'" in _log(log) for log in logs), timeout=LOADED,
                 what="every worker to start")
    finally:
        stop.set()
        killer.join()
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=LOADED) == 0, _log(log)
    assert any("store unreachable" in _log(log) for log in logs)  # the kills did reach them
    assert len(budget_trials(pg_url, "regression")) == 8
    assert not [t for t in trials_of(pg_url) if t.state == TrialState.RUNNING]


def _limit(role: str, n: int) -> None:
    conn = _pg_conn()
    with conn.cursor() as cur:
        cur.execute(f"ALTER ROLE {role} CONNECTION LIMIT {n}")
    conn.close()


@pytest.fixture
def limited_role(pg_url):
    """A role that owns the test's database: (its name, its URL)."""
    name = f"hpo_lim_{uuid.uuid4().hex[:8]}"
    dbname = pg_url.rsplit("/", 1)[1]
    conn = _pg_conn()
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {name} LOGIN")
        cur.execute(f"ALTER DATABASE {dbname} OWNER TO {name}")
    conn.close()
    try:
        yield name, pg_url.replace("postgres@", f"{name}@")
    finally:
        conn = _pg_conn()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            cur.execute(f"DROP ROLE IF EXISTS {name}")
        conn.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_role_limited_to_2_connections_runs_2_workers(tmp_path, limited_role):
    """Opening the store and running trials take one connection per worker, never two: with
    two workers on a role of two connections nobody meets "too many connections"."""
    role, url = limited_role
    # The store's very first open creates Optuna's schema: that holds up to three connections for
    # a moment (docs/scaling.md). Every open after it takes one.
    create(fast_spec(tmp_path, 6, epochs=(5, 15)), url)
    _limit(role, 2)
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1", HPO_STORE_RETRY="0",
               HPO_HEARTBEAT_INTERVAL="1", HPO_GRACE_PERIOD="30")
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start_worker(env, "regression", log) for log in logs]
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=LOADED) == 0, _log(log)
    text = "".join(_log(log) for log in logs)
    assert "too many connections" not in text and "store unreachable" not in text, text
    _limit(role, -1)  # the test's own reads
    assert len(budget_trials(url, "regression")) == 6


@pytest.mark.slow
def test_workers_in_two_time_zones_write_true_times(tmp_path, store_url):
    """Optuna 5 stores trial times in UTC: a worker in Tokyo and one in New York (the second runs
    the first's interrupted trial again) give durations and a wall time within the real run."""
    import datetime
    import json
    import signal

    from conftest import run_hpo

    create(slow_spec(tmp_path, 2, LONG_EPOCHS), store_url)
    base = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    began = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    start = time.monotonic()
    tokyo = start_worker(dict(base, TZ="Asia/Tokyo"), "regression", tmp_path / "tokyo.log")
    wait_for(lambda: running_with_reports(store_url, tokyo.pid), timeout=LOADED)
    tokyo.send_signal(signal.SIGTERM)  # its trial: FAIL and re-queued (hpo's own writes of trial times)
    assert tokyo.wait(timeout=LOADED) == 0, _log(tmp_path / "tokyo.log")
    new_york = start_worker(dict(base, TZ="America/New_York"), "regression", tmp_path / "ny.log")
    assert new_york.wait(timeout=LOADED) == 0, _log(tmp_path / "ny.log")
    elapsed = time.monotonic() - start
    ended = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    trials = trials_of(store_url)
    assert len(trials) == 3 and any(t.system_attrs.get("failed_trial") is not None for t in trials)
    for t in trials:  # Optuna 5 reads them as local times of this process, without a zone
        assert began <= t.datetime_start.astimezone() <= t.datetime_complete.astimezone() <= ended, (
            t.number, t.datetime_start, t.datetime_complete, began, ended)
        assert datetime.timedelta(0) <= t.duration <= datetime.timedelta(seconds=elapsed + 1)
    for tz in ("Asia/Tokyo", "America/New_York", "UTC"):
        stats = json.loads(run_hpo("status", "--study", "regression", "--json", env=dict(base, TZ=tz), check=0).stdout)
        assert 0 < stats["wall_seconds"] <= elapsed + 1, (tz, stats["wall_seconds"], elapsed)


@pytest.mark.slow
def test_a_study_replaced_under_a_worker_stops_it_with_one_line_and_exit_0(tmp_path, store_url):
    from conftest import run_hpo

    spec = slow_spec(tmp_path, 3, LONG_EPOCHS)
    create(spec, store_url)
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    proc = start_worker(env, "regression", tmp_path / "w.log")
    wait_for(lambda: running_with_reports(store_url, proc.pid), timeout=LOADED)
    run_hpo("create-study", str(spec), "--force", env=env, check=0)
    assert proc.wait(timeout=LOADED) == 0, _log(tmp_path / "w.log")
    text = _log(tmp_path / "w.log")
    assert "study 'regression' was deleted or replaced; stopping" in text and "Traceback" not in text, text
    assert "error" not in text.lower(), text
    # The new study got nothing from the old worker (SQLite may reuse the old trials' ids).
    assert trials_of(store_url) == []


@pytest.mark.postgres
@pytest.mark.slow
def test_fleet_gives_its_workers_the_store_url_in_the_environment_not_on_the_command_line(tmp_path, pg_url):

    from conftest import HPO, REPO

    create(fast_spec(tmp_path, 2, epochs=(5, 15)), pg_url)
    url = pg_url.replace("postgres@", "postgres:s3cretPW@")  # trust auth: the password is not checked
    env = {k: v for k, v in os.environ.items() if k != "HPO_STORAGE"}
    fleet = subprocess.Popen([*HPO, "fleet", "--study", "regression", "--workers", "2", "--storage", url], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in fleet.stdout:
        lines.append(line)
        if "workers (pids" in line:
            break
    pids = [int(p) for p in lines[-1].split("pids ", 1)[1].rstrip(")\n").split()]
    seen = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            seen.append((open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(),
                         open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")))
    out = "".join(lines) + fleet.communicate(timeout=LOADED)[0]
    assert fleet.returncode == 0, out
    assert seen and all("s3cretPW" not in cmdline and "--storage" not in cmdline for cmdline, _ in seen), seen
    assert all(f"HPO_STORAGE={url}" in environ for _, environ in seen)
    assert "s3cretPW" not in out
    assert len(budget_trials(pg_url, "regression")) == 2
