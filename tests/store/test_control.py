"""Study control in the store: stopping rules and `hpo stop` end a two-worker study for every
worker with the rule named, `hpo extend` raises a used budget, `hpo delete` leaves nothing of a
study and touches no other. Real workers, the CLI through its entry point."""

from __future__ import annotations

import json
import os

import optuna
import pytest
import sqlalchemy as sa
import yaml
from conftest import run_hpo
from optuna.trial import TrialState
from test_faults import LONG_EPOCHS, running_with_reports, slow_spec, wait_for
from test_parallel import budget_trials, create, fast_spec, start_worker

from hpo.store import data_tables, optuna_private
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage


def ruled_spec(tmp_path, n_trials: int, name: str = "regression", **rules):
    """The fast regression spec with stopping rules in its budget, without pruning: patience counts
    COMPLETE trials, and the median pruner would prune most of these short trials."""
    path = fast_spec(tmp_path, n_trials, name=name)
    raw = yaml.safe_load(path.read_text())
    raw["budget"].update(rules)
    raw["pruner"] = {"kind": "none"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def two_workers(tmp_path, url, study="regression"):
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start_worker(env, study, log) for log in logs]
    for p, log in zip(procs, logs):
        assert p.wait(timeout=900) == 0, log.read_text()
    return env, [log.read_text() for log in logs]


def status(env, study="regression") -> dict:
    return json.loads(run_hpo("status", "--study", study, "--json", env=env, check=0).stdout)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_patience_ends_a_two_worker_study(backend, tmp_path, store_url, request):
    url = store_url if backend == "sqlite" else request.getfixturevalue("pg_url")
    create(ruled_spec(tmp_path, 40, patience=3), url)
    env, texts = two_workers(tmp_path, url)
    for text in texts:  # each worker ends with the rule's line
        assert "is stopped (patience: " in text, text
    s = status(env)
    assert s["stopped"]["rule"] == "patience" and s["counts"]["RUNNING"] == 0 and s["counts"]["WAITING"] == 0
    trials = optuna.load_study(study_name="regression", storage=url).get_trials()
    assert len(trials) < 40 and len(budget_trials(url, "regression")) == len(trials)
    # When it fired, at least 3 complete trials in a row (by completion) had not improved the best value.
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    best, since = float("inf"), 0
    streaks = []
    for t in complete:
        since = 0 if t.value < best else since + 1
        best = min(best, t.value)
        streaks.append(since)
    assert max(streaks) >= 3


def test_target_and_max_minutes(tmp_path, store_url):
    create(ruled_spec(tmp_path, 30, target=10.0), store_url)
    env, texts = two_workers(tmp_path, store_url)
    assert all("is stopped (target: trial " in text for text in texts)
    s = status(env)
    assert s["stopped"]["rule"] == "target" and s["best_value"] <= 10.0 and s["counts"]["RUNNING"] == 0
    assert sum(s["counts"].values()) < 30

    create(ruled_spec(tmp_path, 30, name="timed", max_minutes=0.02), store_url)
    env, texts = two_workers(tmp_path, store_url, "timed")
    assert all("is stopped (max_minutes: " in text for text in texts)
    s = status(env, "timed")
    assert s["stopped"]["rule"] == "max_minutes" and s["counts"]["RUNNING"] == 0 and sum(s["counts"].values()) < 30


def test_extend_runs_exactly_the_added_trials(tmp_path, store_url):
    create(fast_spec(tmp_path, 3), store_url)
    env = dict(os.environ, HPO_STORAGE=store_url)
    assert "used its budget of 3 trials" in run_hpo("worker", "--study", "regression", env=env, check=0, timeout=900).stdout
    assert run_hpo("extend", "--study", "regression", "--n-trials", "3", env=env, check=2).stderr.count("\n") == 1
    run_hpo("extend", "--study", "regression", "--n-trials", "5", env=env, check=0)
    out = run_hpo("worker", "--study", "regression", env=env, check=0, timeout=900).stdout
    assert "(2 trials)" in out and "used its budget of 5 trials" in out
    assert len(budget_trials(store_url, "regression")) == 5


def test_stop_now_then_delete_leaves_nothing(tmp_path, store_url):
    spec = slow_spec(tmp_path, 4, epochs=LONG_EPOCHS)
    raw = yaml.safe_load(spec.read_text())
    raw["checkpoint"] = {"every_seconds": 0}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    create(spec, store_url, heartbeat=Heartbeat(interval=1, grace=30))
    create(fast_spec(tmp_path, 2, name="other"), store_url)
    env = dict(os.environ, HPO_STORAGE=store_url, PYTHONUNBUFFERED="1")
    run_hpo("worker", "--study", "other", env=env, check=0, timeout=900)
    storage = open_storage(store_url, heartbeat=False)
    other_before = [(t.number, t.state, t.values) for t in optuna.load_study(study_name="other", storage=storage).trials]

    log = tmp_path / "long.log"
    worker = start_worker(env, "regression", log)
    trial = wait_for(lambda: running_with_reports(store_url), timeout=600, what="a running trial")
    refused = run_hpo("delete", "--study", "regression", env=env, check=2)
    assert refused.stderr.count("\n") == 1 and "1 running trial" in refused.stderr
    run_hpo("stop", "--study", "regression", "--now", env=env, check=0)
    assert worker.wait(timeout=300) == 0, log.read_text()
    assert "is stopped (stop: hpo stop --now)" in log.read_text()
    trials = optuna.load_study(study_name="regression", storage=storage).trials
    assert trials[trial.number].state == TrialState.FAIL and trials[-1].state == TrialState.WAITING
    checkpoints = tmp_path / "store" / "artifacts" / "checkpoints" / "regression"
    assert any(checkpoints.iterdir())
    assert "Stopped:" in run_hpo("status", "--study", "regression", env=env, check=0).stdout
    again = run_hpo("worker", "--study", "regression", env=env, check=0, timeout=900).stdout
    assert "is stopped" in again and "(0 trials)" in again

    sid = storage.get_study_id_from_name("regression")
    run_hpo("delete", "--study", "regression", env=env, check=0)
    with storage.engine.connect() as conn:
        for table in (optuna_private.TRIALS, optuna_private.STUDY_SYSTEM_ATTRS, optuna_private.STUDY_USER_ATTRS,
                      data_tables.REFS):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)
                                .where(table.c.study_id == sid)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(data_tables.REFS)).scalar_one() > 0  # other's
    assert not checkpoints.exists()
    other_after = [(t.number, t.state, t.values) for t in optuna.load_study(study_name="other", storage=storage).trials]
    assert other_after == other_before
    assert "no study named 'regression'" in run_hpo("status", "--study", "regression", env=env, check=2).stderr
