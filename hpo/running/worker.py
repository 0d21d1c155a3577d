"""A worker: loads the study and its spec from the store, puts the data on its device once, and
runs trials until the study's budget (or this worker's own limit) is reached.

Any number of workers may share one store; :mod:`hpo.store.budget` keeps ``budget.n_trials`` exact.
When the budget's places are gone a worker still runs re-queued retries and waits for the
study's running trials, so a trial lost with a dead worker is finished by a live one.

Faults a worker survives (each tested): a trial that raises or returns NaN/inf (FAIL with
``fail_reason``), a trial failed meanwhile by another process (dropped with a warning line),
SIGINT/SIGTERM (FAIL "interrupted", re-queued, exit 0), a store that goes away for less than
``HPO_STORE_RETRY`` seconds, another worker dying at any moment.

A store lost for longer, or whose disk is full, is no fault of the trial: the worker leaves the
trial RUNNING and ends with one line (``StoreUnreachable``: exit 75; ``StoreFull``: exit 74); the
next worker finds the trial silent after the grace period and re-queues it in its budget place.
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
from dataclasses import replace

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.console import params_line, retry_line, trial_line
from hpo.data.dataset import Dataset
from hpo.data.sources import data_title, load_dataset, on_device
from hpo.errors import StoreFault, StoreFull, StoreUnreachable, warn
from hpo.running.progress import BudgetProgress, Progress
from hpo.running.signals import StopSignal
from hpo.search import provenance
from hpo.search import study as studies
from hpo.search.grid import StoreGridSampler, trials_to_run
from hpo.search.grid import points as grid_points
from hpo.search.objective import Abandoned, lineage_number, make_objective
from hpo.search.study import open_study
from hpo.store import budget as budgets
from hpo.store import control, optuna_private
from hpo.store.config import Heartbeat, env_seconds, mask_url, resolve_url
from hpo.store.queries import claim, silent_trials, unfinished, waiting_trials
from hpo.store.retry import is_disk_full, is_transient, reason
from hpo.store.statistics import Summary, summarize
from hpo.store.statistics import summary as study_summary
from hpo.store.storage import WorkerStorage, open_storage
from hpo.training.boundary import Interrupted
from hpo.training.checkpoint import CheckpointStore, trial_key
from hpo.training.seeds import sampler_seed_offset

WORKER_PREFIX = "hpo:worker:"
STALE_CHECK_EVERY = 1.0  # seconds
WAITING_CHECK_EVERY = 1.0  # seconds

_log = logging.getLogger("hpo.running.worker")


class StudyGone(Exception):
    """The worker's study was deleted, or replaced by one of the same name (``create-study --force``)."""


class _Heartbeat:
    """Every interval, in a thread: records the trial's heartbeat, then writes its pending reports
    and attrs (so the dashboard follows a running trial) and sees whether another process
    finished it, or whether the study was deleted or replaced. The beat never waits on the write: a
    write that keeps failing does not let other workers think the trial dead. A store outage skips
    beats; one past ``HPO_STORE_RETRY`` stops the trial after its epoch (``fault``)."""

    def __init__(self, storage: WorkerStorage, trial_id: int, study_gone: Callable[[], bool]):
        self._storage, self._trial_id, self._study_gone = storage, trial_id, study_gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.fault: StoreFault | None = None  # the store was lost past its retries: the trial stops

    def _run(self) -> None:
        # The first beat comes after one interval: a trial shorter than that costs no heartbeat
        # writes, and a worker that dies before it is caught by the silent-trial check instead.
        interval = self._storage.get_heartbeat_interval()
        while not self._stop.wait(interval):
            for step in (self._check_study, self._storage.record_heartbeat, self._storage.refresh):
                try:
                    if step(self._trial_id) is False:
                        return
                except StoreFault as e:
                    # Past HPO_STORE_RETRY: stop training for nothing; the worker stops after the
                    # epoch, leaving the trial RUNNING for the next worker to re-queue.
                    self.fault = e
                    self._storage.drop(self._trial_id)
                    return
                except Exception as e:  # noqa: BLE001 - try again at the next beat
                    _log.warning("heartbeat %s failed: %s", step.__name__,
                                 mask_url(str(e).splitlines()[0] if str(e) else repr(e)))

    def _check_study(self, trial_id: int) -> bool:
        if self._study_gone():
            # Write nothing more: the trial's id may be reused by the new study's trials.
            self._storage.drop(trial_id)
            return False
        return True

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

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
        self.current: int | None = None  # the number of the trial this worker runs now
        self.identity = studies.identity(storage, study.study_name)  # (id, creation token) when loaded

    def next_trial(self) -> optuna.Trial | None:
        """A re-queued retry if one waits, else an enqueued or new trial within the budget;
        ``None`` when the budget's places are all taken."""
        frozen = budgets.start_trial(self.storage, self.study_id, budget=self.budget, waiting=self._waiting(),
                                     new_attrs=self.new_attrs)
        if frozen is None:
            return None
        self.storage.adopt(frozen)
        optuna_private.cache_trial(self.study, frozen)
        return optuna.Trial(self.study, optuna_private.trial_id(frozen))

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
        self.current = trial.number
        try:
            finished = self._run(trial, objective)
        except Exception as e:
            if not isinstance(e, StoreFault) and self.study_gone():
                # Its trial went with the study: only the checkpoint is left, which a trial of the
                # new study with the same number must never resume.
                self.lineage_ended(optuna_private.cached_frozen_trial(trial))
                self.current = None
                raise StudyGone from e
            raise
        self.current = None  # left set when the store failed under the trial: it is still RUNNING
        return finished

    def study_gone(self) -> bool:
        """Whether the study was deleted or replaced since this worker loaded it (one query)."""
        return studies.identity(self.storage, self.study.study_name) != self.identity

    def _run(self, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> FrozenTrial | None:
        trial_id = optuna_private.trial_id(trial)
        value, state, reason = None, TrialState.COMPLETE, None
        with _Heartbeat(self.storage, trial_id, self.study_gone) as beat:
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
                if beat.fault is not None:
                    raise beat.fault from None
                return self._abandon(trial)
            except StoreFault:
                raise  # the store failed, not the trial: it stays RUNNING for the next worker to re-queue
            except Exception as e:  # noqa: BLE001 - any failure of one trial must not end the worker
                if is_transient(e) or is_disk_full(e):
                    raise
                state, reason = TrialState.FAIL, f"{type(e).__name__}: {e}"[:500]
        if self.study_gone():  # its id may now belong to a trial of the new study: tell nothing
            raise StudyGone
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
        warn(f"trial {trial.number} was finished elsewhere ({stored.state.name}: "
                     f"{stored.user_attrs.get('fail_reason', 'no reason given')}); dropped it, taking the next")
        return None

    def _tell(self, trial: optuna.Trial, value: float | list[float] | None, state: TrialState) -> FrozenTrial:
        """``study.tell`` (skipping a trial finished elsewhere) less its final re-read of the trial:
        the finished trial returned is Optuna's own copy of it with the state and values told."""
        state, values, _ = optuna_private.tell(self.study, trial, value if state == TrialState.COMPLETE else None,
                                               state)
        frozen = copy.deepcopy(optuna_private.cached_frozen_trial(trial))
        frozen.state, frozen.values, frozen.datetime_complete = state, values, datetime.datetime.now()  # local and naive, as Optuna 5 reads trial times
        return frozen


def _open_store(study_name: str, storage_url: str | None) -> tuple[WorkerStorage, Heartbeat]:
    """The worker's store, with the heartbeat settings stored in the study (every worker the same)."""
    plain = open_storage(storage_url, heartbeat=False)
    heartbeat = studies.heartbeat_of(plain, studies.study_id(plain, study_name))
    plain.engine.dispose()
    return open_storage(storage_url, heartbeat=heartbeat), heartbeat


def _data_text(data: Dataset) -> str:
    """``48,000 training and 12,000 validation samples (of 60,000), 10,000 test``."""
    pool = len(data.x)
    used = len(data.train_idx) + len(data.val_idx)
    return (f"{len(data.train_idx):,} training and {len(data.val_idx):,} validation samples"
            + (f" (of {pool:,})" if used < pool else "") + f", {len(data.x_test):,} test")


def _run_trials(worker: Worker, objective: Callable[[optuna.Trial], float], stop: StopSignal, *,
                n_trials: int | None, deadline: float | None, poll: float, done_line: str, metric: str,
                echo: Callable[[str], None], gate: control.Gate | None = None,
                budget_now: Callable[[], int | None] | None = None,
                budget_progress: BudgetProgress | None = None) -> int:
    """The worker's loop: fail dead workers' trials, start the next trial, run it, say how it ended;
    until the study's budget (or grid) is done, this worker's limit or deadline, a stop signal, or
    the study's stop (``gate``: ``hpo stop`` or a stopping rule). When the budget is used up,
    ``budget_now`` is asked once more (``hpo extend`` may have raised it). Returns how many
    trials this worker ran."""
    ran = 0
    try:
        while not stop.requested and (n_trials is None or ran < n_trials):
            if deadline is not None and time.monotonic() >= deadline:
                break
            closed = gate.closed() if gate is not None else None
            if closed is not None:
                echo(closed)
                break
            try:
                worker.fail_stale()
                trial = worker.next_trial()
            except Exception as e:
                if not isinstance(e, StoreFault) and worker.study_gone():
                    raise StudyGone from e
                raise
            if trial is None:
                if not worker.in_flight():
                    raised = budget_now() if budget_now is not None else None
                    if raised is not None and worker.budget is not None and raised > worker.budget:
                        worker.budget = raised
                        continue
                    echo(done_line)
                    break
                time.sleep(poll)  # the budget is taken but trials still run: one may come back
                continue
            frozen = worker.run(trial, objective)
            ran += 1
            if frozen is not None:
                lines = [retry_line(frozen), trial_line(worker.study, frozen, metric), params_line(frozen),
                         budget_progress.line() if budget_progress is not None else None]
                for line in filter(None, lines):
                    echo(line)
    except Interrupted:
        echo("interrupted: the running trial is re-queued")
        closed = gate.closed() if gate is not None else None
        if closed is not None:
            echo(closed)
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
) -> Summary | None:
    """Run trials of ``study_name`` on ``device`` and return the study's summary afterwards
    (``None`` when the study was deleted or replaced under the worker: it says so on one line,
    drops the trial it ran, with its checkpoint, and writes nothing to the new study).

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
        StoreUnreachable: the store stayed unreachable for longer than ``HPO_STORE_RETRY`` (at
            start or at any later call); a trial it was running stays RUNNING for the next worker.
        StoreFull: the store's disk is full (the same).
        SpecError: the study's model family is not installed here, or at another version (without
            ``allow_version_mismatch``): one line naming the package and version.
    """
    try:
        return _run_worker(study_name, storage_url=storage_url, device=device, n_trials=n_trials, timeout=timeout,
                           worker_index=worker_index, data_dir=data_dir, artifacts=artifacts, echo=echo,
                           progress=progress, allow_version_mismatch=allow_version_mismatch)
    except Exception as e:
        fault = store_fault(e, storage_url)
        if fault is None or fault is e:
            raise
        raise fault from e


def store_fault(error: Exception, storage_url: str | None) -> StoreFault | None:
    """``error`` as the store fault it is (naming the store), or ``None`` when it is none: a store
    unreachable past its retries, or a full disk, met in hpo's retries or in a call of Optuna's."""
    url = mask_url(resolve_url(storage_url))
    if isinstance(error, StoreFault):
        return error if url in str(error) else type(error)(f"{url}: {error}")
    if is_transient(error):
        return StoreUnreachable(f"the store {url} is unreachable: {mask_url(reason(error))}")
    if is_disk_full(error):
        return StoreFull(f"the store {url}: its disk is full: {mask_url(reason(error))}")
    return None


def _run_worker(study_name: str, *, storage_url: str | None, device: torch.device, n_trials: int | None,
                timeout: float | None, worker_index: int, data_dir: str | None, artifacts: str | None,
                echo: Callable[[str], None], progress: Progress | None,
                allow_version_mismatch: bool) -> Summary | None:
    storage, heartbeat = _open_store(study_name, storage_url)
    try:
        return _work(storage, heartbeat, study_name, storage_url=storage_url, device=device, n_trials=n_trials,
                     timeout=timeout, worker_index=worker_index, data_dir=data_dir, artifacts=artifacts, echo=echo,
                     progress=progress, allow_version_mismatch=allow_version_mismatch)
    finally:
        storage.remove_session()
        storage.engine.dispose()  # what it holds goes back however the worker ends


def _work(storage: WorkerStorage, heartbeat: Heartbeat, study_name: str, *, storage_url: str | None,
          device: torch.device, n_trials: int | None, timeout: float | None, worker_index: int,
          data_dir: str | None, artifacts: str | None, echo: Callable[[str], None],
          progress: Progress | None, allow_version_mismatch: bool) -> Summary | None:
    study_id = studies.study_id(storage, study_name)
    mismatches = provenance.mismatches(storage.get_study_system_attrs(study_id).get(provenance.ATTR),
                                       study=study_name, allow=allow_version_mismatch)
    for note in mismatches:
        echo(f"warning: {note} (--allow-version-mismatch: recorded in every trial)")
    label = f"{socket.gethostname()}:{os.getpid()}"
    number = claim(storage, study_id, WORKER_PREFIX, value=label)
    study, spec = open_study(study_name, storage, seed_offset=sampler_seed_offset(number, worker_index))
    # A grid study takes at most one budget place per point: each new trial gets a point no
    # other trial holds (hpo.search.grid), and the study ends when every point has run.
    grid = study.sampler if isinstance(study.sampler, StoreGridSampler) else None

    def budget_now() -> int | None:
        return trials_to_run(replace(spec, budget=replace(
            spec.budget, n_trials=control.n_trials_of(storage, study_id, spec.budget.n_trials))))

    budget = budget_now()
    gate = control.Gate(study, storage, study_id, directions=spec.directions, max_minutes=spec.budget.max_minutes,
                        patience=spec.budget.patience, target=spec.budget.target)
    checkpoints = CheckpointStore.for_spec(spec, storage_url=storage_url, artifacts=artifacts)
    worker = Worker(study, storage, study_id, budget, label, max_retry=int(env_seconds("HPO_MAX_RETRY", 3)),
                    new_attrs=grid.point_attrs if grid is not None else None, checkpoints=checkpoints)
    done_line = (f"study {study_name!r} has run every point of its grid ({grid_points(grid.size)})"
                 if grid is not None and budget == grid.size else
                 f"study {study_name!r} has used its budget of {budget} trials")
    timeouts = [t for t in (timeout, spec.budget.timeout) if t is not None]
    deadline = time.monotonic() + min(timeouts) if timeouts else None

    echo(f"worker {number} on {device} for study {study_name!r} ({spec.model}, {spec.metric}, "
         f"budget {budget} trials{f', a grid of {grid_points(grid.size)}' if grid else ''})")
    echo(f"  loading {data_title(spec)} ...")
    loading = time.perf_counter()
    data = on_device(load_dataset(spec, storage=storage, data_dir=data_dir), device)
    echo(f"  {_data_text(data)} on {device} in {time.perf_counter() - loading:.1f}s")
    start = time.perf_counter()
    with StopSignal() as stop:
        objective = make_objective(spec, data, should_stop=lambda: stop.requested or gate.stop_now(),
                                   is_abandoned=lambda trial_id: storage.finished_elsewhere(trial_id) is not None,
                                   progress=progress, checkpoints=checkpoints)
        if mismatches:
            objective = _noting(objective, "version_mismatch", "; ".join(mismatches))
        budget_progress = BudgetProgress(lambda: study_summary(storage, study_id), budget=budget_now)
        try:
            ran = _run_trials(worker, objective, stop, n_trials=n_trials, deadline=deadline,
                              poll=min(2.0, heartbeat.interval), done_line=done_line, metric="/".join(spec.metric_names), echo=echo,
                              gate=gate, budget_now=budget_now, budget_progress=budget_progress)
        except StudyGone:
            echo(f"study {study_name!r} was deleted or replaced; stopping")
            return None
        except Exception as e:
            fault = store_fault(e, storage_url)
            if fault is None:
                raise
            held = "" if worker.current is None else (
                f"; its trial {worker.current} stays RUNNING until the next worker re-queues it (after the "
                f"study's grace period of {heartbeat.grace} s), in its budget place")
            raise type(fault)(f"worker {number} stopped: {fault}{held}") from e
        summary = summarize(study)
    echo(f"worker {number} done in {time.perf_counter() - start:.1f}s ({ran} trials)")
    sys.stdout.flush()
    return summary
