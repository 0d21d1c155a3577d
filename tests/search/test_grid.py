"""Grid studies: every point at most once however many workers share the study, a clean end of the
grid, retries that re-run their point; and pruner state every worker agrees on."""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo, small_regression_spec
from optuna.trial import TrialState
from test_faults import wait_for
from test_parallel import budget_trials, start_worker
from test_parallel import create as create_study

from hpo.running.worker import run_worker
from hpo.search import study as studies
from hpo.spec.schema import load_spec_file
from hpo.store import budget as budgets
from hpo.store import optuna_private
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage

STUDY = "grid"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, store_url):
    """A fresh SQLite store, then the real PostgreSQL."""
    return store_url if request.param == "sqlite" else request.getfixturevalue("pg_url")


def grid_spec(tmp_path: Path, *, widths: list, lrs: list, n_trials: int | None, seed: int = 0, epochs: int = 30,
              batch_size: int = 16, pruner: dict | None = None) -> Path:
    """A grid of 2 x len(widths) x len(lrs) points over the small regression data."""
    return small_regression_spec(
        tmp_path, name=STUDY, seed=seed, sampler={"kind": "grid"}, pruner=pruner or {"kind": "none"},
        budget={"n_trials": n_trials},
        space={"n_layers": {"choice": [1, 2]}, "width": {"choice": widths}, "lr": {"choice": lrs}},
        fixed={"epochs": epochs, "batch_size": batch_size})


def grid_points(widths: list, lrs: list) -> set[tuple]:
    return {tuple(sorted({"n_layers": n, "width": w, "lr": lr}.items()))
            for n, w, lr in itertools.product([1, 2], widths, lrs)}


def point(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=open_storage(url, heartbeat=False)).get_trials()


def running_with_params(url: str) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial whose worker is training it: it has reported (its reports reach the store at
    its heartbeats), so every parameter of its point is there. A trial that has only some of them
    is still being suggested: a snapshot then misses the rest (seen in CI on a loaded machine)."""
    return next((t for t in trials_of(url) if t.state == TrialState.RUNNING and t.intermediate_values), None)


def done_line(grid: int, n_trials: int) -> str:
    if grid <= n_trials:
        return f"study {STUDY!r} has run every point of its grid ({grid} point{'s' * (grid != 1)})"
    return f"study {STUDY!r} has used its budget of {n_trials} trials"


def check_grid_study(url: str, *, points: set[tuple], n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """The properties of a grid study after its workers ended: min(grid, budget) lineages, each on
    its own point of the grid, each point held by one grid_id. Returns the trials."""
    trials = trials_of(url)
    assert all(t.state.is_finished() for t in trials), [(t.number, t.state) for t in trials]
    lineages = budget_trials(url, STUDY)
    assert len(lineages) == min(len(points), n_trials)
    run = [point(t) for t in lineages]
    assert len(set(run)) == len(run), f"points run twice: {sorted(p for p in run if run.count(p) > 1)}"
    assert set(run) <= points
    ids = [t.system_attrs["grid_id"] for t in lineages]
    assert len(set(ids)) == len(ids)
    return trials


# --- in-process: quick, deterministic ---------------------------------------------------------------------------

def test_workers_of_a_grid_study_share_the_spec_seed(tmp_path):
    spec = load_spec_file(grid_spec(tmp_path, widths=[8, 16], lrs=[0.01], n_trials=4))
    samplers = [studies.build_sampler(spec, seed_offset=offset) for offset in (0, 1, 2 + 10_007)]
    assert len({tuple(map(tuple, s.search_space.values())) for s in samplers}) == 1
    # The points behind each grid_id, as each worker would read them.
    orders = []
    for sampler in samplers:
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: (t.suggest_categorical("n_layers", [1, 2]), t.suggest_categorical("width", [8, 16]),
                                  t.suggest_categorical("lr", [0.01]))[0], n_trials=4)
        orders.append([(t.system_attrs["grid_id"], point(t)) for t in study.trials])
    assert orders[0] == orders[1] == orders[2]
    tpe = [studies.build_sampler(load_spec_file(
        small_regression_spec(tmp_path)), seed_offset=offset) for offset in (0, 1)]
    first = [optuna.create_study(sampler=s).ask().suggest_float("x", 0, 1) for s in tpe]
    assert first[0] != first[1]  # TPE and random keep a per-worker seed: their draws differ


def test_workers_one_after_the_other_run_each_point_once(tmp_path, url):
    """The issue's sequential case in-process: the second worker takes another worker number (a
    different seed for TPE) yet must read every grid_id as the first one did."""
    widths, lrs = [8, 16, 32], [0.001, 0.006, 0.011]
    create_study(grid_spec(tmp_path, widths=widths, lrs=lrs, n_trials=18, epochs=5), url)
    lines: list[str] = []
    run_worker(STUDY, storage_url=url, n_trials=7, echo=lines.append)
    run_worker(STUDY, storage_url=url, echo=lines.append)
    check_grid_study(url, points=grid_points(widths, lrs), n_trials=18)
    assert done_line(18, 18) in lines


def test_a_retry_keeps_its_point_and_new_trials_take_the_lowest_free_one(tmp_path, store_url):
    create_study(grid_spec(tmp_path, widths=[8, 16], lrs=[0.01], n_trials=None), store_url)
    storage = open_storage(store_url, heartbeat=False)
    study, spec = studies.open_study(STUDY, storage)
    sid = storage.get_study_id_from_name(STUDY)
    sampler = study.sampler

    def start(waiting=()):
        frozen = budgets.start_trial(storage, sid, budget=None, waiting=waiting, new_attrs=sampler.point_attrs)
        if frozen is None:
            return None
        optuna_private.cache_trial(study, frozen)  # as the worker does
        trial = optuna.Trial(study, optuna_private.trial_id(frozen))  # Optuna's before_trial sees the grid_id and keeps it
        return trial, [trial.suggest_categorical(n, v) for n, v in (("n_layers", [1, 2]), ("width", [8, 16]),
                                                                     ("lr", [0.01]))]

    first, first_point = start()
    second, second_point = start()
    assert first_point != second_point
    assert budgets.fail_trial(storage, storage.get_trial(optuna_private.trial_id(second)), reason="worker lost", requeue=True)
    retry_id = next(optuna_private.trial_id(t) for t in storage.get_all_trials(sid) if t.state == TrialState.WAITING)
    retry, retry_point = start(waiting=[(retry_id, True)])
    assert retry_point == second_point and retry.number == 2
    ids = {t.number: t.system_attrs["grid_id"] for t in storage.get_all_trials(sid)}
    assert ids == {0: 0, 1: 1, 2: 1}
    third, third_point = start()  # trial 3: the lowest free grid_id, 2, not its number
    assert storage.get_trial(optuna_private.trial_id(third)).system_attrs["grid_id"] == 2
    assert len({tuple(first_point), tuple(second_point), tuple(third_point)}) == 3
    start()
    assert start() is None  # every point is held: no new trial, whatever the budget
    storage.engine.dispose()


def test_the_grid_sampler_still_stops_optimize(tmp_path):
    spec = load_spec_file(grid_spec(tmp_path, widths=[8], lrs=[0.01], n_trials=1))
    study = optuna.create_study(sampler=studies.build_sampler(spec))
    study.optimize(lambda t: float(t.suggest_categorical("n_layers", [1, 2])), n_trials=10)
    assert len(study.trials) == 2  # inside optimize, Optuna's own stop after the last point
    study.tell(study.ask(), 0.0)  # outside optimize: no RuntimeError from study.stop()


def test_hyperband_brackets_agree_across_workers_started_at_different_times(tmp_path):
    """Optuna's default max_resource ("auto") is set from the trials complete at a worker's first
    prune, so two workers split the trials into different brackets; hpo's comes from the spec."""
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def decisions(pruner, *, early: bool) -> list[bool]:
        """The pruner's decisions on 80 running trials, its first prune before (early) or after 60
        trials of 81 steps complete; the same seeded study either way."""
        rng, study = random.Random(0), optuna.create_study(study_name="h")  # brackets hash the name

        def add(state, last_step):
            values = {step: rng.random() for step in range(1, last_step + 1)}
            study.add_trial(optuna.trial.create_trial(
                params={"x": rng.random()}, distributions=dist, state=state, intermediate_values=values,
                value=values[last_step] if state == TrialState.COMPLETE else None))

        add(TrialState.COMPLETE, 9)
        for _ in range(80):
            add(TrialState.RUNNING, rng.choice([1, 3, 9, 27]))
        for turn in ("early", "late"):
            if early == (turn == "early"):
                pruner.prune(study, study.trials[1])  # the worker's first prune: Hyperband sets itself up
            if turn == "early":
                for _ in range(60):
                    add(TrialState.COMPLETE, 81)
        return [pruner.prune(study, t) for t in study.get_trials(states=(TrialState.RUNNING,))]

    def auto():
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)

    assert decisions(auto(), early=True) != decisions(auto(), early=False)  # the fault, on Optuna's default

    spec = load_spec_file(small_regression_spec(tmp_path, space={"epochs": {"int": [20, 81]}},
                                                pruner={"kind": "hyperband", "min_resource": 1, "reduction_factor": 3}))
    assert studies.last_step(spec) == 80  # reports every 5 epochs: the last one at 80
    assert decisions(studies.build_pruner(spec), early=True) == decisions(studies.build_pruner(spec), early=False)


@pytest.mark.slow
def test_create_study_notes_a_grid_smaller_than_the_budget_and_the_worker_ends_cleanly(tmp_path, cli_env):
    """A one-point grid under a budget of 5: one trial, exit 0, one line saying the grid is done,
    the summary; Optuna's GridSampler would raise from study.stop() after it (the issue's crash)."""
    spec = small_regression_spec(tmp_path, name=STUDY, sampler={"kind": "grid"}, pruner={"kind": "none"},
                                 budget={"n_trials": 5}, space={"width": {"choice": [8]}},
                                 fixed={"epochs": 5, "n_layers": 1})
    created = run_hpo("create-study", str(spec), env=cli_env, check=0)
    notes = [line for line in created.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: the grid has 1 point and budget.n_trials is 5: the study ends after 1 trial, one per point"]
    ran = run_hpo("worker", "--study", STUDY, env=cli_env, check=0)
    assert ran.stdout.count(done_line(1, 5)) == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert "Number of finished trials: 1" in ran.stdout


# --- subprocess workers on SQLite and PostgreSQL: the property, seeded ---------------------------------

# (widths, lrs, n_trials, workers, how they start), two stores. Each store runs each relation of grid
# and budget once, with 2 and with 3 workers, started together and in turn; across the stores each
# relation meets both worker counts and both starts. One worker: the tests above, and the CLI test.
SCENARIOS = {
    "smaller-3-together": ([8, 16, 32], [0.01], 9, 3, "together"),
    "equal-2-in-turn": ([8, 16], [0.001, 0.01], 8, 2, "in turn"),
    "larger-3-in-turn": ([8, 16, 32], [0.001, 0.01], 7, 3, "in turn"),
    "smaller-2-in-turn": ([8, 16, 32], [0.01], 9, 2, "in turn"),
    "equal-3-together": ([8, 16], [0.001, 0.01], 8, 3, "together"),
    "larger-2-together": ([8, 16, 32], [0.001, 0.01], 7, 2, "together"),
}
SQLITE = ("smaller-3-together", "equal-2-in-turn", "larger-3-in-turn")
POSTGRES = ("smaller-2-in-turn", "equal-3-together", "larger-2-together")


@pytest.mark.slow
@pytest.mark.parametrize("store, scenario", [
    *(("sqlite", s) for s in SQLITE), *(pytest.param("postgres", s, marks=pytest.mark.postgres) for s in POSTGRES)])
def test_grid_workers_run_each_point_once_and_exit_0(tmp_path, request, store, scenario):
    url = request.getfixturevalue("store_url" if store == "sqlite" else "pg_url")
    widths, lrs, n_trials, workers, start = SCENARIOS[scenario]
    points, seed = grid_points(widths, lrs), sorted(SCENARIOS).index(scenario)
    # No worker dies here: a long grace period keeps a heartbeat starved on a busy machine from
    # counting as a death (its trial would be failed and re-run, one trial more than the lineages).
    create_study(grid_spec(tmp_path, widths=widths, lrs=lrs, n_trials=n_trials, seed=seed), url,
                 heartbeat=Heartbeat(interval=5, grace=60))
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    expected = min(len(points), n_trials)
    logs = [tmp_path / f"w{i}.log" for i in range(workers)]
    if start == "together":
        procs = [start_worker(env, STUDY, log) for log in logs]
    else:  # each but the last runs its share, the last runs to the end
        procs = []
        for i, log in enumerate(logs):
            last = i == workers - 1
            procs.append(start_worker(env, STUDY, log, *(() if last else ("--n-trials", str(expected // workers)))))
            if not last:
                procs[-1].wait(timeout=120)
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=120) == 0, log.read_text()
    texts = [log.read_text() for log in logs]
    for text in texts:
        assert "Traceback" not in text and "Study statistics" in text, text
    for text in texts if start == "together" else texts[-1:]:
        assert done_line(len(points), n_trials) in text, text
    trials = check_grid_study(url, points=points, n_trials=n_trials)
    assert len(trials) == expected
    if start == "in turn":
        assert len({t.user_attrs["worker"] for t in trials}) == workers


@pytest.mark.slow
@pytest.mark.parametrize("store, widths, lrs, n_trials", [
    ("sqlite", [8, 16], [0.01], 6), pytest.param("postgres", [8, 16, 32], [0.01], 4, marks=pytest.mark.postgres)],
    ids=["sqlite-grid-smaller", "postgres-grid-larger"])
def test_the_point_of_a_killed_worker_is_run_again(tmp_path, request, store, widths, lrs, n_trials):
    """SIGKILL in the middle of a trial (about 2 s long on an idle core): another worker fails it
    after the grace period and runs its retry on the same point (same params, same grid_id); no
    other point is run twice."""
    url = request.getfixturevalue("store_url" if store == "sqlite" else "pg_url")
    points = grid_points(widths, lrs)
    # Grace 5 s: short, yet a live worker's heartbeat starved on a busy machine is not taken for a death.
    create_study(grid_spec(tmp_path, widths=widths, lrs=lrs, n_trials=n_trials, epochs=200, batch_size=4), url,
                 heartbeat=Heartbeat(interval=1, grace=5))
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    victim_proc = start_worker(env, STUDY, tmp_path / "victim.log")
    victim = wait_for(lambda: running_with_params(url), timeout=120)  # the victim runs alone: its trial
    victim_proc.kill()
    victim_proc.wait()
    killed = [t for t in trials_of(url) if t.state == TrialState.RUNNING]
    assert [t.number for t in killed] == [victim.number], "the kill missed the trial (it had just ended)"
    survivor = start_worker(env, STUDY, tmp_path / "survivor.log")
    time.sleep(1)
    late = start_worker(env, STUDY, tmp_path / "late.log")
    for proc, name in ((survivor, "survivor"), (late, "late")):
        text = (tmp_path / f"{name}.log").read_text() if proc.wait(timeout=180) == 0 else None
        assert text is not None and "Traceback" not in text, (tmp_path / f"{name}.log").read_text()
        assert done_line(len(points), n_trials) in text, text
    trials = {t.number: t for t in check_grid_study(url, points=points, n_trials=n_trials)}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if budgets.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert point(retries[0]) == point(victim)
    assert retries[0].system_attrs["grid_id"] == victim.system_attrs["grid_id"]
    assert len(trials) == min(len(points), n_trials) + 1  # the killed trial is the only extra one

