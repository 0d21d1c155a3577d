"""Several `hpo worker` processes on one study: an exact global budget, distinct points, few connections."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import HPO, REPO, pg_connections, small_regression_spec
from optuna.trial import TrialState

from hpo.running.worker import run_worker
from hpo.store.budget import retried_numbers
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def fast_spec(tmp_path: Path, n_trials: int, *, epochs=(5, 15), name: str = "regression", **overrides) -> Path:
    """The small regression spec with a given budget and (tiny) epoch range."""
    path = small_regression_spec(tmp_path, budget={"n_trials": n_trials}, name=name, **overrides)
    raw = yaml.safe_load(path.read_text())
    raw["space"]["epochs"] = {"int": list(epochs), "step": 5}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def create(spec_path: Path, url: str, *, heartbeat: Heartbeat | None = None) -> None:
    """Create the study in-process (a CLI process would only add a torch import to each test),
    with ``heartbeat`` settings for its workers (default: the environment's, else 10 s / 30 s)."""
    from hpo.data.tables import embed_csv
    from hpo.search import study as studies
    from hpo.spec.schema import load_spec_file

    storage = open_storage(url, heartbeat=False)
    studies.create(embed_csv(load_spec_file(spec_path)), storage, force=True, heartbeat=heartbeat)
    storage.engine.dispose()  # so that the connections counted in a test are the workers' own


def start_worker(env: dict, study: str, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*HPO, "worker", "--study", study, *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def budget_trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    """The trials that use up the budget: finished, except FAILs that were re-queued."""
    trials = optuna.load_study(study_name=study, storage=open_storage(url, heartbeat=False)).get_trials()
    retried = retried_numbers(trials)
    return [t for t in trials if t.state in FINISHED and not (t.state == TrialState.FAIL and t.number in retried)]


def run_parallel(tmp_path: Path, url: str, *, workers: int, n_trials: int, sample=None) -> tuple[float, list[str], list]:
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    create(fast_spec(tmp_path, n_trials), url)
    start = time.monotonic()
    logs = [tmp_path / f"w{i}.log" for i in range(workers)]
    procs = [start_worker(env, "regression", log) for log in logs]
    samples = []
    while any(p.poll() is None for p in procs):
        if sample is not None:
            samples.append(sample())
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text
    return elapsed, texts, samples


def check_study(url: str, n_trials: int, texts: list[str]) -> None:
    trials = optuna.load_study(study_name="regression", storage=open_storage(url, heartbeat=False)).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert all(t.state in FINISHED for t in trials)
    assert len(budget_trials(url, "regression")) == n_trials
    for text in texts:
        assert "Traceback" not in text and "error" not in text.lower(), text
    # Constant liar + distinct worker seeds: no point is sampled twice.
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points)
    # The work was shared (a worker that started late may find the budget gone, hence not ==).
    assert len({t.user_attrs["worker"] for t in trials}) >= 2


@pytest.mark.postgres
@pytest.mark.slow
def test_four_workers_on_postgres_finish_exactly_the_budget(tmp_path, pg_url):
    elapsed, texts, samples = run_parallel(tmp_path, pg_url, workers=4, n_trials=40,
                                           sample=lambda: pg_connections(pg_url))
    check_study(pg_url, 40, texts)
    # One idle connection per worker, a second one only while a heartbeat is written.
    samples = samples[2:]  # skip samples from before the workers connected
    assert sorted(samples)[len(samples) // 2] <= 4 and max(samples) <= 4 + 3, samples
    print(f"postgres 4 workers, 40 trials: {elapsed:.1f}s; connections max {max(samples)}")


@pytest.mark.slow
def test_two_workers_on_sqlite_finish_exactly_the_budget(tmp_path, store_url):
    elapsed, texts, _ = run_parallel(tmp_path, store_url, workers=2, n_trials=40)
    check_study(store_url, 40, texts)
    print(f"sqlite 2 workers, 40 trials: {elapsed:.1f}s")


@pytest.mark.mysql
def test_a_worker_on_mariadb_finishes_the_budget(tmp_path, mysql_url):
    # Claims on MariaDB are raced in test_store; here the whole worker path runs once, in-process.
    create(fast_spec(tmp_path, 4), mysql_url)
    lines = []
    run_worker("regression", storage_url=mysql_url, echo=lines.append)
    assert len(budget_trials(mysql_url, "regression")) == 4 and "used its budget of 4" in "".join(lines)


def _params(tmp_path: Path, name: str) -> list[dict]:
    url = f"sqlite:///{tmp_path / name / 'hpo.db'}"
    create(fast_spec(tmp_path, 8), url)
    run_worker("regression", storage_url=url, echo=lambda line: None)
    trials = optuna.load_study(study_name="regression", storage=open_storage(url, heartbeat=False)).get_trials()
    return [t.params for t in trials]


def test_one_worker_is_reproducible(tmp_path):
    first, second = _params(tmp_path, "a"), _params(tmp_path, "b")
    assert len(first) == 8 and first == second


def test_a_second_worker_draws_other_points(tmp_path, store_url):
    create(fast_spec(tmp_path, 4), store_url)
    storage = open_storage(store_url, heartbeat=False)
    run_worker("regression", storage_url=store_url, n_trials=2, echo=lambda line: None)
    run_worker("regression", storage_url=store_url, n_trials=2, echo=lambda line: None)
    trials = optuna.load_study(study_name="regression", storage=storage).get_trials()
    # Both run random startup trials: the same seed would give the second worker the first one's points.
    assert [t.params for t in trials[:2]] != [t.params for t in trials[2:]]
