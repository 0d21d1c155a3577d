"""The study's trial budget, exact however many workers run and however they die.

``budget.n_trials`` counts lineages: a trial and the retries that re-run it with the same
parameters after its worker died or was interrupted. Each lineage holds one budget place, a
study system attr ``hpo:budget:<number of its first trial>``, taken in the same transaction that
starts the trial; a retry inherits its original's place. So a place is never held by no trial,
and a crash at any moment leaves the count right.

A trial that fails by no fault of its own is failed and re-queued in one transaction whose
conditional update (``RUNNING -> FAIL``) decides which process failed it: exactly one re-queue per
failure, whoever races (the worker itself on SIGTERM, others finding it stale).

What counts as finished: COMPLETE, PRUNED, and a FAIL that was not re-queued. Retries are marked
the way Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` marks them
(``failed_trial``, ``retry_history``), so its ``retried_trial_number`` and ``retry_history`` read them.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.orm
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hpo.store import optuna_private
from hpo.store.optuna_private import (
    STUDY_SYSTEM_ATTRS,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIALS,
    rdb_storage,
    stored_now,
    study_id,
)
from hpo.store.queries import RETRY_ATTR, count_keys, retried, upsert
from hpo.store.storage import RetryingRDBStorage

BUDGET_PREFIX = "hpo:budget:"
RETRY_HISTORY_ATTR = "retry_history"  # trial system attr of a retry (Optuna's retry callback): the trials it re-runs
RUNNER_ATTR = "hpo:runner"  # trial system attr: the token of the start that took the trial
# Attrs of a trial that describe one run of it, not its parameters: a retry starts without them.
RUN_USER_ATTRS = ("fail_reason", "retry_of", "retries", "worker", "epochs_run", "resumed_from_epoch", "curve",
                  "pruned_by", "feasible")


class _Abort(Exception):
    """Roll the transaction back: the budget is used up, or another process won."""


def retried_trial_number(trial: FrozenTrial) -> int | None:
    """The number of the original trial that ``trial`` re-runs (``None`` for an original)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def retry_history(trial: FrozenTrial) -> list[int]:
    """Numbers of the trials ``trial`` re-runs, the original first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return list(RetryHeartbeatStaleTrialCallback.retry_history(trial))


def is_retry(trial: FrozenTrial) -> bool:
    """A re-queued copy of a trial that failed by no fault of its own (dead or interrupted worker)."""
    return retried_trial_number(trial) is not None


def will_requeue(trial: FrozenTrial, max_retry: int | None) -> bool:
    """Whether failing ``trial`` with ``requeue=True, max_retry=max_retry`` queues a retry: fewer
    than ``max_retry`` runs of its lineage have failed before it."""
    return max_retry is None or len(retry_history(trial)) + 1 <= max_retry


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were re-queued: their FAIL does not use up budget."""
    return {n for t in trials for n in retry_history(t)}


def is_finished(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether ``trial`` ends its lineage: COMPLETE, PRUNED, or a FAIL that was not re-queued."""
    if trial.state == TrialState.FAIL:
        return trial.number not in retried
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def places_taken(storage: RetryingRDBStorage, study_id: int) -> int:
    """How many budget places the study's trials hold."""
    def query():
        with storage.engine.connect() as conn:
            return count_keys(conn, study_id, BUDGET_PREFIX)
    return retried(storage, query)


def _take_place(session, study_id: int, number: int, budget: int | None) -> None:
    if budget is None:
        return
    if count_keys(session, study_id, BUDGET_PREFIX) >= budget:
        raise _Abort("budget used up")
    session.execute(sa.insert(STUDY_SYSTEM_ATTRS).values(
        study_id=study_id, key=f"{BUDGET_PREFIX}{number}", value_json=json.dumps({"trial": number})))


def _mark_runner(session, trial_id: int, token: str) -> None:
    session.execute(sa.insert(TRIAL_SYSTEM_ATTRS).values(trial_id=trial_id, key=RUNNER_ATTR,
                                                          value_json=json.dumps(token)))


def _started_with(storage: RetryingRDBStorage, token: str) -> int | None:
    with storage.engine.connect() as conn:
        return conn.execute(sa.select(TRIAL_SYSTEM_ATTRS.c.trial_id).where(
            TRIAL_SYSTEM_ATTRS.c.key == RUNNER_ATTR, TRIAL_SYSTEM_ATTRS.c.value_json == json.dumps(token))).scalar()


# new_attrs(session, study_id) of start_trial: a new trial's system attrs, or None when none may start.
NewTrialAttrs = Callable[[sa.orm.Session, int], dict[str, Any] | None]


def _new(storage: RetryingRDBStorage, study_id: int, budget: int | None, token: str,
         new_attrs: NewTrialAttrs | None) -> FrozenTrial | None:
    try:
        with storage.transaction() as session:
            storage.lock_study(session, study_id)  # PostgreSQL/MySQL: places are counted one creator at a time
            # On SQLite the insert takes the write lock, so the places are counted after it.
            trial = storage.add_trial_in(session, study_id)
            _take_place(session, study_id, trial.number, budget)
            attrs = {} if new_attrs is None else new_attrs(session, study_id)
            if attrs is None:
                raise _Abort("nothing left to run")
            for key, value in attrs.items():
                session.execute(sa.insert(TRIAL_SYSTEM_ATTRS).values(trial_id=optuna_private.trial_id(trial), key=key,
                                                                      value_json=json.dumps(value)))
            _mark_runner(session, optuna_private.trial_id(trial), token)
    except _Abort:
        return None
    trial.system_attrs.update(attrs)
    trial.system_attrs[RUNNER_ATTR] = token
    return trial


def _pop(storage: RetryingRDBStorage, study_id: int, trial_id: int, retry: bool, budget: int | None,
         token: str) -> bool | None:
    """WAITING -> RUNNING for ``trial_id``, and a place for it unless it is a retry. ``True`` when
    this process took it, ``False`` when another did, ``None`` when the budget is used up."""
    try:
        with storage.transaction() as session:
            if not retry:
                storage.lock_study(session, study_id)
            taken = session.execute(sa.update(TRIALS).where(
                TRIALS.c.trial_id == trial_id, TRIALS.c.state == TrialState.WAITING).values(
                state=TrialState.RUNNING, datetime_start=stored_now())).rowcount
            if taken != 1:
                raise _Abort("taken by another process")
            if not retry:
                number = session.execute(sa.select(TRIALS.c.number).where(TRIALS.c.trial_id == trial_id)).scalar_one()
                _take_place(session, study_id, number, budget)
            _mark_runner(session, trial_id, token)
    except _Abort as e:
        return None if "budget" in str(e) else False
    return True


def start_trial(storage: RetryingRDBStorage, study_id: int, *, budget: int | None,
                waiting: list[tuple[int, bool]] = (), new_attrs: NewTrialAttrs | None = None) -> FrozenTrial | None:
    """Start the study's next trial in one transaction with its budget place: a re-queued retry
    when one waits (it keeps its original's place), else an enqueued trial, else a new one.

    Args:
        budget: the study's ``n_trials`` (``None``: no limit).
        waiting: (trial id, is a retry) of WAITING trials to try first, in order.
        new_attrs: ``new_attrs(session, study_id)``, called in the transaction that creates a new
            trial, after the study's lock and the budget place: the system attrs to give the trial
            (a grid study's point, :meth:`hpo.search.grid.GridSampler.point_attrs`), or ``None`` when no
            new trial may start. Retries and enqueued trials keep the attrs they carry.

    Returns:
        The RUNNING trial this process now runs (its ``system_attrs`` carry the start's token),
        or ``None`` when no retry waits and every place is taken (or ``new_attrs`` gave ``None``).
    """
    token = uuid.uuid4().hex
    attempts = 0

    def attempt() -> FrozenTrial | None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:  # an earlier attempt may have committed before its answer was lost
            found = _started_with(storage, token)
            if found is not None:
                return storage.get_trial(found)
        for trial_id, retry in waiting:
            took = _pop(storage, study_id, trial_id, retry, budget, token)
            if took:
                return storage.get_trial(trial_id)
            if took is None:
                break  # no place left for enqueued trials; retries come first, so none waits either
        else:
            return _new(storage, study_id, budget, token, new_attrs)
        return None

    return retried(storage, attempt)


def fail_trial(storage: RetryingRDBStorage, trial: FrozenTrial, *, reason: str, requeue: bool,
               max_retry: int | None = None, keep_intermediate_values: bool = False) -> bool:
    """Fail the RUNNING ``trial`` and, with ``requeue``, queue a retry with the same parameters,
    in one transaction: both happen or neither.

    Exactly one process fails a trial: the update is conditional on the trial still RUNNING, and
    the process whose update changed the row re-queues it. A trial already finished (told by its
    worker, or failed by another process) is left alone.

    Args:
        reason: the ``fail_reason`` user attr.
        requeue: queue a retry (unless ``max_retry`` retries of this trial's original already ran).
        keep_intermediate_values: the retry starts with the values ``trial`` reported. hpo's
            workers leave it off: a retry that resumes from a checkpoint reports the checkpoint's
            own values (``hpo.search.objective``), and values reported after the checkpoint must not
            reach the pruner before the steps retrained.

    Returns:
        Whether this call failed the trial.
    """
    history = [*retry_history(trial), trial.number]
    requeue = requeue and will_requeue(trial, max_retry)
    template = None
    if requeue:
        system_attrs = {k: v for k, v in trial.system_attrs.items() if k != RUNNER_ATTR}
        system_attrs.update({RETRY_ATTR: history[0], RETRY_HISTORY_ATTR: history})
        template = FrozenTrial(
            number=-1, state=TrialState.WAITING, value=None, values=None, datetime_start=None,
            datetime_complete=None, params=dict(trial.params), distributions=dict(trial.distributions),
            user_attrs={k: v for k, v in trial.user_attrs.items() if k not in RUN_USER_ATTRS},
            system_attrs=system_attrs,
            intermediate_values=dict(trial.intermediate_values) if keep_intermediate_values else {},
            trial_id=-1)
    study_id = None

    def attempt() -> bool:
        nonlocal study_id
        try:
            with storage.transaction() as session:
                if template is not None:
                    if study_id is None:
                        study_id = session.execute(sa.select(TRIALS.c.study_id).where(
                            TRIALS.c.trial_id == optuna_private.trial_id(trial))).scalar_one()
                    storage.lock_study(session, study_id)  # the retry gets the next number
                failed = session.execute(sa.update(TRIALS).where(
                    TRIALS.c.trial_id == optuna_private.trial_id(trial), TRIALS.c.state == TrialState.RUNNING).values(
                    state=TrialState.FAIL, datetime_complete=stored_now())).rowcount
                if failed != 1:
                    raise _Abort("finished elsewhere")
                upsert(session.connection(), TRIAL_USER_ATTRS,
                       [{"trial_id": optuna_private.trial_id(trial), "key": "fail_reason", "value_json": json.dumps(reason)}],
                       ("trial_id", "key"))
                if template is not None:
                    storage.add_trial_in(session, study_id, template)
        except _Abort:
            return False
        return True

    return retried(storage, attempt)


def more_trials_hint(study: optuna.Study, budget: int | None) -> str:
    """What would give the study more trials: ``hpo worker`` while its budget has room; once the
    budget is used, a worker would run nothing, and the hint says so and what would help."""
    name = study.study_name
    storage = rdb_storage(study)
    if budget is None or not isinstance(storage, RetryingRDBStorage) or places_taken(storage, study_id(study)) < budget:
        return f"run: hpo worker --study {name}"
    return (f"its budget of {budget} trials is used, so a worker would run nothing; see what they did with "
            f"hpo report --study {name}, and for more trials create a study with a larger budget.n_trials")
