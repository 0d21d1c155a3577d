"""Workers killed with SIGKILL at random moments, again and again, on SQLite and on the real
PostgreSQL; then one worker runs the study to its end. Whatever the moments, the study finishes
exactly its budget, nothing is left RUNNING or WAITING, and no trial was re-queued twice.

Seeded: a failure prints its seed; rerun it with HPO_STORM_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_parallel import budget_trials, create, fast_spec, start_worker

from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage

KILLS = 8  # the storm ends after this many kills, or after STORM_SECONDS
STORM_SECONDS = 150
BUDGET = 40


def _ready(log: Path) -> bool:
    return log.exists() and "budget" in log.read_text()


def _storm(tmp_path: Path, url: str, workers: int, seed: int) -> dict:
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    create(fast_spec(tmp_path, BUDGET, epochs=(10, 60)), url, heartbeat=Heartbeat(interval=1, grace=2))
    rng = random.Random(seed)
    started, kills = 0, 0
    procs = {}

    def spawn():
        nonlocal started
        log = tmp_path / f"w{started}.log"
        procs[started] = (start_worker(env, "regression", log), log)
        started += 1

    for _ in range(workers):
        spawn()
    end = time.monotonic() + STORM_SECONDS
    while time.monotonic() < end and kills < KILLS:
        live = [k for k, (p, log) in procs.items() if p.poll() is None and _ready(log)]
        if not live:
            if all(p.poll() is not None for p, _ in procs.values()):
                break  # the study finished between kills
            time.sleep(0.1)
            continue
        time.sleep(rng.uniform(0.05, 2.0))
        victim, _ = procs[rng.choice(live)]
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            spawn()
    for p, _ in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
    final = tmp_path / "final.log"
    last = start_worker(env, "regression", final)
    assert last.wait(timeout=300) == 0, final.read_text()
    return {"workers started": started, "kills": kills}


def _check(url: str, seed: int, counts: dict) -> None:
    trials = optuna.load_study(study_name="regression", storage=open_storage(url, heartbeat=False)).get_trials()
    where = f"seed {seed}, {counts}"
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], where
    assert len(budget_trials(url, "regression")) == BUDGET, where
    # Each failure is re-queued at most once: no two retries name the same failed trial.
    parents = [t.system_attrs["retry_history"][-1] for t in trials if "retry_history" in t.system_attrs]
    assert len(parents) == len(set(parents)), where
    # A retry re-runs its original's parameters.
    by_number = {t.number: t for t in trials}
    for t in trials:
        if "failed_trial" in t.system_attrs:
            original = by_number[t.system_attrs["failed_trial"]]
            assert {k: t.params[k] for k in original.params} == original.params, where
    print(f"kill storm on {url.split(':')[0]}: {where}: {len(trials)} trials, "
          f"{sum(t.state == TrialState.FAIL for t in trials)} failed and re-queued, budget {BUDGET} exact")


SEEDS = [int(os.environ["HPO_STORM_SEED"])] if os.environ.get("HPO_STORM_SEED") else [20261130]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_storm_on_sqlite(tmp_path, store_url, seed):
    counts = _storm(tmp_path, store_url, workers=2, seed=seed)
    assert counts["kills"] >= 5, counts  # else the study ended before the storm did: lengthen the trials
    _check(store_url, seed, counts)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_storm_on_postgres(tmp_path, pg_url, seed):
    counts = _storm(tmp_path, pg_url, workers=3, seed=seed + 1)
    assert counts["kills"] >= 5, counts  # else the study ended before the storm did: lengthen the trials
    _check(pg_url, seed + 1, counts)


