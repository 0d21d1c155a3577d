"""A worker: loads the study and its spec from the store, puts the data on its device once, and
runs trials until the study's budget (or this worker's own limit) is reached.

Any number of workers may share one store. The spec's ``budget.n_trials`` counts trials of the
whole study, exactly: before creating a trial a worker claims one of ``n_trials`` numbered
places (``hpo:budget:K`` study system attrs, unique in the store, so the claim is atomic on
every backend). A retry of a trial whose worker died or was interrupted (Optuna's
``failed_trial`` system attr) takes over its original's place, so a retried FAIL is never
counted twice. When the places are gone a worker still runs re-queued retries and waits for the
study's running trials, so a trial lost with a dead worker is finished by a live one.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.console import trial_line
from hpo.data import load_dataset
from hpo.objective import Interrupted, make_objective
from hpo.progress import Progress
from hpo.errors import StoreError
from hpo.store import (RETRY_ATTR, WorkerStorage, claim, claimed, is_transient, mask_url, open_storage, release,
                       resolve_url, silent_trials, waiting_trials)
from hpo import optuna_private
from hpo import study as studies
from hpo.study import Summary, load, retried_numbers, summarize

BUDGET_PREFIX = "hpo:budget:"
WORKER_PREFIX = "hpo:worker:"
SEED_STRIDE = 10_007  # seed offset = worker number in the store + SEED_STRIDE * --worker-index
STALE_CHECK_EVERY = 1.0  # seconds
WAITING_CHECK_EVERY = 1.0  # seconds

_log = logging.getLogger("hpo.worker")


def is_retry(trial: FrozenTrial) -> bool:
    """A re-queued copy of a trial that failed by no fault of its own (dead or interrupted worker)."""
    return RETRY_ATTR in trial.system_attrs


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    """The trial as read from the store when the ``Trial`` was made, kept up to date by Optuna
    with its own suggestions, reports and attrs: no round trip."""
    return optuna_private.cached_frozen_trial(trial)


class _StopSignal:
    """First SIGINT/SIGTERM: finish cleanly after the current epoch. Second: exit at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            os.write(2, b"hpo: second signal, exiting now\n")
            os._exit(128 + signum)
        self.requested = True
        # os.write: a print here could land inside another print of the main thread and raise.
        os.write(2, f"hpo: got {signal.Signals(signum).name}: stopping after the current epoch "
                    f"(again to exit now)\n".encode())


class _Heartbeat:
    """Every interval, in a thread: writes the trial's pending reports and attrs (so the dashboard
    follows a running trial) and records its heartbeat. A store outage only skips beats."""

    def __init__(self, storage: WorkerStorage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The first beat comes after one interval: a trial shorter than that costs no heartbeat
        # writes, and a worker that dies before it is caught by the silent-trial check instead.
        interval = self._storage.get_heartbeat_interval()
        while not self._stop.wait(interval):
            try:
                self._storage.flush(self._trial_id)
                self._storage.record_heartbeat(self._trial_id)
            except Exception as e:  # noqa: BLE001 - the store's own retries are exhausted; try next beat
                _log.warning("heartbeat failed: %s", mask_url(str(e).splitlines()[0] if str(e) else repr(e)))

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _requeue(study: optuna.Study, frozen: FrozenTrial) -> None:
    """Queue a copy of ``frozen`` with the same parameters, marked the way Optuna marks its retries."""
    system_attrs = {RETRY_ATTR: frozen.number, "retry_history": [], **frozen.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], frozen.number]
    user_attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("fail_reason", "retry_of", "retries")}
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=frozen.params,
                                        distributions=frozen.distributions, user_attrs=user_attrs,
                                        system_attrs=system_attrs))


class _Worker:
    def __init__(self, study: optuna.Study, storage: WorkerStorage, study_id: int,
                 budget: int | None, label: str):
        self.study, self.storage, self.study_id, self.budget, self.label = study, storage, study_id, budget, label
        self._silent_since: dict[int, float] = {}  # trial id -> when this worker first saw it without heartbeat
        self._stale_checked = -float("inf")
        self._surplus_since: float | None = None
        self._none_waiting_at: float | None = None

    def _trial(self, trial_id: int) -> FrozenTrial:
        return self.storage.get_trial(trial_id)

    def pop_retry(self, retries: list[int]) -> optuna.Trial | None:
        """Take one of the re-queued ``retries`` (WAITING → RUNNING is atomic in the store), if one still waits."""
        for trial_id in retries:
            try:
                if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return optuna.Trial(self.study, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def next_trial(self) -> optuna.Trial | None:
        """A retry if one waits, else a new trial within the budget; ``None`` when the budget is used."""
        waiting = self._waiting()
        trial = self.pop_retry([trial_id for trial_id, retry in waiting if retry])
        if trial is not None:
            return trial
        place = None
        if self.budget is not None:
            place = claim(self.storage, self.study_id, BUDGET_PREFIX, limit=self.budget, value=self.label)
            if place is None:
                return None
        try:
            if waiting:  # enqueued trials, or retries others took meanwhile: Optuna pops what is left
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "heartbeat is meant for optimize": we beat ourselves
                    trial = self.study.ask()
            else:
                trial = self._new_trial()
        except BaseException:
            if place is not None:
                release(self.storage, self.study_id, BUDGET_PREFIX, place)  # no trial, no place taken
            raise
        if place is not None and is_retry(_frozen(trial)):
            release(self.storage, self.study_id, BUDGET_PREFIX, place)  # a retry keeps its original's place
        return trial

    def _waiting(self) -> list[tuple[int, bool]]:
        """The study's waiting trials, read at most once a second while none waits: a re-queued or
        enqueued trial may wait that much longer, and short trials skip a query each."""
        now = time.monotonic()
        if self._none_waiting_at is not None and now - self._none_waiting_at < WAITING_CHECK_EVERY:
            return []
        waiting = waiting_trials(self.storage, self.study_id)
        self._none_waiting_at = None if waiting else now
        return waiting

    def _new_trial(self) -> optuna.Trial:
        """``study.ask()`` for a study that holds no waiting trial. Optuna's ask first re-reads
        every unfinished trial of the study to look for one, which is most of its store traffic
        with many workers; this is the rest of it."""
        optuna_private.forget_cached_trials(self.study)
        return optuna.Trial(self.study, optuna_private.study_storage(self.study).create_new_trial(self.study_id))

    def fail_stale(self) -> None:
        """Fail (and so re-queue) trials of dead workers: Optuna's heartbeat check, plus trials whose
        worker died before their first heartbeat. At most once a second: a trial only turns stale
        after the grace period, and short trials would otherwise pay this check each."""
        now = time.monotonic()
        if now - self._stale_checked < STALE_CHECK_EVERY:
            return
        self._stale_checked = now
        optuna.storages.fail_stale_trials(self.study)
        # Timed on this worker's own clock: other machines' clocks and time zones do not matter.
        silent = {trial_id: self._silent_since.get(trial_id, now) for trial_id, _ in silent_trials(
            self.storage, self.study_id)}
        self._silent_since = silent
        for trial_id, since in silent.items():
            if now - since <= (self.storage.grace_period or 0):
                continue
            try:
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.get_heartbeat_stale_trial_callback()(self.study, self._trial(trial_id))

    def in_flight(self) -> bool:
        """Whether trials of others still run (or retries wait), or budget places are held by no
        trial yet: either may come back to this worker if the worker behind it died."""
        if any(t.state == TrialState.RUNNING or is_retry(t) for t in self.study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))):
            return True
        return self.budget is not None and self.orphan_places() > 0

    def orphan_places(self) -> int:
        """Budget places that no trial holds: a worker between its claim and its trial, or one
        killed right there. Once the surplus has lasted the grace period (on this worker's own
        clock) its worker is dead and the places are released for live workers to use."""
        trials = self.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        holders = sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried)
                      and not (t.state == TrialState.WAITING and not is_retry(t)))  # enqueued: not claimed yet
        places = claimed(self.storage, self.study_id, BUDGET_PREFIX)
        surplus = len(places) - holders
        now = time.monotonic()
        if surplus <= 0:
            self._surplus_since = None
            return 0
        if self._surplus_since is None:
            self._surplus_since = now
        if now - self._surplus_since <= (self.storage.grace_period or 0):
            return surplus
        for k in sorted(int(key[len(BUDGET_PREFIX):]) for key in places)[-surplus:]:
            release(self.storage, self.study_id, BUDGET_PREFIX, k)
        _log.warning("released %d budget place(s) held by no trial for %ss (a worker died before its trial began)",
                     surplus, self.storage.grace_period)
        self._surplus_since = None
        return surplus

    def run(self, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> FrozenTrial:
        value, state = None, TrialState.COMPLETE
        with _Heartbeat(self.storage, optuna_private.trial_id(trial)):
            frozen = _frozen(trial)
            trial.set_user_attr("worker", self.label)
            if is_retry(frozen):
                trial.set_user_attr("retry_of", frozen.system_attrs[RETRY_ATTR])
                trial.set_user_attr("retries", len(frozen.system_attrs.get("retry_history", ())))
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Interrupted:
                trial.set_user_attr("fail_reason", "interrupted")
                _requeue(self.study, self._trial(optuna_private.trial_id(trial)))
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            except Exception as e:  # noqa: BLE001 - any failure of one trial must not end the worker
                state = TrialState.FAIL
                trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:500])
        return self._tell(trial, value, state)

    def _tell(self, trial: optuna.Trial, value: float | None, state: TrialState) -> FrozenTrial:
        """``study.tell`` (skipping a trial finished elsewhere) less its final re-read of the trial:
        the finished trial returned is Optuna's own copy of it with the state and values told."""
        state, values, _ = optuna_private.tell(self.study, trial, value if state == TrialState.COMPLETE else None, state)
        frozen = copy.deepcopy(_frozen(trial))
        frozen.state, frozen.values, frozen.datetime_complete = state, values, datetime.datetime.now()
        return frozen


def run_worker(
    study_name: str,
    *,
    storage_url: str | None = None,
    device: torch.device = torch.device("cpu"),
    n_trials: int | None = None,
    timeout: float | None = None,
    worker_index: int = 0,
    data_dir: str | None = None,
    echo: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> Summary:
    """Run trials of ``study_name`` on ``device`` and return the study's summary afterwards.

    SIGINT/SIGTERM end the running trial as FAIL (``fail_reason`` "interrupted"), re-queue it,
    close the store's connections and return; a second signal exits at once.

    Args:
        n_trials: at most this many trials from this worker (the spec's budget still holds).
        timeout: stop starting trials after this many seconds (the spec's timeout still holds).
        worker_index: a further sampler-seed offset. Each worker also takes the next free worker
            number of the study in the store, so concurrently started workers draw different
            points while the first worker of a fresh study always uses the spec's seed.
        progress: shows the running trial's epoch and latest value (default: nothing).

    Raises:
        StoreError: when the store cannot be opened or has no such study.
    """
    storage = open_storage(storage_url)
    study_id = studies.study_id(storage, study_name)
    label = f"{socket.gethostname()}:{os.getpid()}"
    number = claim(storage, study_id, WORKER_PREFIX, value=label)
    study, spec = load(study_name, storage, seed_offset=number + SEED_STRIDE * worker_index)
    data = load_dataset(spec, data_dir=data_dir).to(device)
    if device.type == "cpu" and data.x[0].numel() < 1024:
        # Tiny models: thread hand-offs cost more than the arithmetic they would split.
        torch.set_num_threads(1)
    budget = spec.budget.n_trials
    timeouts = [t for t in (timeout, spec.budget.timeout) if t is not None]
    deadline = time.monotonic() + min(timeouts) if timeouts else None
    poll = min(2.0, storage.get_heartbeat_interval() or 2.0)
    worker = _Worker(study, storage, study_id, budget, label)

    echo(f"worker {number} on {device} for study {study_name!r} ({spec.model}, {spec.metric}, "
         f"budget {budget} trials)")
    start, ran = time.perf_counter(), 0
    with _StopSignal() as stop:
        objective = make_objective(spec, data, should_stop=lambda: stop.requested, progress=progress)
        try:
            while not stop.requested and (n_trials is None or ran < n_trials):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                worker.fail_stale()
                trial = worker.next_trial()
                if trial is None:
                    if not worker.in_flight():
                        echo(f"study {study_name!r} has used its budget of {budget} trials")
                        break
                    time.sleep(poll)
                    continue
                frozen = worker.run(trial, objective)
                ran += 1
                echo(trial_line(study, frozen, spec.metric))
        except Interrupted:
            echo("interrupted: the running trial is re-queued")
        except Exception as e:
            if is_transient(e):
                raise StoreError(f"lost the store {mask_url(resolve_url(storage_url))} for longer than the "
                                 f"retry window (HPO_STORE_RETRY): {mask_url(str(e).splitlines()[0])}") from e
            raise
        summary = summarize(study)
        storage.remove_session()
        storage.engine.dispose()
    echo(f"worker {number} done in {time.perf_counter() - start:.1f}s ({ran} trials)")
    sys.stdout.flush()
    return summary
