"""A worker: loads the study and its spec from the store, puts the data on its device once, and
runs trials until the study's budget (or this worker's own limit) is reached.

Any number of workers may share one store; :mod:`hpo.store.budget` keeps ``budget.n_trials`` exact.
When the budget's places are gone a worker still runs re-queued retries and waits for the
study's running trials, so a trial lost with a dead worker is finished by a live one.

Faults a worker survives (each tested): a trial that raises or returns NaN/inf (FAIL with
``fail_reason``), a trial failed meanwhile by another process (dropped with a warning line),
SIGINT/SIGTERM (FAIL "interrupted", re-queued, exit 0), a store that goes away for less than
``HPO_STORE_RETRY`` seconds, another worker dying at any moment.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.console import trial_line
from hpo.data.dataset import Dataset
from hpo.data.sources import load_dataset
from hpo.errors import StoreError
from hpo.running.progress import Progress
from hpo.running.signals import StopSignal
from hpo.search import provenance
from hpo.search import study as studies
from hpo.search.grid import GridSampler, trials_to_run
from hpo.search.grid import points as grid_points
from hpo.search.objective import Abandoned, Interrupted, lineage_number, make_objective
from hpo.search.study import load
from hpo.store import budget as budgets
from hpo.store import optuna_private
from hpo.store.config import Heartbeat, env_seconds, mask_url, resolve_url
from hpo.store.queries import claim, silent_trials, unfinished, waiting_trials
from hpo.store.retry import is_transient
from hpo.store.statistics import Summary, summarize
from hpo.store.storage import WorkerStorage, open_storage
from hpo.training.checkpoint import CheckpointStore, trial_key

WORKER_PREFIX = "hpo:worker:"
SEED_STRIDE = 10_007  # seed offset = worker number in the store + SEED_STRIDE * --worker-index
STALE_CHECK_EVERY = 1.0  # seconds
WAITING_CHECK_EVERY = 1.0  # seconds

_log = logging.getLogger("hpo.running.worker")


class _Heartbeat:
    """Every interval, in a thread: records the trial's heartbeat, then writes its pending reports
    and attrs (so the dashboard follows a running trial) and sees whether another process
    finished it. The beat never waits on the write: a write that keeps failing does not let
    other workers think the trial dead. A store outage only skips beats."""

    def __init__(self, storage: WorkerStorage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The first beat comes after one interval: a trial shorter than that costs no heartbeat
        # writes, and a worker that dies before it is caught by the silent-trial check instead.
        interval = self._storage.get_heartbeat_interval()
        while not self._stop.wait(interval):
            for step in (self._storage.record_heartbeat, self._storage.refresh):
                try:
                    step(self._trial_id)
                except Exception as e:  # noqa: BLE001 - the store's own retries are exhausted; try next beat
                    _log.warning("heartbeat %s failed: %s", step.__name__,
                                 mask_url(str(e).splitlines()[0] if str(e) else repr(e)))

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """One worker's view of the study: starts trials within the budget (:mod:`hpo.store.budget`), runs
    them with a heartbeat, tells them, and fails and re-queues the trials of dead workers. Driven by
    :func:`run_worker`; benchmarks drive it directly with their own objectives."""

    def __init__(self, study: optuna.Study, storage: WorkerStorage, study_id: int, budget: int | None,
                 label: str, *, max_retry: int | None = 3, new_attrs: budgets.NewTrialAttrs | None = None,
                 checkpoints: CheckpointStore | None = None):
        self.study, self.storage, self.study_id, self.budget, self.label = study, storage, study_id, budget, label
        self.max_retry, self.new_attrs, self.checkpoints = max_retry, new_attrs, checkpoints
        self._silent_since: dict[int, float] = {}  # trial id -> when this worker first saw it without heartbeat
        self._stale_checked = -float("inf")
        self._none_waiting_at: float | None = None

    def next_trial(self) -> optuna.Trial | None:
        """A re-queued retry if one waits, else an enqueued or new trial within the budget;
        ``None`` when the budget's places are all taken."""
        frozen = budgets.start_trial(self.storage, self.study_id, budget=self.budget, waiting=self._waiting(),
                                     new_attrs=self.new_attrs)
        if frozen is None:
            return None
        self.storage.adopt(frozen)
        optuna_private.cache_trial(self.study, frozen)
        return optuna.Trial(self.study, frozen._trial_id)

    def _waiting(self) -> list[tuple[int, bool]]:
        """The study's waiting trials, read at most once a second while none waits: a re-queued or
        enqueued trial may wait that much longer, and short trials skip a query each."""
        now = time.monotonic()
        if self._none_waiting_at is not None and now - self._none_waiting_at < WAITING_CHECK_EVERY:
            return []
        waiting = waiting_trials(self.storage, self.study_id)
        self._none_waiting_at = None if waiting else now
        return waiting

    def fail_stale(self) -> None:
        """Fail and re-queue the trials of dead workers: those whose heartbeat stopped for the
        grace period (the database's clock), and those that never sent one, silent for the grace
        period on this worker's own clock. At most once a second: a trial only turns stale after
        the grace period, and short trials would otherwise pay this check each."""
        now = time.monotonic()
        if now - self._stale_checked < STALE_CHECK_EVERY:
            return
        self._stale_checked = now
        grace = self.storage.grace_period
        silent = {trial_id: self._silent_since.get(trial_id, now)
                  for trial_id in silent_trials(self.storage, self.study_id)}
        self._silent_since = silent
        dead = [*self.storage.stale_trial_ids(self.study_id),
                *(trial_id for trial_id, since in silent.items() if now - since > grace)]
        for trial_id in dead:
            trial = self.storage.get_trial(trial_id)
            if trial.state != TrialState.RUNNING:
                continue
            if budgets.fail_trial(self.storage, trial, reason=f"worker lost: no heartbeat for {grace}s",
                                  requeue=True, max_retry=self.max_retry):
                if budgets.will_requeue(trial, self.max_retry):
                    _log.warning("trial %d: its worker is gone (no heartbeat for %ss); failed and re-queued",
                                 trial.number, grace)
                else:
                    self.lineage_ended(trial)

    def lineage_ended(self, trial: FrozenTrial) -> None:
        """``trial`` finished its lineage (COMPLETE, PRUNED, or FAIL without a retry): its
        checkpoint, if any, will never be resumed."""
        if self.checkpoints is not None:
            try:
                self.checkpoints.delete(trial_key(lineage_number(trial)))
            except OSError as e:  # a file left behind costs space, not correctness
                _log.warning("trial %d: checkpoint not deleted: %s", trial.number, e)

    def in_flight(self) -> bool:
        """Whether trials still run (or retries wait): either may come back to this worker if the
        worker behind it died."""
        running, waiting = unfinished(self.storage, self.study_id)
        return running + waiting > 0

    def run(self, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> FrozenTrial | None:
        """Run ``objective`` on ``trial`` and tell the result. Returns the finished trial, or
        ``None`` when another process finished it meanwhile (it is dropped with a warning).

        Raises:
            Interrupted: when the worker was told to stop; the trial is failed and re-queued first.
        """
        trial_id = optuna_private.trial_id(trial)
        value, state, reason = None, TrialState.COMPLETE, None
        with _Heartbeat(self.storage, trial_id):
            frozen = optuna_private.cached_frozen_trial(trial)
            try:
                trial.set_user_attr("worker", self.label)
                if budgets.is_retry(frozen):
                    trial.set_user_attr("retry_of", budgets.retried_trial_number(frozen))
                    trial.set_user_attr("retries", len(budgets.retry_history(frozen)))
                value = objective(trial)
                if not all(map(math.isfinite, value if isinstance(value, list) else [value])):
                    state, reason = TrialState.FAIL, f"objective value is {value}"
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Interrupted:
                self.storage.flush(trial_id)
                budgets.fail_trial(self.storage, self.storage.get_trial(trial_id), reason="interrupted",
                                   requeue=True)
                raise
            except (Abandoned, optuna.exceptions.UpdateFinishedTrialError):
                return self._abandon(trial)
            except Exception as e:  # noqa: BLE001 - any failure of one trial must not end the worker
                state, reason = TrialState.FAIL, f"{type(e).__name__}: {e}"[:500]
        try:
            if reason is not None:
                trial.set_user_attr("fail_reason", reason)
            finished = self._tell(trial, value, state)
        except optuna.exceptions.UpdateFinishedTrialError:
            return self._abandon(trial)
        self.lineage_ended(finished)  # told here: COMPLETE, PRUNED or a FAIL that is not re-queued
        return finished

    def _abandon(self, trial: optuna.Trial) -> None:
        stored = self.storage.get_trial(optuna_private.trial_id(trial))
        echo_warning(f"trial {trial.number} was finished elsewhere ({stored.state.name}: "
                     f"{stored.user_attrs.get('fail_reason', 'no reason given')}); dropped it, taking the next")
        return None

    def _tell(self, trial: optuna.Trial, value: float | list[float] | None, state: TrialState) -> FrozenTrial:
        """``study.tell`` (skipping a trial finished elsewhere) less its final re-read of the trial:
        the finished trial returned is Optuna's own copy of it with the state and values told."""
        state, values, _ = optuna_private.tell(self.study, trial, value if state == TrialState.COMPLETE else None,
                                               state)
        frozen = copy.deepcopy(optuna_private.cached_frozen_trial(trial))
        frozen.state, frozen.values, frozen.datetime_complete = state, values, datetime.datetime.now()
        return frozen


def echo_warning(text: str) -> None:
    _log.warning(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _open_store(study_name: str, storage_url: str | None) -> tuple[WorkerStorage, Heartbeat]:
    """The worker's store, with the heartbeat settings stored in the study (every worker the same)."""
    plain = open_storage(storage_url, heartbeat=False)
    heartbeat = studies.heartbeat_of(plain, studies.study_id(plain, study_name))
    plain.engine.dispose()
    return open_storage(storage_url, heartbeat=heartbeat), heartbeat


def _data_on(device: torch.device, spec, storage: WorkerStorage, data_dir: str | None) -> Dataset:
    data = load_dataset(spec, storage=storage, data_dir=data_dir).to(device)
    if device.type == "cpu" and data.x[0].numel() < 1024:
        # Tiny models: thread hand-offs cost more than the arithmetic they would split.
        torch.set_num_threads(1)
    return data


def _run_trials(worker: Worker, objective: Callable[[optuna.Trial], float], stop: StopSignal, *,
                n_trials: int | None, deadline: float | None, poll: float, done_line: str, metric: str,
                echo: Callable[[str], None]) -> int:
    """The worker's loop: fail dead workers' trials, start the next trial, run it, say how it ended;
    until the study's budget (or grid) is done, this worker's limit or deadline, or a stop signal.
    Returns how many trials this worker ran."""
    ran = 0
    try:
        while not stop.requested and (n_trials is None or ran < n_trials):
            if deadline is not None and time.monotonic() >= deadline:
                break
            worker.fail_stale()
            trial = worker.next_trial()
            if trial is None:
                if not worker.in_flight():
                    echo(done_line)
                    break
                time.sleep(poll)  # the budget is taken but trials still run: one may come back
                continue
            frozen = worker.run(trial, objective)
            ran += 1
            if frozen is not None:
                echo(trial_line(worker.study, frozen, metric))
    except Interrupted:
        echo("interrupted: the running trial is re-queued")
    return ran


CPU = torch.device("cpu")


def _noting(objective: Callable[[optuna.Trial], float], key: str, value: str) -> Callable[[optuna.Trial], float]:
    """``objective`` that first records ``key: value`` in the trial's user attrs."""
    def noted(trial: optuna.Trial) -> float:
        trial.set_user_attr(key, value)
        return objective(trial)
    return noted


def run_worker(
    study_name: str,
    *,
    storage_url: str | None = None,
    device: torch.device = CPU,
    n_trials: int | None = None,
    timeout: float | None = None,
    worker_index: int = 0,
    data_dir: str | None = None,
    artifacts: str | None = None,
    echo: Callable[[str], None] = print,
    progress: Progress | None = None,
    allow_version_mismatch: bool = False,
) -> Summary:
    """Run trials of ``study_name`` on ``device`` and return the study's summary afterwards.

    SIGINT/SIGTERM end the running trial as FAIL (``fail_reason`` "interrupted"), re-queue it,
    close the store's connections and return; a second signal exits at once.

    Args:
        n_trials: at most this many trials from this worker (the spec's budget still holds).
        timeout: stop starting trials after this many seconds (the spec's timeout still holds).
        worker_index: a further sampler-seed offset. Each worker also takes the next free worker
            number of the study in the store, so concurrently started workers draw different
            points while the first worker of a fresh study always uses the spec's seed. A grid
            study's workers all use the spec's seed (``hpo.search.study.build_sampler``).
        artifacts: the artifact folder whose ``checkpoints/`` hold the running trials'
            checkpoints (default: ``HPO_ARTIFACTS``, else beside a SQLite store; see
            ``hpo.store.artifacts.artifact_dir``). Workers on several machines resume each other's trials
            when they share it.
        progress: shows the running trial's epoch and latest value (default: nothing).
        allow_version_mismatch: run a study whose model family is installed here at another
            version than the study was created with; each trial records the difference
            (user attr ``version_mismatch``).

    Raises:
        StoreError: when the store cannot be opened or has no such study.
        SpecError: the study's model family is not installed here, or at another version (without
            ``allow_version_mismatch``): one line naming the package and version.
    """
    storage, heartbeat = _open_store(study_name, storage_url)
    study_id = studies.study_id(storage, study_name)
    mismatches = provenance.mismatches(storage.get_study_system_attrs(study_id).get(provenance.ATTR),
                                       study=study_name, allow=allow_version_mismatch)
    for note in mismatches:
        echo(f"warning: {note} (--allow-version-mismatch: recorded in every trial)")
    label = f"{socket.gethostname()}:{os.getpid()}"
    number = claim(storage, study_id, WORKER_PREFIX, value=label)
    study, spec = load(study_name, storage, seed_offset=number + SEED_STRIDE * worker_index)
    data = _data_on(device, spec, storage, data_dir)
    # A grid study takes at most one budget place per point: each new trial gets a point no
    # other trial holds (hpo.search.grid), and the study ends when every point has run.
    grid = study.sampler if isinstance(study.sampler, GridSampler) else None
    budget = trials_to_run(spec)
    checkpoints = (CheckpointStore.for_study(study_name, storage_url=storage_url, artifacts=artifacts)
                   if spec.checkpoint.enabled else None)
    worker = Worker(study, storage, study_id, budget, label, max_retry=int(env_seconds("HPO_MAX_RETRY", 3)),
                    new_attrs=grid.point_attrs if grid is not None else None, checkpoints=checkpoints)
    done_line = (f"study {study_name!r} has run every point of its grid ({grid_points(grid.size)})"
                 if grid is not None and budget == grid.size else
                 f"study {study_name!r} has used its budget of {budget} trials")
    timeouts = [t for t in (timeout, spec.budget.timeout) if t is not None]
    deadline = time.monotonic() + min(timeouts) if timeouts else None

    echo(f"worker {number} on {device} for study {study_name!r} ({spec.model}, {spec.metric}, "
         f"budget {spec.budget.n_trials} trials{f', a grid of {grid_points(grid.size)}' if grid else ''})")
    start = time.perf_counter()
    with StopSignal() as stop:
        objective = make_objective(spec, data, should_stop=lambda: stop.requested,
                                   is_abandoned=lambda trial_id: storage.finished_elsewhere(trial_id) is not None,
                                   progress=progress, checkpoints=checkpoints)
        if mismatches:
            objective = _noting(objective, "version_mismatch", "; ".join(mismatches))
        try:
            ran = _run_trials(worker, objective, stop, n_trials=n_trials, deadline=deadline,
                              poll=min(2.0, heartbeat.interval), done_line=done_line, metric="/".join(spec.metric_names), echo=echo)
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
