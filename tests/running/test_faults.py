"""Faults a worker must survive: failing trials, SIGTERM, a killed worker, a restarted PostgreSQL; and the fleet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import HPO, REPO, run_hpo
from optuna.trial import TrialState
from test_parallel import budget_trials, fast_spec, start_worker
from test_parallel import create as create_study

from hpo.errors import TrainingError
from hpo.running.worker import run_worker
from hpo.store import optuna_private
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage

FAST_HEARTBEAT = {"HPO_HEARTBEAT_INTERVAL": "1", "HPO_GRACE_PERIOD": "2", "PYTHONUNBUFFERED": "1"}


def create(spec_path: Path, url: str) -> None:
    """The study, with a heartbeat every second and a grace period of two for its workers."""
    create_study(spec_path, url, heartbeat=Heartbeat(interval=1, grace=2))


def slow_spec(tmp_path: Path, n_trials: int, epochs: tuple[int, int] = (150, 200)) -> Path:
    """Trials of several seconds without pruning, so a signal lands in the middle of one (a running
    trial's reports reach the store at its heartbeats, every second here)."""
    path = fast_spec(tmp_path, n_trials, epochs=epochs, pruner={"kind": "none"})
    raw = yaml.safe_load(path.read_text())
    raw["space"]["batch_size"] = {"int": [4, 5]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# Trials a signal or kill cannot miss: one sent after the first reports (1 s in) still finds the
# trial running on a loaded machine, where slow_spec's default trial can end in between (seen in CI:
# a 170-epoch trial done in 2.4 s, the SIGTERMs landing after the worker had restored the default
# handler). Tests that stop or kill workers mid-trial use these (~6 s a trial here).
LONG_EPOCHS = (400, 500)


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="regression", storage=open_storage(url, heartbeat=False)).get_trials()


def wait_for(predicate, timeout: float = 120, what: str = "the condition"):
    """``predicate()``'s first true value, polled every 0.2 s for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def running_with_reports(url: str, pid: int | None = None):
    """A RUNNING trial (of worker ``pid``) that has reported at least once: in the middle of training."""
    for t in trials_of(url):
        if t.state == TrialState.RUNNING and t.intermediate_values and (
                pid is None or t.user_attrs.get("worker", "").endswith(f":{pid}")):
            return t
    return None


def test_failing_trials_are_fail_with_reason_and_the_worker_goes_on(tmp_path, store_url, monkeypatch):
    import hpo.search.objective
    real_train, calls = hpo.search.objective.train, []

    def flaky_train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 3:
            raise TrainingError("training loss became nan at epoch 3; stopped (lower lr?)")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(hpo.search.objective, "train", flaky_train)
    create(fast_spec(tmp_path, 5), store_url)
    lines = []
    run_worker("regression", storage_url=store_url, echo=lines.append)
    trials = trials_of(store_url)
    assert [t.state for t in trials][1:3] == [TrialState.FAIL, TrialState.FAIL] and len(trials) == 5
    assert trials[1].user_attrs["fail_reason"].startswith("RuntimeError: CUDA out of memory")
    assert "nan" in trials[2].user_attrs["fail_reason"]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials[3:])
    assert any("CUDA out of memory" in line for line in lines)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_objective_value_is_fail_and_the_worker_goes_on(tmp_path, store_url, monkeypatch, bad):
    import hpo.search.objective
    real_train, calls = hpo.search.objective.train, []

    def train_with_a_bad_value(*args, **kwargs):
        calls.append(1)
        result = real_train(*args, **kwargs)
        if len(calls) == 2:
            result.metrics["val_mse"] = bad
        return result

    monkeypatch.setattr(hpo.search.objective, "train", train_with_a_bad_value)
    create(fast_spec(tmp_path, 3, pruner={"kind": "none"}), store_url)
    run_worker("regression", storage_url=store_url, echo=lambda line: None)
    trials = trials_of(store_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"] == f"objective value is {bad}"


def test_a_trial_failed_elsewhere_is_dropped_and_the_worker_goes_on(tmp_path, store_url, monkeypatch, capfd):
    """Another process fails the running trial (it found it stale during a long store outage, or an
    operator did): the worker stops training it within a heartbeat, says so in one line, runs on."""
    import hpo.search.objective
    from hpo.store import budget
    real_train, calls = hpo.search.objective.train, []
    other = open_storage(store_url, heartbeat=False)

    def train_while_failed_elsewhere(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            running = [t for t in trials_of(store_url) if t.state == TrialState.RUNNING]
            assert budget.fail_trial(other, running[0], reason="worker lost: test", requeue=True)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(hpo.search.objective, "train", train_while_failed_elsewhere)
    create(slow_spec(tmp_path, 3), store_url)
    run_worker("regression", storage_url=store_url, echo=lambda line: None)
    trials = trials_of(store_url)
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["fail_reason"] == "worker lost: test"
    assert [t.system_attrs.get("failed_trial") for t in trials].count(1) == 1
    assert len(budget_trials(store_url, "regression")) == 3
    assert all(t.state.is_finished() for t in trials)
    err = capfd.readouterr().err
    assert err.count("was finished elsewhere") == 1 and "Traceback" not in err


def test_trial_of_a_worker_dead_before_its_first_heartbeat_is_retried(tmp_path, store_url, monkeypatch):
    from hpo.store import budget
    create(fast_spec(tmp_path, 2), store_url)
    storage = open_storage(store_url)
    study_id = storage.get_study_id_from_name("regression")
    # What a worker killed right after starting its trial leaves: a RUNNING trial holding a budget
    # place, with its parameters and no heartbeat.
    orphan = budget.start_trial(storage, study_id, budget=2)
    for name, dist, value in (("n_layers", optuna.distributions.IntDistribution(1, 3), 1),
                              ("lr", optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True), 1e-3)):
        storage.set_trial_param(optuna_private.trial_id(orphan), name, dist.to_internal_repr(value), dist)
    storage.engine.dispose()
    run_worker("regression", storage_url=store_url, echo=lambda line: None)
    trials = trials_of(store_url)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("worker lost")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].params["n_layers"] == 1 and retries[0].params["lr"] == 1e-3
    assert len(budget_trials(store_url, "regression")) == 2 and len(trials) == 3


def test_sigterm_fails_and_requeues_the_running_trial_then_exits_0(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 1, LONG_EPOCHS), env["HPO_STORAGE"])
    log = tmp_path / "w.log"
    proc = start_worker(env, "regression", log)
    victim = wait_for(lambda: running_with_reports(store_url))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "interrupted" in log.read_text()
    trials = trials_of(store_url)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"] == "interrupted"
    assert len(trials) == 2 and trials[1].state == TrialState.WAITING and trials[1].params == victim.params
    assert len(budget_trials(store_url, "regression")) == 0
    # The next worker runs the re-queued copy, which finishes the budget of one trial.
    run_worker("regression", storage_url=store_url, echo=lambda line: None)
    trials = trials_of(store_url)
    assert len(trials) == 2 and trials[1].state == TrialState.COMPLETE
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].user_attrs["retries"] == 1
    assert len(budget_trials(store_url, "regression")) == 1
    # Status counts what happened: the SIGTERM'd trial is interrupted (re-queued), not a failure.
    stats = json.loads(run_hpo("status", "--study", "regression", "--json", env=env, check=0).stdout)
    assert (stats["failed"], stats["interrupted"], stats["finished"]) == (0, 1, 1)
    text = run_hpo("status", "--study", "regression", env=env, check=0).stdout
    assert "Number of failed trials:   0" in text and "Interrupted (re-queued):   1" in text
    header, row = run_hpo("studies", env=env, check=0).stdout.splitlines()
    assert dict(zip(header.split()[1:6], row.split()[1:6], strict=True)) == {
        "complete": "1", "pruned": "0", "failed": "0", "interrupted": "1", "running": "0"}


def test_second_signal_exits_at_once(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 1, LONG_EPOCHS), store_url)
    proc = start_worker(env, "regression", tmp_path / "w.log")
    wait_for(lambda: running_with_reports(store_url))
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert "second signal, exiting now" in (tmp_path / "w.log").read_text()


def test_the_same_signal_twice_at_once_is_one_stop_request(tmp_path, store_url):
    """SLURM signals every process of a task and hpo fleet forwards its own copy: a worker that
    gets SIGTERM twice within a moment still stops cleanly, its trial re-queued."""
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 1, LONG_EPOCHS), store_url)
    proc = start_worker(env, "regression", tmp_path / "w.log")
    wait_for(lambda: running_with_reports(store_url))
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "w.log").read_text()
    assert [t.state for t in trials_of(store_url)] == [TrialState.FAIL, TrialState.WAITING]


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_worker_trial_is_retried_with_its_parameters(tmp_path, pg_url):
    env = dict(os.environ, HPO_STORAGE=pg_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 2, LONG_EPOCHS), env["HPO_STORAGE"])
    victim_proc = start_worker(env, "regression", tmp_path / "victim.log")
    victim = wait_for(lambda: running_with_reports(pg_url, victim_proc.pid))
    survivor = start_worker(env, "regression", tmp_path / "survivor.log")
    victim_proc.kill()
    victim_proc.wait()
    assert survivor.wait(timeout=120) == 0
    text = (tmp_path / "survivor.log").read_text()
    assert "Traceback" not in text and "error" not in text.lower(), text
    trials = {t.number: t for t in trials_of(pg_url)}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["retries"] == 1
    assert len(budget_trials(pg_url, "regression")) == 2
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials.values())


@pytest.mark.postgres
@pytest.mark.slow
def test_workers_survive_a_postgres_restart(tmp_path, pg_url):
    cluster = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    if cluster is None or subprocess.run(["which", "pg_ctlcluster"], capture_output=True).returncode:
        pytest.skip("pg_ctlcluster not available")
    env = dict(os.environ, HPO_STORAGE=pg_url, PYTHONUNBUFFERED="1")
    create_study(fast_spec(tmp_path, 16, epochs=(20, 40)), env["HPO_STORAGE"])
    procs = [start_worker(env, "regression", tmp_path / f"w{i}.log") for i in range(2)]
    wait_for(lambda: sum(t.state.is_finished() for t in trials_of(pg_url)) >= 3)
    subprocess.run(["pg_ctlcluster", cluster, "main", "restart"], check=True, timeout=60)
    for i, p in enumerate(procs):
        assert p.wait(timeout=120) == 0, (tmp_path / f"w{i}.log").read_text()
    trials = trials_of(pg_url)
    assert len({t.number for t in trials}) == len(trials)
    assert len(budget_trials(pg_url, "regression")) == 16
    assert all(t.state.is_finished() for t in trials)


@pytest.mark.slow
def test_fleet_runs_workers_and_stops_them_on_sigterm(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 3, LONG_EPOCHS), store_url)
    fleet = subprocess.Popen([*HPO, "fleet", "--study", "regression", "--device", "cpu", "--workers", "2"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: sum(t.state == TrialState.RUNNING and bool(t.intermediate_values)
                         for t in trials_of(store_url)) == 2)
    fleet.send_signal(signal.SIGINT)
    out, _ = fleet.communicate(timeout=60)
    assert fleet.returncode == 0, out
    assert out.count("interrupted: the running trial is re-queued") == 2, out
    assert "[w0]" in out and "[w1]" in out and "all exit 0" in out
    states = sorted(t.state.name for t in trials_of(store_url))
    # The two running trials were interrupted and re-queued. A worker that started seconds before the
    # other (torch import under load) may already have completed a trial: that one stays COMPLETE.
    assert states in (["FAIL", "FAIL", "WAITING", "WAITING"], ["COMPLETE", "FAIL", "FAIL", "WAITING", "WAITING"])
    # The re-queued copies plus finished or new trials make up the budget of three; nothing more.
    run_worker("regression", storage_url=store_url, echo=lambda line: None)
    assert len(budget_trials(store_url, "regression")) == 3 and len(trials_of(store_url)) == 5


@pytest.mark.slow
def test_fleet_restarts_a_crashed_worker_and_finishes_the_budget(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 3, LONG_EPOCHS), store_url)
    fleet = subprocess.Popen([*HPO, "fleet", "--study", "regression", "--workers", "2"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = wait_for(lambda: running_with_reports(store_url))
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, _ = fleet.communicate(timeout=120)
    assert fleet.returncode == 0 and "restarted (pid" in out, out
    trials = {t.number: t for t in trials_of(store_url)}
    assert trials[victim.number].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == victim.number and t.state == TrialState.COMPLETE
               for t in trials.values())
    assert len(budget_trials(store_url, "regression")) == 3


def test_fleet_rejects_bad_gpu_lists(tmp_path, cli_env):
    proc = run_hpo("fleet", "--study", "x", "--gpus", "0,a", env=cli_env, check=2)
    assert "--gpus: '0,a' is not a list of GPU indices" in proc.stderr
    proc = run_hpo("fleet", "--study", "missing", "--workers", "2", env=cli_env, check=2)
    assert "no study named 'missing'" in proc.stderr
