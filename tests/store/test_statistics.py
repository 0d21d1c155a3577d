"""hpo.store.statistics: the aggregate answers equal those of the trials read in full through Optuna, on
every trial state, on SQLite, PostgreSQL and MariaDB; and they cost a fixed number of queries."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict

import optuna
import pytest
import sqlalchemy as sa
from conftest import run_hpo, small_regression_spec
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from hpo.data.tables import embed_csv
from hpo.errors import StoreError
from hpo.search.study import create
from hpo.spec.schema import load_spec_file
from hpo.store.budget import RETRY_HISTORY_ATTR, retried_numbers
from hpo.store.statistics import Summary, summaries, summarize, summary
from hpo.store.storage import open_storage

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "n": IntDistribution(1, 8),
                 "opt": CategoricalDistribution(["Adam", "SGD", None]), "m": FloatDistribution(0.0, 0.9, step=0.1)}


def full_read(study: optuna.Study, metric: str = "value") -> Summary:
    """The statistics from every trial read whole: Optuna's best value (ties: the lowest trial number;
    Optuna leaves their order to the database, and MariaDB gave #8 over #4 for two -inf values),
    hpo's finished count."""
    trials = study.get_trials()
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    retried = retried_numbers(trials)
    fails = sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    best = None
    if counts["COMPLETE"]:
        best = next(t for t in trials if t.state == TrialState.COMPLETE and t.value == study.best_value)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return Summary(name=study.study_name, direction=study.direction.name.lower(), metric=metric, counts=counts,
                   finished=counts["COMPLETE"] + counts["PRUNED"] + fails,
                   failed=fails, interrupted=counts["FAIL"] - fails,
                   best_value=best.value if best else None, best_trial=best.number if best else None,
                   best_params=best.params if best else {},
                   wall_seconds=(max(ends) - min(starts)).total_seconds() if starts and ends else None,
                   gpu_sharing=dict(sorted(Counter(str(t.user_attrs["gpu_sharing"]) for t in trials
                                                   if "gpu_sharing" in t.user_attrs).items())))


def _ask(study: optuna.Study, i: int) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_int("n", 1, 8)
    if trial.suggest_categorical("opt", ["Adam", "SGD", None]) == "SGD":  # a conditional parameter
        trial.suggest_float("m", 0.0, 0.9, step=0.1)
    return trial


def _requeue(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """Queue a retry of ``failed`` as Optuna's retry callback (and hpo's worker) do."""
    history = [*failed.system_attrs.get(RETRY_HISTORY_ATTR, []), failed.number]
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=failed.params,
                                        distributions=failed.distributions,
                                        system_attrs={"failed_trial": history[0], RETRY_HISTORY_ATTR: history}))


def every_state(study: optuna.Study, values: list[float]) -> None:
    """COMPLETE trials of ``values``; PRUNED ones with inf, -inf and nan reports; FAILs of which one is
    re-queued twice (its last retry completes) and one is not; an enqueued WAITING trial; a RUNNING one."""
    for i, value in enumerate(values):
        trial = _ask(study, i)
        trial.report(value if math.isfinite(value) else 1.0, 0)
        study.tell(trial, value)
        pruned = _ask(study, i)
        for step, reported in enumerate((0.5, math.inf, -math.inf, math.nan)[: 1 + i % 4]):
            pruned.report(reported, step)
        study.tell(pruned, state=TrialState.PRUNED)
    study.tell(_ask(study, 0), state=TrialState.FAIL)  # failed, never re-queued
    failed = _ask(study, 1)
    study.tell(failed, state=TrialState.FAIL)
    _requeue(study, study.get_trials()[failed.number])
    retry = study.ask()
    study.tell(retry, state=TrialState.FAIL)
    _requeue(study, study.get_trials()[retry.number])
    study.tell(study.ask(), values[0])
    _ask(study, 0)  # left RUNNING
    study.enqueue_trial({"lr": 0.01, "n": 2, "opt": "Adam"})


CASES = {
    "ties": [0.5, 0.2, 0.7, 0.2, 0.2, 0.9],
    "infinities": [0.3, math.inf, -math.inf, 0.1, -math.inf, math.inf],
    "all equal": [1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_aggregate_equals_full_read(any_url, direction, case):
    storage = open_storage(any_url, heartbeat=False)
    study = optuna.create_study(study_name=f"s-{direction}", storage=storage, direction=direction,
                                sampler=optuna.samplers.RandomSampler(seed=1))
    every_state(study, CASES[case])
    got = summarize(study)
    expected = full_read(study)
    assert got == expected
    assert all(got.counts[state.name] > 0 for state in TrialState), got.counts
    assert got.finished == sum(got.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) - 2  # two FAILs were re-queued
    values = CASES[case] + [CASES[case][0]]
    best_value = (min if direction == "minimize" else max)(values)
    assert got.best_value == best_value == study.best_value
    assert got.best_trial == min(t.number for t in study.get_trials(states=(TrialState.COMPLETE,))
                                 if t.value == best_value)
    assert set(got.best_params) >= {"lr", "n", "opt"} and got.best_params == study.get_trials()[got.best_trial].params


def test_every_study_in_one_listing(any_url, tmp_path):
    storage = open_storage(any_url, heartbeat=False)
    spec = embed_csv(load_spec_file(small_regression_spec(tmp_path)))
    hpo_study = create(spec, storage)  # the spec (with its embedded data) names the metric
    every_state(hpo_study, [0.4, 0.3])
    empty = optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    multi = optuna.create_study(study_name="multi", storage=storage, directions=["minimize", "maximize"])
    multi.tell(multi.ask(), [1.0, 2.0])
    listing = summaries(storage)
    assert [s.name for s in listing] == ["empty", "multi", "regression"]
    by_name = {s.name: s for s in listing}
    assert by_name["regression"] == full_read(hpo_study, metric="val_mse")
    assert by_name["empty"] == full_read(empty)
    assert by_name["empty"].wall_seconds is None and by_name["empty"].best_trial is None
    assert (by_name["multi"].direction, by_name["multi"].best_trial, by_name["multi"].counts["COMPLETE"]) == \
        ("minimize/maximize", None, 1)
    assert summary(storage, storage.get_study_id_from_name("regression")) == by_name["regression"]


@pytest.mark.parametrize("n_trials", [5, 60])
def test_query_count_does_not_grow_with_trials(store_url, n_trials):
    """Seven queries for the store (studies, directions, the spec's metric, states, user attrs counted
    by key, infeasible trials, study stops), five per study (best trial, its parameters, its CV folds,
    re-queued trials and their states), none of them on the tables that grow with each report, and
    user attrs only for the keys counted (an index probe per trial) and the best trial's own CV keys."""
    storage = open_storage(store_url, heartbeat=False)
    study = optuna.create_study(study_name="q", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    every_state(study, [0.1 * i for i in range(n_trials)])
    statements: list[str] = []
    listen = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    sa.event.listen(storage.engine, "before_cursor_execute", listen)
    try:
        summaries(storage)
    finally:
        sa.event.remove(storage.engine, "before_cursor_execute", listen)
    assert len(statements) == 7 + 5, statements
    assert not any("trial_intermediate_values" in s for s in statements)
    best_folds = [s for s in statements if "trial_user_attributes.trial_id = ?" in s]  # the best trial's CV keys
    assert len(best_folds) == 1
    # else only counts by key, and the feasibility filter of the best-trial query (an EXISTS probe)
    assert all("GROUP BY" in s or "EXISTS" in s or s in best_folds for s in statements if "trial_user_attributes" in s)
    # The spec (data sets embedded) is never fetched whole: the database hands over its metric.
    specs = [s for s in statements if "study_user_attributes.value_json" in s]
    assert len(specs) == 1 and "JSON_EXTRACT(study_user_attributes.value_json" in specs[0]


def test_in_memory_study_is_refused():
    with pytest.raises(StoreError, match="not in an SQL store"):
        summarize(optuna.create_study(study_name="mem"))


def test_status_and_studies_commands(tmp_path, cli_env, store_url):
    import json

    storage = open_storage(store_url, heartbeat=False)
    study = optuna.create_study(study_name="plain", storage=storage)  # not made by hpo: metric "value"
    every_state(study, [0.25, 0.5])
    got = json.loads(run_hpo("status", "--study", "plain", "--json", env=cli_env, check=0).stdout)
    assert got == json.loads(json.dumps(asdict(full_read(study)), default=str))
    listing = run_hpo("studies", env=cli_env, check=0).stdout.splitlines()
    # complete, pruned, failed (real failures only), interrupted (re-queued), running
    assert listing[1].split()[:6] == ["plain", "3", "2", "1", "2", "1"] and "value=0.25 (#0)" in listing[1]
