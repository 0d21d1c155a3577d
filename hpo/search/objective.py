"""The Optuna objective: sample a configuration, build the model, train it, report and prune.

The only place (with ``space``) that touches the trial: the trainer gets plain callbacks.

Checkpoints (``spec.checkpoint``, given a :class:`~hpo.training.checkpoint.CheckpointStore`): the trainer's
state is saved at an epoch boundary at most every ``every_seconds`` of training, and always when
the worker is told to stop, before the trial raises :class:`~hpo.training.boundary.Interrupted`
(the same rule as a retrain's: ``hpo.training.boundary``). A retry (a re-queued
copy of a trial whose worker died or was stopped) trains with its original's seed and resumes
from the original's latest checkpoint: it first reports the values the checkpoint's history holds
(exactly the steps reported up to its epoch, without asking the pruner again: it saw each once),
records ``resumed_from_epoch``, then trains on. The retry starts with no intermediate values
(``hpo.store.budget.fail_trial``'s default): values a dead worker reported after its last checkpoint
would otherwise come before the steps retrained, and the pruner would judge the wrong step.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import torch

from hpo.data.dataset import Dataset
from hpo.data.splits import folds_digest
from hpo.nn.models import build_model
from hpo.running.devices import gpu_sharing
from hpo.running.progress import QUIET, Progress
from hpo.search import objectives as outcomes
from hpo.search.cv import best_so_far, cv_splits, keep_fold_models, run_cv_trial
from hpo.search.pareto import PRUNED_BY_ATTR
from hpo.search.space import suggest
from hpo.spec.schema import StudySpec
from hpo.store import budget as budgets
from hpo.store import optuna_private
from hpo.training.boundary import EpochBoundary, Interrupted
from hpo.training.checkpoint import CheckpointStore, fingerprint, trial_key
from hpo.training.seeds import trial_seed
from hpo.training.state import TrainState
from hpo.training.trainer import CheckpointCallback, TrainResult, train


class Abandoned(Exception):
    """Another process finished the running trial (failed it as stale, or told it): stop training it."""


def lineage_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the original trial that ``trial`` re-runs, or its own for an original: the
    lineage's seed and checkpoint key."""
    original = budgets.retried_trial_number(trial)
    return trial.number if original is None else original


def make_objective(spec: StudySpec, data: Dataset, *, should_stop: Callable[[], bool] | None = None,
                   is_abandoned: Callable[[int], bool] | None = None,
                   progress: Progress | None = None,
                   checkpoints: CheckpointStore | None = None) -> Callable[[optuna.Trial], float | list[float]]:
    """An objective over ``data`` (already on the worker's device) that returns ``spec.metric``, or
    with several objectives their values in order (``hpo.search.objectives``).

    The metric is reported every ``spec.report_every`` epochs (step = epochs done), and the trial
    is pruned when the pruner says so (``pruned_by`` records it). A configuration that breaks a
    constraint known before training (``n_params``, ``latency_ms``) is pruned before its first epoch.

    Args:
        should_stop: polled at every epoch boundary where training goes on (a stop during the
            last epoch lets the trial finish); when it returns true the trial saves a checkpoint
            and raises :class:`Interrupted` (its ``fail_reason`` is ``"interrupted"``).
        is_abandoned: polled after every epoch with the trial's store id; when it returns true
            the trial raises :class:`Abandoned`.
        progress: shows the running trial's epoch and latest metric value (default: nothing).
        checkpoints: where trials save and resume their checkpoints (None, or ``checkpoint: false``
            in the spec: no checkpoints).
    """
    progress = progress or QUIET
    if not spec.checkpoint.enabled:
        checkpoints = None
    spec_fingerprint = fingerprint(spec.to_dict())
    device = data.x.device
    device_name = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    sharing = gpu_sharing(device)  # mps | time-slice | exclusive, as the fleet says; None on the CPU
    splits = cv_splits(spec, data) if spec.cv is not None else None  # the same folds for every trial
    kept: list[str] = []  # the checkpoint keys of the fold models this worker kept (at most one)

    def objective(trial: optuna.Trial) -> float | list[float]:
        hp = suggest(trial, spec)
        lineage = lineage_number(optuna_private.cached_frozen_trial(trial))
        seed = trial_seed(spec.seed, lineage)  # a retry is the same trial: its original's seed
        torch.manual_seed(seed)
        meta = {"study": spec.name, "trial": lineage, "params": dict(trial.params), "spec": spec_fingerprint}
        trial.set_user_attr("device", device_name)
        if sharing:
            trial.set_user_attr("gpu_sharing", sharing)
        if splits is not None:
            return _cv_objective(trial, hp, lineage, seed, meta)
        resume = _resume(checkpoints, trial, lineage, meta)
        if resume is not None:
            _report_resumed(trial, resume, spec)
        # A failure's reason (fail_reason) is recorded by the worker, which sees every exception.
        model = build_model(spec.family_of(hp), hp, in_shape=data.in_shape, out_features=data.out_features).to(device)
        measures = outcomes.measure_model(trial, spec, model, data, device_name)
        outcomes.check_before_training(trial, spec, measures)
        with progress.bar(total=int(hp["epochs"]), desc=f"trial {trial.number}",
                          initial=resume.epoch if resume is not None else 0) as bar:
            on_epoch = _epoch_reporter(trial, spec, bar, is_abandoned)
            at_boundary = _epoch_boundary(trial, lineage, meta, checkpoints=checkpoints, should_stop=should_stop, spec=spec)
            try:
                result = train(model, data, hp, seed=seed, on_epoch=on_epoch, resume=resume, checkpoint=at_boundary)
            except Interrupted as e:
                trial.set_user_attr("epochs_run", e.epochs)  # what this run trained: epochs - resumed_from_epoch
                raise
        _record_result(trial, result)
        return outcomes.outcome(trial, spec, result, measures)

    def _cv_objective(trial: optuna.Trial, hp: dict, lineage: int, seed: int, meta: dict) -> float:
        """A cross-validated trial (``hpo.search.cv``): K fold models, scored by their mean."""
        saved = _resume_payload(checkpoints, trial, lineage, meta, "cv")
        trial_id = optuna_private.trial_id(trial)
        # n_params, as every trial records (spec checks keep constraints and objectives out of CV studies)
        outcomes.measure_model(trial, spec, build_model(spec.family_of(hp), hp, in_shape=data.in_shape,
                                                        out_features=data.out_features), data, device_name)

        def check_abandoned(done: int) -> None:
            if is_abandoned is not None and is_abandoned(trial_id):
                raise Abandoned(f"finished elsewhere after {done} epochs")

        boundary = EpochBoundary(should_stop=should_stop, every_seconds=spec.checkpoint.every_seconds,
                                 label=f"trial {trial.number}", **({"warn": checkpoints.warn} if checkpoints else {}))

        def write(payload: dict, *, where: str, epoch: int) -> None:
            checkpoints.save(trial_key(lineage), payload, meta={**meta, "epoch": epoch, "at": where, "writer": trial.number})

        with progress.bar(total=spec.cv.folds * int(hp["epochs"]), desc=f"trial {trial.number} ({spec.cv.folds} folds)") as bar:
            outcome = run_cv_trial(trial, spec, data, hp, splits=splits, seed=seed, boundary=boundary,
                                   write=None if checkpoints is None else write, saved=saved,
                                   check_abandoned=check_abandoned, bar=bar)
        if checkpoints is not None and best_so_far(trial, outcome.value, spec.direction):
            _keep(trial, hp, outcome)
        return outcome.value

    def _keep(trial: optuna.Trial, hp: dict, outcome) -> None:
        """Keep the fold models of the study's best CV trial so far (``hpo retrain --reuse-cv``)."""
        try:
            key = keep_fold_models(checkpoints, trial, spec, hp, outcome, digest=folds_digest(splits))
        except OSError as e:
            checkpoints.warn(f"the fold models of trial {trial.number} were not kept ({e.strerror or e}); "
                             f"hpo retrain trains them again")
            return
        for older in kept:
            checkpoints.delete(older)
        kept[:] = [key]

    return objective


def _report_resumed(trial: optuna.Trial, resume: TrainState, spec: StudySpec) -> None:
    """Report the steps the pruner saw before the checkpoint once more, for the record (without
    asking the pruner again), and record where the retry resumed."""
    for h in resume.history:
        done = int(h["epoch"]) + 1
        if done % spec.report_every == 0:
            outcomes.report(trial, spec, h[spec.metric], done)
    trial.set_user_attr("resumed_from_epoch", resume.epoch)


def _epoch_reporter(trial: optuna.Trial, spec: StudySpec, bar,
                    is_abandoned: Callable[[int], bool] | None) -> Callable[[int, dict[str, float]], None]:
    """The trainer's per-epoch callback: shows the epoch, stops a trial finished elsewhere, reports
    the metric every ``spec.report_every`` epochs and prunes when the pruner says so."""
    trial_id = optuna_private.trial_id(trial)

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        done = epoch + 1
        bar.set_postfix_str(f"{spec.metric}={stats[spec.metric]:.4g}", refresh=False)
        bar.update()
        if is_abandoned is not None and is_abandoned(trial_id):
            raise Abandoned(f"finished elsewhere after {done} epochs")
        if done % spec.report_every:
            return
        outcomes.report(trial, spec, stats[spec.metric], done)
        reason = outcomes.prune_reason(trial, spec)
        if reason is not None:
            trial.set_user_attr(PRUNED_BY_ATTR, reason)
            trial.set_user_attr("epochs_run", done)
            raise optuna.TrialPruned(f"pruned after {done} epochs")

    return on_epoch


def _epoch_boundary(trial: optuna.Trial, lineage: int, meta: dict, *, checkpoints: CheckpointStore | None,
                    should_stop: Callable[[], bool] | None, spec: StudySpec) -> CheckpointCallback:
    """The trainer's checkpoint callback (``hpo.training.boundary``): the lineage's checkpoint when
    due or told to stop, then :class:`Interrupted` if told to."""
    boundary = EpochBoundary(should_stop=should_stop, every_seconds=spec.checkpoint.every_seconds,
                             label=f"trial {trial.number}", **({"warn": checkpoints.warn} if checkpoints else {}))

    def at_boundary(done: int, state: Callable[[], TrainState]) -> None:
        write = None if checkpoints is None else lambda: checkpoints.save(
            trial_key(lineage), {"train": state().to_dict()}, meta={**meta, "epoch": done, "writer": trial.number})
        boundary.check(f"epoch {done}", epochs=done, write=write)

    return at_boundary


def _record_result(trial: optuna.Trial, result: TrainResult) -> None:
    trial.set_user_attr("epochs_run", result.epochs_run)
    trial.set_user_attr("train_seconds", round(result.seconds, 3))
    trial.set_user_attr("train_path", result.path)
    if result.path_reason:
        trial.set_user_attr("train_path_reason", result.path_reason[:200])
    if result.stopped_early:
        trial.set_user_attr("stopped_early", True)


def _resume(checkpoints: CheckpointStore | None, trial: optuna.Trial, lineage: int, meta: dict) -> TrainState | None:
    """The trainer state a retry resumes from: its lineage's checkpoint, when there is a sound
    one written for this study, trial and parameters (anything else is ignored with a warning)."""
    saved = _resume_payload(checkpoints, trial, lineage, meta, "train")
    if saved is None:
        return None
    try:
        return TrainState.from_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        checkpoints.warn(f"checkpoint {checkpoints.path(trial_key(lineage))} ignored: {e}; training starts over")
        return None


def _resume_payload(checkpoints: CheckpointStore | None, trial: optuna.Trial, lineage: int, meta: dict,
                    part: str) -> dict | None:
    """The ``part`` of the lineage's checkpoint a retry resumes from (``train``: one model's,
    ``cv``: a cross-validated trial's folds), when there is a sound one written for this study,
    trial and parameters."""
    if checkpoints is None or lineage == trial.number:
        return None
    found = checkpoints.read(trial_key(lineage), expect=meta)
    if found is None:
        return None
    if part not in found[0]:
        checkpoints.warn(f"checkpoint {checkpoints.path(trial_key(lineage))} ignored: it holds no {part!r} state; "
                         f"training starts over")
        return None
    return found[0][part]
