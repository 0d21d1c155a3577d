"""The Optuna objective: sample a configuration, build the model, train it, report and prune.

The only place (with ``space``) that touches the trial: the trainer gets a plain callback.
"""

from __future__ import annotations

from typing import Callable

import optuna
import torch

from hpo import optuna_private
from hpo.dataset import Dataset
from hpo.devices import gpu_sharing
from hpo.models import build_model
from hpo.progress import QUIET, Progress
from hpo.space import suggest
from hpo.spec import StudySpec
from hpo.train import train


class Interrupted(KeyboardInterrupt):
    """The worker was asked to stop (SIGINT/SIGTERM): the running trial ends as FAIL and is re-queued."""


class Abandoned(Exception):
    """Another process finished the running trial (failed it as stale, or told it): stop training it."""


def trial_seed(spec: StudySpec, trial_number: int) -> int:
    return spec.seed * 1_000_003 + trial_number


def make_objective(spec: StudySpec, data: Dataset, *, should_stop: Callable[[], bool] | None = None,
                   is_abandoned: Callable[[int], bool] | None = None,
                   progress: Progress | None = None) -> Callable[[optuna.Trial], float]:
    """An objective over ``data`` (already on the worker's device) that returns ``spec.metric``.

    The metric is reported every ``spec.report_every`` epochs (step = epochs done), and the trial
    is pruned when the pruner says so.

    Args:
        should_stop: polled after every epoch; when it returns true the trial raises
            :class:`Interrupted` (its ``fail_reason`` is ``"interrupted"``).
        is_abandoned: polled after every epoch with the trial's store id; when it returns true
            the trial raises :class:`Abandoned`.
        progress: shows the running trial's epoch and latest metric value (default: nothing).
    """
    progress = progress or QUIET
    device = data.x.device
    device_name = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    sharing = gpu_sharing(device)  # mps | time-slice | exclusive, as the fleet says; None on the CPU

    def objective(trial: optuna.Trial) -> float:
        hp = suggest(trial, spec)
        trial_id = optuna_private.trial_id(trial)
        seed = trial_seed(spec, trial.number)
        torch.manual_seed(seed)

        def on_epoch(epoch: int, stats: dict[str, float]) -> None:
            done = epoch + 1
            bar.set_postfix_str(f"{spec.metric}={stats[spec.metric]:.4g}", refresh=False)
            bar.update()
            if should_stop is not None and should_stop():
                raise Interrupted(f"interrupted after {done} epochs")
            if is_abandoned is not None and is_abandoned(trial_id):
                raise Abandoned(f"finished elsewhere after {done} epochs")
            if done % spec.report_every:
                return
            trial.report(stats[spec.metric], done)
            if trial.should_prune():
                trial.set_user_attr("epochs_run", done)
                raise optuna.TrialPruned(f"pruned after {done} epochs")

        # A failure's reason (fail_reason) is recorded by the worker, which sees every exception.
        model = build_model(spec.model, hp, in_shape=data.in_shape, out_features=data.out_features).to(device)
        trial.set_user_attr("device", device_name)
        if sharing:
            trial.set_user_attr("gpu_sharing", sharing)
        with progress.bar(total=int(hp["epochs"]), desc=f"trial {trial.number}") as bar:
            result = train(model, data, hp, seed=seed, on_epoch=on_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("train_seconds", round(result.seconds, 3))
        trial.set_user_attr("train_path", result.path)
        if result.path_reason:
            trial.set_user_attr("train_path_reason", result.path_reason[:200])
        if result.stopped_early:
            trial.set_user_attr("stopped_early", True)
        return result.metrics[spec.metric]

    return objective
