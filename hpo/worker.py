"""A worker: loads the study and its spec from the store, puts the data on its device once, and
runs trials until the study's budget (or this worker's own limit) is reached.

Any number of workers may run against one store; the budget counts trials of the whole study.
"""

from __future__ import annotations

import time
from typing import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.console import trial_line
from hpo.data import load_dataset
from hpo.objective import make_objective
from hpo.store import open_storage
from hpo.study import Summary, load, summarize

# Trials that use up budget. RUNNING and WAITING count too, or N workers overshoot it together.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)


def budget_used(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


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
) -> Summary:
    """Run trials of ``study_name`` on ``device`` and return the study's summary afterwards.

    Args:
        n_trials: at most this many trials from this worker (the spec's budget still holds).
        timeout: stop starting trials after this many seconds (the spec's timeout still holds).
        worker_index: offsets the sampler seed, so parallel workers do not draw the same points.
    """
    storage = open_storage(storage_url)
    study, spec = load(study_name, storage, seed_offset=worker_index)
    data = load_dataset(spec, data_dir=data_dir).to(device)
    if device.type == "cpu" and data.x[0].numel() < 1024:
        # Tiny models: thread hand-offs cost more than the arithmetic they would split.
        torch.set_num_threads(1)
    budget = spec.budget.n_trials
    timeouts = [t for t in (timeout, spec.budget.timeout) if t is not None]

    def stop_at_budget(study: optuna.Study, trial: FrozenTrial) -> None:
        if budget is not None and budget_used(study) >= budget:
            study.stop()

    def progress(study: optuna.Study, trial: FrozenTrial) -> None:
        echo(trial_line(study, trial, spec.metric))

    if budget is not None and budget_used(study) >= budget:
        echo(f"study {study_name!r} has used its budget of {budget} trials; nothing to do")
        return summarize(study)
    echo(f"worker on {device} for study {study_name!r} ({spec.model}, {spec.metric}, budget {budget} trials)")
    start = time.perf_counter()
    study.optimize(
        make_objective(spec, data),
        n_trials=n_trials,
        timeout=min(timeouts) if timeouts else None,
        catch=(Exception,),
        callbacks=[progress, stop_at_budget],
    )
    echo(f"worker done in {time.perf_counter() - start:.1f}s")
    return summarize(study)
