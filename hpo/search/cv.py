"""Cross-validated trials (``cv:`` in the spec): every trial trains K fold models of its
configuration on the same seeded folds of the training pool and is scored by their mean.

Folds: ``hpo.data.splits.kfold_indices`` of the training pool (every training row, or the
``data.train_subset`` rows the study searches on), seeded by the study's seed. Every trial of a
study sees the same folds (so the Wilcoxon pruner pairs fold i of a trial with fold i of the best
one, and ``hpo retrain`` with as many folds of the same pool sees them too); fold model i is
initialised and batch-ordered from ``hpo.training.seeds.fold_seed(trial seed, i)``, as the retrain does.

What a trial reports (its intermediate values):
- median, hyperband, none: the mean curve, step = epochs done (every ``report_every``): the mean
  over the folds of each fold's metric at that epoch (``score: mean``) or of each fold's best value
  so far (``mean_best``); a fold stopped early counts with its last value. The pruner judges it as
  it judges one model's curve. This needs the K models in lockstep, i.e. trained stacked; trained
  one after another (``path: sequential``) the curve exists only when the last fold ends: it is
  reported then, and never pruned.
- wilcoxon: step = fold index, value = that fold's score, the pruner asked after every fold
  (Optuna's ``WilcoxonPruner`` pairs steps across trials as problem instances: an epoch curve
  would pair epoch 3 of one trial with epoch 3 of another, which is not what its test assumes).
  Folds then train one after another: trained together they all end at once and nothing is left
  to save. The mean curve is kept in the ``cv_curve`` user attr instead.

The trial's value is the mean of its folds' scores (``mean``: each fold model's final validation
value, the best epoch's weights under early stopping; ``mean_best``: each fold's best value over
its epochs). User attrs: ``cv_fold_values``, ``cv_std`` (their population standard deviation),
``cv_folds``, ``cv_score``, ``cv_path`` (stacked | sequential) and ``cv_path_reason``,
``cv_split`` (KFold | StratifiedKFold), ``cv_fold_seed`` (the seed of the fold indices),
``cv_pool`` (rows split), ``cv_folds_sha256`` (``hpo.data.splits.folds_digest``),
``cv_fold_epochs``, ``model_epochs``.

Checkpoints: the payload of ``hpo.training.folds`` (all K models' state, stacked; or the finished
folds and the one in training, sequential) under ``"cv"``; a retry resumes it bit for bit on the CPU.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna
import torch

from hpo.data.dataset import Dataset
from hpo.data.splits import folds_digest, kfold_indices, split_indices, splitter_name
from hpo.errors import HpoError, SpecError
from hpo.nn import registry
from hpo.spec.schema import StudySpec
from hpo.training.boundary import EpochBoundary, Interrupted
from hpo.training.checkpoint import fingerprint
from hpo.training.folds import device_folds, fold_models, train_sequential, train_stacked_folds
from hpo.training.stacked import stack_problem
from hpo.training.state import cpu_copy
from hpo.training.trainer import TrainResult


def cv_pool(spec: StudySpec, data: Dataset) -> np.ndarray:
    """The rows the folds split: every training row, or the ``train_subset`` rows searched on."""
    if spec.data.train_subset is None:
        return np.arange(len(data.x))
    return np.sort(data.train_idx.cpu().numpy())


def cv_splits(spec: StudySpec, data: Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """The study's K folds ``(train rows, validation rows)``, the same for every trial.

    Raises:
        HpoError: too few rows, or rows of some class, for ``cv.folds`` folds (names ``cv.folds``).
    """
    labels = data.y.cpu().numpy() if data.task == "classification" else None
    return kfold_indices(cv_pool(spec, data), folds=spec.cv.folds, seed=spec.seed, labels=labels, field="cv.folds")


def check_folds_fit(spec: StudySpec, *, source: str) -> None:
    """At create-study, for a CSV study (its rows at hand): the folds can be made.

    Raises:
        SpecError: one line, when there are too few rows, or rows of some class, for ``cv.folds``.
    """
    from hpo.data.sources import csv_arrays

    _, y = csv_arrays(spec.data, "train")
    labels = y.astype(np.int64) if spec.task == "classification" else None
    pool = np.arange(len(y))
    if spec.data.train_subset is not None:  # the rows the loader keeps (hpo.data.sources)
        pool = split_indices(len(y), val_fraction=spec.data.val_fraction, seed=spec.seed, labels=labels,
                             train_subset=spec.data.train_subset)[0]
    try:
        kfold_indices(pool, folds=spec.cv.folds, seed=spec.seed, labels=labels, field="cv.folds")
    except HpoError as e:
        raise SpecError(f"{source}: {e}") from e


def choose_path(spec: StudySpec, models: list[torch.nn.Module], family: str,
                device: torch.device) -> tuple[bool, str]:
    """Whether a trial's fold models (of model ``family``, on ``device``) train stacked, and why.

    ``cv.path: auto``: stacked wherever the models stack: on a GPU the K models take one step
    each; on the CPU too, as only K models in lockstep give the pruner the folds' mean curve as
    they train (the CPU speeds of both paths: benchmarks/README.md, "Cross-validated trials")."""
    problem = stack_problem(models)
    if problem is None and not registry.family(family).stackable:
        problem = f"model family {family!r} declares its modules unstackable (Family.stackable=False)"
    if spec.pruner.kind == "wilcoxon":
        return False, "the wilcoxon pruner prunes between folds"
    if spec.cv.path == "sequential":
        return False, "cv.path: sequential"
    if problem is not None:
        return False, problem
    if spec.cv.path == "stacked":
        return True, "cv.path: stacked"
    if device.type == "cuda":
        return True, "CUDA device"
    return True, "the folds' mean curve needs them in lockstep"


class _Curves:
    """Each fold's metric per epoch, and the folds' scores and mean curve made of them."""

    def __init__(self, k: int, metric: str, maximize: bool, score: str):
        self.values: list[list[float]] = [[] for _ in range(k)]
        self.metric, self.maximize, self.score = metric, maximize, score

    def _best(self, values: list[float]) -> float:
        return max(values) if self.maximize else min(values)

    def fold_at(self, f: int, epoch: int) -> float:
        v = self.values[f][:epoch + 1]
        return self._best(v) if self.score == "mean_best" else v[-1]

    def mean_at(self, epoch: int) -> float:
        return sum(self.fold_at(f, epoch) for f in range(len(self.values))) / len(self.values)

    def fold_score(self, f: int, result: TrainResult) -> float:
        if self.score == "mean_best":
            return self._best([h[self.metric] for h in result.history])
        return float(result.metrics[self.metric])


class FoldCheckpoint:
    """The checkpoint the fold trainers write (``hpo.training.folds.FoldCheckpoint``): their payload
    under ``"cv"``, written by ``write`` with the progress made (``epoch``: epochs of all folds,
    stacked; model-epochs, sequential)."""

    def __init__(self, write: Callable[..., None], progress: Callable[[], int]):
        self.write, self.progress = write, progress

    def save(self, payload: dict[str, Any], *, where: str) -> None:
        self.write({"cv": payload}, where=where, epoch=self.progress())


@dataclass
class CvOutcome:
    value: float
    results: list[TrainResult]
    models: list[torch.nn.Module]  # the K fold models as trained (the best epoch's weights under early stopping)
    fold_seeds: list[int]


def run_cv_trial(trial: optuna.Trial, spec: StudySpec, data: Dataset, hp: dict[str, Any], *,
                 splits: list[tuple[np.ndarray, np.ndarray]], seed: int, boundary: EpochBoundary,
                 write: Callable[..., None] | None, saved: dict[str, Any] | None, check_abandoned: Callable[[int], None], bar) -> CvOutcome:
    """Train the trial's K fold models, report and prune as the module says, record the folds.

    Args:
        splits: ``cv_splits`` of the study.
        seed: the trial's seed (fold i's is ``hpo.training.seeds.fold_seed(seed, i)``).
        boundary: the trial's epoch boundary (``hpo.training.boundary``: checkpoint when due, stop
            when told to).
        write: ``write(payload, *, where, epoch)`` saves the trial's checkpoint now (may raise
            OSError); None: no checkpoints.
        saved: a checkpoint's ``"cv"`` payload to resume from (its path must be this trial's).
        check_abandoned: called with the epochs done; raises when the trial was finished elsewhere.
        bar: the progress bar (K x epochs).

    Raises:
        optuna.TrialPruned: when the pruner says so.
        Interrupted: when ``boundary`` was told to stop (``epochs_run`` records the progress made).
    """
    device, k = data.x.device, len(splits)
    folds = device_folds(splits, base_seed=seed, device=device)
    models = fold_models(spec.family_of(hp), hp, data, seeds=[f.seed for f in folds], device=device)
    stacked, reason = choose_path(spec, models, spec.family_of(hp), device)
    _record_folds(trial, spec, data, splits, stacked=stacked, reason=reason)
    maximize = spec.direction == "maximize"
    curves = _Curves(k, spec.metric, maximize, spec.cv.score)
    wilcoxon = spec.pruner.kind == "wilcoxon"
    done = {"epochs": 0, "model_epochs": 0}

    def on_epoch(fold: int, epoch: int, stats: dict[str, float]) -> None:
        curves.values[fold].append(stats[spec.metric])
        done["model_epochs"] += 1
        bar.set_postfix_str(f"fold {fold} {spec.metric}={stats[spec.metric]:.4g}", refresh=False)
        bar.update()
        if not stacked:
            check_abandoned(done["model_epochs"])

    def on_epoch_end(epoch: int) -> None:  # stacked: every fold has had this epoch
        done["epochs"] = epoch + 1
        check_abandoned(epoch + 1)
        if (epoch + 1) % spec.report_every:
            return
        trial.report(curves.mean_at(epoch), epoch + 1)
        if trial.should_prune():
            trial.set_user_attr("epochs_run", epoch + 1)
            trial.set_user_attr("model_epochs", done["model_epochs"])
            raise optuna.TrialPruned(f"pruned after {epoch + 1} epochs of {k} folds")

    def on_fold(i: int, result: TrainResult) -> None:  # sequential: fold i has ended
        if not wilcoxon:
            return
        trial.report(curves.fold_score(i, result), i)
        if i + 1 < k and trial.should_prune():
            trial.set_user_attr("epochs_run", max(len(c) for c in curves.values))
            trial.set_user_attr("model_epochs", done["model_epochs"])
            raise optuna.TrialPruned(f"pruned after {i + 1} of {k} folds")

    def progress() -> int:
        return done["epochs"] if stacked else done["model_epochs"]

    checkpoint = None if write is None else FoldCheckpoint(write, progress)
    if saved is not None:
        _resumed(trial, spec, saved, curves, stacked=stacked, wilcoxon=wilcoxon, done=done)
    start = time.perf_counter()
    try:
        if stacked:
            outcome = train_stacked_folds(models, data, hp, folds, on_epoch=on_epoch, checkpoint=checkpoint,
                                          boundary=boundary, saved=saved, bar=bar, on_epoch_end=on_epoch_end)
            results, path = outcome.results, ("cuda_graph" if outcome.cuda_graph else "eager")
        else:
            results = train_sequential(models, data, hp, folds, on_epoch=on_epoch, on_fold=on_fold,
                                       checkpoint=checkpoint, boundary=boundary, saved=saved, bar=bar)
    except Interrupted:
        trial.set_user_attr("epochs_run", progress())  # what this run trained: epochs_run - resumed_from_epoch
        raise
    if not stacked:
        path = results[-1].path
        if not wilcoxon:  # the mean curve, complete only now: reported for the record
            longest = max(r.epochs_run for r in results)
            curves.values = [[h[spec.metric] for h in r.history] for r in results]
            for epoch in range(longest):
                if (epoch + 1) % spec.report_every == 0:
                    trial.report(curves.mean_at(epoch), epoch + 1)
    scores = [curves.fold_score(f, r) for f, r in enumerate(results)]
    value = sum(scores) / k
    _record_result(trial, results, scores, path=path, seconds=time.perf_counter() - start)
    if wilcoxon:
        curves.values = [[h[spec.metric] for h in r.history] for r in results]
        longest = max(r.epochs_run for r in results)
        trial.set_user_attr("cv_curve", [round(curves.mean_at(e), 6) for e in range(longest)])
    return CvOutcome(value=value, results=results, models=models, fold_seeds=[f.seed for f in folds])


KEPT_PREFIX = "cv-models-"


def kept_key(trial_number: int) -> str:
    """The checkpoint key of trial ``trial_number``'s kept fold models."""
    return f"{KEPT_PREFIX}{trial_number}"


def kept_meta(spec: StudySpec, trial_number: int) -> dict[str, Any]:
    """What a kept file of trial ``trial_number`` must say it is (``CheckpointStore.read``'s ``expect``)."""
    return {"kind": "cv-models", "study": spec.name, "trial": trial_number}


def best_so_far(trial: optuna.Trial, value: float, direction: str) -> bool:
    """Whether ``value`` is at least as good as every other complete trial's of the study."""
    others = [t.value for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.number != trial.number and t.value is not None]
    if not others:
        return True
    return value >= max(others) if direction == "maximize" else value <= min(others)


def keep_fold_models(store, trial: optuna.Trial, spec: StudySpec, hp: dict[str, Any], outcome: CvOutcome,
                     digest: str) -> str:
    """Save a finished CV trial's K fold models and their results in the study's checkpoint folder
    (``store``: ``hpo.training.checkpoint.CheckpointStore``), for ``hpo retrain --reuse-cv``; returns
    the key. A worker keeps those of a trial that ends as the study's best so far, and deletes the
    ones it kept before (so a study holds about one set per worker, not one per trial).

    Raises:
        OSError: the file system refused the write.
    """
    payload = {"models": [cpu_copy(m.state_dict()) for m in outcome.models],
               "results": [asdict(r) for r in outcome.results]}
    meta = {**kept_meta(spec, trial.number), "params": dict(trial.params), "folds_sha256": digest,
            "epochs": int(hp["epochs"]), "fold_seeds": outcome.fold_seeds, "spec": fingerprint(spec.to_dict())}
    store.save(kept_key(trial.number), payload, meta=meta)
    return kept_key(trial.number)


def _resumed(trial: optuna.Trial, spec: StudySpec, saved: dict[str, Any], curves: _Curves, *, stacked: bool,
             wilcoxon: bool, done: dict[str, int]) -> None:
    """Report the steps the pruner saw before the checkpoint once more (without asking it again),
    and record where the retry resumed."""
    if stacked:
        histories = [r["history"] for r in saved["stacked"]["results"]]
        curves.values = [[h[spec.metric] for h in hist] for hist in histories]
        done["epochs"] = int(saved["stacked"]["epoch"])
        done["model_epochs"] = sum(len(h) for h in histories)
        for epoch in range(done["epochs"]):
            if (epoch + 1) % spec.report_every == 0:
                trial.report(curves.mean_at(epoch), epoch + 1)
        trial.set_user_attr("resumed_from_epoch", done["epochs"])
        return
    finished = [TrainResult(**d["result"]) for d in saved["done"]]
    for i, result in enumerate(finished):
        curves.values[i] = [h[spec.metric] for h in result.history]
        if wilcoxon:
            trial.report(curves.fold_score(i, result), i)
    current = saved["current"]
    done["model_epochs"] = sum(r.epochs_run for r in finished) + (int(current["epoch"]) if current else 0)
    if current:
        curves.values[len(finished)] = [h[spec.metric] for h in current["history"]]
    trial.set_user_attr("resumed_from_epoch", done["model_epochs"])


def _record_folds(trial: optuna.Trial, spec: StudySpec, data: Dataset, splits, *, stacked: bool, reason: str) -> None:
    trial.set_user_attr("cv_folds", len(splits))
    trial.set_user_attr("cv_score", spec.cv.score)
    trial.set_user_attr("cv_path", "stacked" if stacked else "sequential")
    trial.set_user_attr("cv_path_reason", reason[:200])
    trial.set_user_attr("cv_split", splitter_name(data.task))
    trial.set_user_attr("cv_fold_seed", spec.seed)
    trial.set_user_attr("cv_pool", int(sum(len(va) for _, va in splits)))
    trial.set_user_attr("cv_folds_sha256", folds_digest(splits))


def _record_result(trial: optuna.Trial, results: list[TrainResult], scores: list[float], *, path: str,
                   seconds: float) -> None:
    trial.set_user_attr("cv_fold_values", [float(s) for s in scores])
    trial.set_user_attr("cv_std", float(statistics.pstdev(scores)) if all(map(math.isfinite, scores)) else None)
    trial.set_user_attr("cv_fold_epochs", [r.epochs_run for r in results])
    trial.set_user_attr("epochs_run", max(r.epochs_run for r in results))
    trial.set_user_attr("model_epochs", sum(r.epochs_run for r in results))
    trial.set_user_attr("train_seconds", round(seconds, 3))
    trial.set_user_attr("train_path", path)
    if any(r.stopped_early for r in results):
        trial.set_user_attr("stopped_early", True)
