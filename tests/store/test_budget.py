"""The budget under races and lost commit answers, on every backend: places are taken with their
trial in one transaction, exactly one process fails (and re-queues) a trial, and a retry after a
commit whose answer was lost finds what the first attempt did instead of doing it twice."""

from __future__ import annotations

import contextlib
import threading

import optuna
from conftest import sqlite_locked_error
from optuna.trial import TrialState

from hpo.store import budget
from hpo.store.queries import claim
from hpo.store.storage import open_storage


def _study(url: str, name: str = "b") -> int:
    storage = open_storage(url, heartbeat=False)
    study_id = optuna.create_study(study_name=name, storage=storage)._study_id
    storage.engine.dispose()
    return study_id


def _together(n: int, fn) -> list:
    """``fn(i)`` in ``n`` threads released at the same moment; their results in thread order."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_starts_take_exactly_the_budget(any_url):
    study_id = _study(any_url)
    stores = [open_storage(any_url) for _ in range(6)]

    def start_all(i):
        got = []
        while (trial := budget.start_trial(stores[i], study_id, budget=10)) is not None:
            got.append(trial.number)
        return got

    numbers = [n for got in _together(6, start_all) for n in got]
    assert sorted(numbers) == list(range(10))
    assert budget.places_taken(stores[0], study_id) == 10
    assert len(stores[0].get_all_trials(study_id)) == 10


def test_exactly_one_of_racing_failers_requeues(any_url):
    study_id = _study(any_url)
    storage = open_storage(any_url)
    trial = budget.start_trial(storage, study_id, budget=5)
    stores = [open_storage(any_url, heartbeat=False) for _ in range(5)]
    frozen = stores[0].get_trial(trial._trial_id)
    won = _together(5, lambda i: budget.fail_trial(stores[i], frozen, reason=f"seen dead by {i}", requeue=True))
    assert won.count(True) == 1
    trials = stores[0].get_all_trials(study_id)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].system_attrs["retry_history"] == [0]
    assert trials[0].user_attrs["fail_reason"] == f"seen dead by {won.index(True)}"


def test_a_trial_told_while_another_process_fails_it_ends_one_way(any_url):
    study_id = _study(any_url)
    storage = open_storage(any_url)
    study = optuna.load_study(study_name="b", storage=storage)
    trial = budget.start_trial(storage, study_id, budget=5)
    other = open_storage(any_url, heartbeat=False)
    frozen = other.get_trial(trial._trial_id)

    def tell_or_fail(i):
        if i == 0:
            try:
                return storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
        return budget.fail_trial(other, frozen, reason="dead", requeue=True)

    told, failed = _together(2, tell_or_fail)
    assert told != failed
    states = [t.state for t in study.get_trials()]
    assert states == ([TrialState.COMPLETE] if told else [TrialState.FAIL, TrialState.WAITING])


def test_retries_stop_after_max_retry(store_url):
    study_id = _study(store_url)
    storage = open_storage(store_url)
    trial = budget.start_trial(storage, study_id, budget=1)
    for _ in range(3):
        assert budget.fail_trial(storage, storage.get_trial(trial._trial_id), reason="dead", requeue=True, max_retry=2)
        trial = budget.start_trial(storage, study_id, budget=1, waiting=[(t._trial_id, True) for t in
                                   storage.get_all_trials(study_id, states=(TrialState.WAITING,))])
        if trial is None:
            break
    states = [t.state for t in storage.get_all_trials(study_id)]
    assert states == [TrialState.FAIL] * 3  # the original and two retries, then no more
    retried = budget.retried_numbers(storage.get_all_trials(study_id))
    assert [budget.is_finished(t, retried) for t in storage.get_all_trials(study_id)] == [False, False, True]


@contextlib.contextmanager
def _answer_lost_once(storage, error):
    """The next transaction commits, then its answer is lost (a transient error, as when the
    connection drops during the commit)."""
    real, lost = storage.transaction, []

    @contextlib.contextmanager
    def transaction():
        with real() as session:
            yield session
        if not lost:
            lost.append(1)
            raise error

    storage.transaction = transaction
    try:
        yield lost
    finally:
        storage.transaction = real


def test_a_start_whose_answer_was_lost_is_found_not_repeated(tmp_path, store_url):
    study_id = _study(store_url)
    storage = open_storage(store_url)
    with _answer_lost_once(storage, sqlite_locked_error(tmp_path)) as lost:
        trial = budget.start_trial(storage, study_id, budget=5)
    assert lost and trial.number == 0 and trial.state == TrialState.RUNNING
    assert len(storage.get_all_trials(study_id)) == 1 and budget.places_taken(storage, study_id) == 1


def test_a_fail_whose_answer_was_lost_requeues_once(tmp_path, store_url):
    study_id = _study(store_url)
    storage = open_storage(store_url)
    trial = budget.start_trial(storage, study_id, budget=5)
    with _answer_lost_once(storage, sqlite_locked_error(tmp_path)) as lost:
        budget.fail_trial(storage, storage.get_trial(trial._trial_id), reason="dead", requeue=True)
    assert lost
    assert [t.state for t in storage.get_all_trials(study_id)] == [TrialState.FAIL, TrialState.WAITING]


def test_a_claim_whose_answer_was_lost_is_found_not_repeated(tmp_path, store_url, monkeypatch):
    study_id = _study(store_url)
    storage = open_storage(store_url)
    real_begin, error, lost = storage.engine.begin, sqlite_locked_error(tmp_path), []

    @contextlib.contextmanager
    def begin():
        with real_begin() as conn:
            yield conn
        if not lost:
            lost.append(1)
            raise error

    monkeypatch.setattr(storage.engine, "begin", begin)
    assert claim(storage, study_id, "hpo:worker:") == 0 and lost
    monkeypatch.undo()
    assert claim(storage, study_id, "hpo:worker:") == 1


def test_the_hint_for_more_trials_knows_when_the_budget_is_used(store_url):
    """While the budget has room, a worker helps; once it is used, the hint says a worker would run
    nothing (export-best and retrain use it when there is no complete trial)."""
    study_id = _study(store_url, "used")
    storage = open_storage(store_url, heartbeat=False)
    study = optuna.load_study(study_name="used", storage=storage)
    assert budget.more_trials_hint(study, 1) == "run: hpo worker --study used"
    assert budget.more_trials_hint(study, None) == "run: hpo worker --study used"
    trial = budget.start_trial(storage, study_id, budget=1)
    budget.fail_trial(storage, trial, reason="diverged", requeue=False)
    hint = budget.more_trials_hint(study, 1)
    assert hint.startswith("its budget of 1 trials is used, so a worker would run nothing; ")
    assert "hpo report --study used" in hint and "hpo worker" not in hint
