"""A worker's store traffic: reports and user attrs written behind in one transaction, the trial
returned by tell, waiting trials, and the statements one trial costs."""

from __future__ import annotations

import math
import pickle

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from hpo.running.worker import Worker
from hpo.search.study import CachingMedianPruner
from hpo.store import budget
from hpo.store.queries import upsert
from hpo.store.storage import WorkerStorage, open_storage


class Statements:
    """Counts the SQL statements an engine sends (pool pings and commits are not statements)."""

    def __init__(self, engine: sa.Engine):
        self.n = 0
        sa.event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args) -> None:
        self.n += 1


def _study(url: str) -> tuple[WorkerStorage, optuna.Study]:
    storage = open_storage(url)
    assert isinstance(storage, WorkerStorage)
    return storage, optuna.create_study(study_name="wb", storage=storage, pruner=CachingMedianPruner())


def _stored(url: str, trial_id: int) -> optuna.trial.FrozenTrial:
    """The trial as another process sees it."""
    return open_storage(url, heartbeat=False).get_trial(trial_id)


def test_reports_and_attrs_cost_no_statement_until_one_flush(any_url):
    storage, study = _study(any_url)
    trial = study.ask()
    statements = Statements(storage.engine)
    for step in range(20):
        trial.report(step / 10, step)
    trial.set_user_attr("worker", "w1")
    trial.set_user_attr("epochs_run", 20)
    assert statements.n == 0
    assert _stored(any_url, trial._trial_id).intermediate_values == {}

    storage.flush(trial._trial_id)
    assert statements.n <= 5  # the trial's state, then values and attrs in one transaction
    stored = _stored(any_url, trial._trial_id)
    assert stored.intermediate_values == {step: step / 10 for step in range(20)}
    assert stored.user_attrs == {"worker": "w1", "epochs_run": 20}

    # A later value for a step, and a changed attr, replace the stored ones.
    storage.set_trial_intermediate_value(trial._trial_id, 3, -1.0)
    trial.set_user_attr("epochs_run", 21)
    storage.flush(trial._trial_id)
    stored = _stored(any_url, trial._trial_id)
    assert stored.intermediate_values[3] == -1.0 and stored.user_attrs["epochs_run"] == 21
    assert len(stored.intermediate_values) == 20


def test_a_finished_trial_carries_every_pending_write(any_url):
    storage, study = _study(any_url)
    trial = study.ask()
    for step, value in enumerate([0.5, 0.4, math.inf, 0.3]):
        trial.report(value, step)
    trial.report(float("nan"), 4)
    trial.report(0.2, 5)
    trial.set_user_attr("epochs_run", 6)
    study.tell(trial, state=TrialState.PRUNED)
    stored = _stored(any_url, trial._trial_id)
    assert stored.state == TrialState.PRUNED and stored.value == 0.2  # Optuna's rule: the last reported value
    assert stored.intermediate_values[2] == math.inf and math.isnan(stored.intermediate_values[4])
    assert stored.user_attrs == {"epochs_run": 6}


def test_writes_to_a_trial_finished_elsewhere_are_refused(any_url):
    storage, study = _study(any_url)
    trial = study.ask()
    trial.report(1.0, 1)
    # Another worker found the trial stale and failed it.
    assert open_storage(any_url, heartbeat=False).set_trial_state_values(trial._trial_id, TrialState.FAIL)
    storage.flush(trial._trial_id)  # dropped, as Optuna would have refused it
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(0.5, 2)
    stored = _stored(any_url, trial._trial_id)
    assert stored.state == TrialState.FAIL and stored.intermediate_values == {}


def test_a_running_trial_read_back_from_memory_is_the_stored_one(any_url):
    storage, study = _study(any_url)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_categorical("act", ["relu", "tanh"])
    trial.report(0.5, 10)
    trial.set_user_attr("worker", "w1")
    storage.set_trial_system_attr(trial._trial_id, "note", {"a": [1, 2]})
    storage.flush(trial._trial_id)
    statements = Statements(storage.engine)
    mine = storage.get_trial(trial._trial_id)
    assert statements.n == 1  # its state and system attrs in one query, no six-table read
    stored = _stored(any_url, trial._trial_id)
    for field in ("number", "state", "params", "distributions", "user_attrs", "system_attrs", "intermediate_values"):
        assert getattr(mine, field) == getattr(stored, field), field
    assert abs((mine.datetime_start - stored.datetime_start).total_seconds()) < 1  # MariaDB keeps whole seconds

    # Failed elsewhere: the state is the store's, and it is read whole again.
    assert open_storage(any_url, heartbeat=False).set_trial_state_values(trial._trial_id, TrialState.FAIL)
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr("late", 1)


def test_a_failed_flush_keeps_its_writes_for_the_next(store_url, monkeypatch):
    storage, study = _study(store_url)
    trial = study.ask()
    trial.report(1.0, 1)
    trial.report(2.0, 2)
    real_write = storage._write

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage, "_write", broken)
    with pytest.raises(RuntimeError):
        storage.flush(trial._trial_id)
    storage.set_trial_intermediate_value(trial._trial_id, 2, 2.5)  # newer than the failed batch
    monkeypatch.setattr(storage, "_write", real_write)
    storage.flush(trial._trial_id)
    assert _stored(store_url, trial._trial_id).intermediate_values == {1: 1.0, 2: 2.5}


def test_a_value_the_store_cannot_hold_fails_in_the_caller(store_url):
    _, study = _study(store_url)
    with pytest.raises(TypeError):
        study.ask().set_user_attr("bad", object())


def test_pickled_storage_starts_with_nothing_pending(store_url):
    storage, study = _study(store_url)
    study.ask().report(1.0, 1)
    copy = pickle.loads(pickle.dumps(storage))
    assert copy._pending == {} and storage._pending


def _trivial(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(20):
        trial.report(x, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    trial.set_user_attr("epochs_run", 20)
    return x


@pytest.mark.parametrize("objective, state", [
    (_trivial, TrialState.COMPLETE),
    (lambda t: (t.suggest_float("x", 0, 1), t.report(0.7, 3), (_ for _ in ()).throw(optuna.TrialPruned())),
     TrialState.PRUNED),
    (lambda t: 1 / 0, TrialState.FAIL),
])
def test_the_worker_returns_the_trial_as_stored(any_url, objective, state):
    storage, study = _study(any_url)
    worker = Worker(study, storage, study._study_id, budget=5, label="w")
    returned = worker.run(worker.next_trial(), objective)
    stored = _stored(any_url, returned._trial_id)
    assert returned.state == stored.state == state
    for field in ("number", "values", "params", "intermediate_values", "user_attrs"):
        assert getattr(returned, field) == getattr(stored, field), field


def test_enqueued_trials_take_a_place_and_retries_do_not(store_url):
    storage, study = _study(store_url)
    worker = Worker(study, storage, study._study_id, budget=2, label="w")
    study.enqueue_trial({"x": 0.25})
    first = worker.next_trial()
    assert first.suggest_float("x", 0.0, 1.0) == 0.25
    assert budget.fail_trial(storage, storage.get_trial(first._trial_id), reason="lost", requeue=True)
    retry = worker.next_trial()
    assert retry.params == {"x": 0.25} and retry.number == 1
    worker.study.tell(retry, 0.5)
    fresh = worker.next_trial()  # the second place
    assert fresh.number == 2 and "x" not in fresh.params
    worker.study.tell(fresh, 0.5)
    assert worker.next_trial() is None
    assert budget.places_taken(storage, study._study_id) == 2


def test_upsert_without_a_dialect_upsert_replaces_rows(store_url):
    """The fallback for a database Optuna runs on that has none of the three upserts."""
    storage, study = _study(store_url)
    trial_id = study.ask()._trial_id
    table = sa.Table("trial_user_attributes", sa.MetaData(), autoload_with=storage.engine)

    class Other:
        def __init__(self, conn):
            self.conn, self.dialect = conn, type("D", (), {"name": "other"})()

        def execute(self, *args):
            return self.conn.execute(*args)

    for value in ("1", "2"):
        with storage.engine.begin() as conn:
            upsert(Other(conn), table, [{"trial_id": trial_id, "key": "k", "value_json": value}], ("trial_id", "key"))
    assert _stored(store_url, trial_id).user_attrs == {"k": 2}


@pytest.mark.postgres
def test_a_worker_trial_costs_few_statements(pg_url):
    """Budget claim, ask, 20 reports with pruning checks, tell: the reports cost nothing, and the
    pruning checks of one trial read the study about once."""
    storage, study = _study(pg_url)
    worker = Worker(study, storage, study._study_id, budget=100, label="w")
    worker.run(worker.next_trial(), _trivial)  # the first read of the study
    statements = Statements(storage.engine)
    for _ in range(5):
        worker.fail_stale()
        worker.run(worker.next_trial(), _trivial)
    assert statements.n / 5 < 45, statements.n / 5  # 229 before reports, attrs and pruner reads were cut
