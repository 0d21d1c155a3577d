"""The k-fold retrain stage: the chosen trial's hyperparameters, K models on K folds of the whole
training pool, their test predictions and ensembles, saved as artifacts of the study.

The files follow the contract in ``hpo.results``. Shapes in ``predictions.npz``: ``fold_outputs``
is ``(K, N, C)``; for regression ``y_test``, ``ensemble_mean``, ``grid_*`` and ``x_test`` (raw x
units, added for the fit plot) are 1-D, and the grid is given only for one input feature; for
classification ``y_test`` and ``majority_vote`` are ``(N,)`` class indices and ``soft_vote`` is
``(N, C)`` probabilities. ``metrics.json`` adds ``metric`` (the name behind ``test_metric``:
mse or accuracy), ``fold_seeds``, ``split``, ``cuda_graph``, ``path_reason`` and ``device``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from optuna.trial import TrialState

from hpo import ensemble
from hpo.checkpoint import RETRAIN_KEY, CheckpointStore, fingerprint
from hpo.data import load_dataset
from hpo.dataset import Dataset
from hpo.errors import HpoError
from hpo.models import build_model
from hpo.objective import trial_seed
from hpo.progress import QUIET, Progress
from hpo.results import RetrainRecord, save_retrain
from hpo.retrain_checkpoint import RetrainCheckpoint
from hpo.space import hyperparams_from_params
from hpo.spec import StudySpec
from hpo.stacked import Fold, stack_problem, train_stacked
from hpo import optuna_private
from hpo.store import open_artifact_store, open_storage
from hpo.study import load
from hpo.train import TrainResult, predict, score, train
from hpo.train_state import TrainState, cpu_copy, load_model_in_place, rng_state, set_rng_state

GRID_POINTS = 500


def split_folds(data: Dataset, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds of the whole training pool ``data.x``: stratified by class for classification.

    Raises:
        HpoError: when there are too few samples (or samples of some class) for K folds.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(data.x)
    if folds < 2:
        raise HpoError(f"--folds: need at least 2 folds, got {folds}")
    if folds > n:
        raise HpoError(f"--folds: {folds} folds need at least {folds} samples; the training pool has {n}")
    pool = np.arange(n)
    if data.task == "classification":
        labels = data.y.cpu().numpy()
        present = np.bincount(labels)
        smallest = int(present[present > 0].min())
        if folds > smallest:
            raise HpoError(f"--folds: {folds} stratified folds need at least {folds} samples of every class; "
                           f"the rarest class has {smallest}")
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, labels)
    else:
        splits = KFold(n_splits=folds, shuffle=True, random_state=seed).split(pool)
    return [(np.sort(tr), np.sort(va)) for tr, va in splits]


def _choose_trial(study, trial_number: int | None):
    trials = study.get_trials(deepcopy=False)
    name = study.study_name
    if trial_number is None:
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise HpoError(f"study {name!r} has no complete trial; run hpo worker --study {name} first")
        return study.best_trial
    if not 0 <= trial_number < len(trials):
        raise HpoError(f"--trial: study {name!r} has no trial {trial_number}; trials are 0..{len(trials) - 1}")
    trial = trials[trial_number]
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise HpoError(f"--trial: trial {trial_number} is {trial.state.name}; choose a COMPLETE or PRUNED trial")
    return trial


def run_retrain(
    study_name: str,
    *,
    storage_url: str | None = None,
    artifacts: str | None = None,
    folds: int | None = None,
    trial_number: int | None = None,
    device: torch.device,
    data_dir: str | None = None,
    stacked: bool | None = None,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> RetrainRecord:
    """Retrain a trial's configuration on K folds and save the results as artifacts of the study.

    Args:
        folds: K (default: the spec's ``retrain.folds``).
        trial_number: the trial to retrain (default: the best complete trial).
        stacked: train the K models together (True), one after another (False), or decide (None:
            stacked on a CUDA device whenever the models can be stacked, else sequential).
        resume: continue the study's latest unfinished retrain from its checkpoint (its trial,
            folds and path; finished folds are not trained again). Without it, a new retrain
            replaces any unfinished one. Checkpoints follow the spec's ``checkpoint`` settings
            (``hpo.retrain_checkpoint``); SIGINT/SIGTERM checkpoint and stop at the next epoch.
        echo: where progress lines go (default: nowhere).
        on_metrics: called with the contents of ``metrics.json`` once the retrain is saved.
        progress: shows the folds x epochs done, the latest fold's validation value and the time
            left (default: nothing).

    Returns:
        The new record (``hpo.results.load_retrain`` reads it back); a re-run makes a new one.

    Raises:
        HpoError: no such study, no complete trial, bad fold count, training failed, or
            ``resume`` without an unfinished retrain (or with --trial/--folds/--stacked that differ
            from it).
        RetrainInterrupted: told to stop (SIGINT/SIGTERM); the checkpoint is saved.
    """
    echo = echo or (lambda line: None)
    storage = open_storage(storage_url, heartbeat=False)
    study, spec = load(study_name, storage)
    store = CheckpointStore.for_study(study_name, storage_url=storage_url, artifacts=artifacts) \
        if spec.checkpoint.enabled else None
    if resume:
        asked = RetrainCheckpoint.unfinished(store, study_name)
        for flag, given, saved in (("--trial", trial_number, asked["trial"]), ("--folds", folds, asked["folds"]),
                                   ("--stacked/--sequential", stacked, asked["path"] == "stacked")):
            if given is not None and given != saved:
                raise HpoError(f"{flag}: got {given}, but the unfinished retrain has {saved}; leave it out to resume")
        trial_number, folds, stacked = asked["trial"], asked["folds"], asked["path"] == "stacked"
    trial = _choose_trial(study, trial_number)
    k = int(folds or spec.retrain.folds)
    hp = hyperparams_from_params(spec, trial.params)
    if spec.retrain.epochs:
        hp["epochs"] = spec.retrain.epochs
    artifact_store = open_artifact_store(storage_url, artifacts)

    full = replace(spec.data, train_subset=None, val_subset=None)
    data = load_dataset(spec.with_data(full), storage=storage, data_dir=data_dir).to(device)
    if device.type == "cpu" and data.x[0].numel() < 1024:
        torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they split
    splits = split_folds(data, folds=k, seed=spec.seed)
    base_seed = trial_seed(spec, trial.number)
    fold_list = [Fold(train_idx=torch.from_numpy(tr).to(device), val_idx=torch.from_numpy(va).to(device),
                      seed=base_seed * 100 + i) for i, (tr, va) in enumerate(splits)]
    models = fold_models(spec, hp, data, seeds=[f.seed for f in fold_list], device=device)

    problem = stack_problem(models)
    if stacked and problem:
        raise HpoError(f"cannot train stacked: {problem}")
    if stacked is not None:
        use_stacked, reason = stacked, "requested"
    elif problem is not None:
        use_stacked, reason = False, problem
    else:
        # On the CPU both paths run at about the same speed; the plain one is easier to follow.
        use_stacked = device.type == "cuda"
        reason = "CUDA device" if use_stacked else "CPU device"
    path = "stacked" if use_stacked else "sequential"
    echo(f"retrain of trial #{trial.number} of {study_name!r}: {k} folds, {hp['epochs']} epochs, "
         f"{path} on {device}")

    ckpt = None
    if store is not None:
        ckpt = RetrainCheckpoint(store, {"kind": "retrain", "study": study_name, "trial": trial.number, "folds": k,
                                         "path": path, "params": dict(trial.params), "hyperparams": hp,
                                         "spec": fingerprint(spec.to_dict())},
                                 every_seconds=spec.checkpoint.every_seconds)
    saved, resumed_from = None, None
    if resume and ckpt is not None:
        saved = ckpt.load()
        resumed_from = store.meta(RETRAIN_KEY)["at"] if saved is not None else None
        echo(f"  resuming from its checkpoint ({resumed_from})" if saved is not None
             else "  its checkpoint could not be used: starting over")
    elif ckpt is not None:
        ckpt.discard()  # a new retrain replaces an unfinished one: --resume continues the latest

    metric_name = "accuracy" if data.task == "classification" else "mse"
    progress = progress or QUIET
    epochs = int(hp["epochs"])
    bar = progress.bar(total=k * epochs, desc=f"retrain ({k} folds x {epochs} epochs)")

    def record(fold: int, epoch: int, stats: dict[str, float]) -> None:
        bar.set_postfix_str(f"fold {fold} val_{metric_name}={stats[f'val_{metric_name}']:.4g}", refresh=False)
        bar.update()

    def fold_done(i: int, result: TrainResult) -> None:
        bar.total -= epochs - result.epochs_run  # early stopping: the time left shrinks
        with progress.printing():
            echo(f"  fold {i}: {result.epochs_run} epochs, val {metric_name} "
                 f"{result.metrics[f'val_{metric_name}']:.4g}")

    start = time.perf_counter()
    cuda_graph, notes = False, []
    with bar, (ckpt if ckpt is not None else contextlib.nullcontext()):
        if use_stacked:
            resume_state = saved["stacked"] if saved is not None else None
            if resume_state is not None:
                bar.update(sum(len(r["history"]) for r in resume_state["results"]))
            boundary = None if ckpt is None else (
                lambda done, state: ckpt.boundary(lambda: {"stacked": state()}, where=f"epoch {done} of all folds"))
            outcome = train_stacked(models, data, hp, folds=fold_list, on_epoch=record, resume=resume_state,
                                    checkpoint=boundary)
            results, cuda_graph, notes = outcome.results, outcome.cuda_graph, outcome.notes
        else:
            results = train_sequential(models, data, hp, fold_list, on_epoch=record, on_fold=fold_done,
                                       checkpoint=ckpt, saved=saved, bar=bar)
            cuda_graph = all(r.path == "cuda_graph" for r in results)
            if device.type == "cuda":
                notes = list(dict.fromkeys(f"eager path: {r.path_reason}" for r in results if r.path_reason))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for note in notes:
        echo(f"  note: {note}")
    curves = [{"epoch": [h["epoch"] for h in r.history], "train_loss": [h["train_loss"] for h in r.history],
               "val_loss": [h["val_loss"] for h in r.history],
               "val_metric": [h[f"val_{metric_name}"] for h in r.history]} for r in results]

    outputs = torch.stack([predict(m, data.x_test) for m in models])  # (K, N, C)
    per_fold = []
    for i, (result, out) in enumerate(zip(results, outputs)):
        test = score(data.task, out, data.y_test)
        per_fold.append({"fold": i, "val_loss": result.metrics["val_loss"],
                         "val_metric": result.metrics[f"val_{metric_name}"], "test_loss": test["loss"],
                         "test_metric": test[metric_name], "epochs_run": result.epochs_run})
    sign = 1 if data.task == "classification" else -1  # higher accuracy, lower mse is better
    best = max(range(k), key=lambda i: (sign * per_fold[i]["val_metric"], -per_fold[i]["val_loss"]))

    epochs_total = sum(r.epochs_run - r.resumed_from_epoch for r in results)  # trained by this run
    metrics: dict[str, Any] = {
        "task": data.task, "folds": k, "seed": spec.seed, "trial_number": trial.number,
        "params": dict(trial.params), "hyperparams": hp, "path": "stacked" if use_stacked else "sequential",
        "path_reason": reason, "cuda_graph": cuda_graph, "device": str(device),
        "train_seconds": seconds, "model_epochs_per_s": epochs_total / seconds if seconds > 0 else None,
        "per_fold": per_fold, "best_fold": best, "metric": metric_name, "classes": list(data.classes),
        "fold_seeds": [f.seed for f in fold_list],
        "split": "StratifiedKFold" if data.task == "classification" else "KFold",
        "resumed_from": resumed_from,  # where a resumed retrain's checkpoint was taken, else None
    }
    arrays = _ensembles(data, outputs, best, metrics, models)

    with tempfile.TemporaryDirectory(prefix="hpo-retrain-") as tmp:
        files = _write_files(Path(tmp), spec, data, hp, metrics, curves, arrays, models)
        summary = {"metric": metric_name, "path": metrics["path"], "train_seconds": round(seconds, 3),
                   "best_fold": best, "best_fold_test_metric": per_fold[best]["test_metric"],
                   **{f"{name}_test_metric": e["test_metric"] for name, e in metrics["ensemble"].items()}}
        retrain_record = save_retrain(study, artifact_store, trial_number=trial.number,
                                      trial_id=optuna_private.trial_id(trial), folds=k, files=files, summary=summary)
    if ckpt is not None:
        ckpt.discard()  # saved: nothing left to resume
    if on_metrics:
        on_metrics(metrics)
    return retrain_record


def train_sequential(models: list[torch.nn.Module], data: Dataset, hp: dict[str, Any], folds: list[Fold], *,
                     on_epoch: Callable[[int, int, dict[str, float]], None],
                     on_fold: Callable[[int, TrainResult], None], checkpoint: RetrainCheckpoint | None,
                     saved: dict[str, Any] | None, bar) -> list[TrainResult]:
    """Train fold model i on fold i, one after another, checkpointing as ``hpo.retrain_checkpoint``
    says; with ``saved`` (a checkpoint's payload), finished folds get their weights back and the
    fold in training resumes."""
    device = data.x.device
    done: list[dict[str, Any]] = list(saved["done"]) if saved is not None else []
    results = [TrainResult(**{**d["result"], "resumed_from_epoch": d["result"]["epochs_run"]}) for d in done]
    for model, d in zip(models, done):
        load_model_in_place(model, d["model"])
    current = TrainState.from_dict(saved["current"]) if saved is not None and saved["current"] else None
    if saved is not None and current is None:
        set_rng_state(saved["rng"], device)  # where the next fold starts
    bar.update(sum(r.epochs_run for r in results) + (current.epoch if current else 0))
    bar.total -= sum(int(hp["epochs"]) - r.epochs_run for r in results)
    first = len(done)
    for i in range(first, len(models)):
        f = folds[i]

        def at_boundary(epochs_done: int, state, i=i) -> None:
            checkpoint.boundary(lambda: {"done": done, "rng": None, "current": state().to_dict()},
                                where=f"fold {i}, epoch {epochs_done}")

        result = train(models[i], data, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx,
                       on_epoch=lambda epoch, stats, i=i: on_epoch(i, epoch, stats),
                       resume=current if i == first else None,
                       checkpoint=at_boundary if checkpoint is not None else None)
        results.append(result)
        on_fold(i, result)
        done.append({"model": cpu_copy(models[i].state_dict()), "result": asdict(result)})
        if checkpoint is not None and i + 1 < len(models):  # a finished fold is never trained again
            checkpoint.save({"done": done, "rng": rng_state(device), "current": None}, where=f"fold {i} done")
    return results


def fold_models(spec: StudySpec, hp: dict[str, Any], data: Dataset, *, seeds: list[int],
                device: torch.device) -> list[torch.nn.Module]:
    """One freshly initialised model per fold, each from its own seed."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(spec.model, hp, in_shape=data.in_shape, out_features=data.out_features).to(device))
    return models


def _ensembles(data: Dataset, outputs: torch.Tensor, best: int, metrics: dict, models) -> dict[str, np.ndarray]:
    """Fill ``metrics`` with the ensembles' scores and confusion matrices; return the npz arrays."""
    from sklearn.metrics import confusion_matrix

    y = data.y_test
    arrays: dict[str, np.ndarray] = {"fold_outputs": outputs.cpu().numpy()}
    if data.task == "classification":
        votes = ensemble.majority_vote(outputs, tie_breaker=best)
        soft = ensemble.soft_vote(outputs)
        soft_loss = torch.nn.functional.nll_loss(soft.clamp_min(1e-12).log(), y).item()
        metrics["ensemble"] = {
            "majority_vote": {"test_metric": (votes == y).float().mean().item()},
            "soft_vote": {"test_loss": soft_loss, "test_metric": (soft.argmax(1) == y).float().mean().item()},
        }
        labels = list(range(data.out_features))
        y_np = y.cpu().numpy()
        metrics["confusion"] = {
            "best": confusion_matrix(y_np, outputs[best].argmax(1).cpu().numpy(), labels=labels).tolist(),
            "majority_vote": confusion_matrix(y_np, votes.cpu().numpy(), labels=labels).tolist(),
        }
        arrays.update(y_test=y_np, majority_vote=votes.cpu().numpy(), soft_vote=soft.cpu().numpy())
        return arrays
    mean = ensemble.mean(outputs)
    test = score(data.task, mean, y)
    metrics["ensemble"] = {"mean": {"test_loss": test["loss"], "test_metric": test["mse"]}}
    metrics["confusion"] = {}
    arrays.update(y_test=y.cpu().numpy().reshape(-1), ensemble_mean=mean.cpu().numpy().reshape(-1))
    norm = data.normalization
    if data.in_shape == (1,) and norm:
        m, s = float(norm["mean"][0]), float(norm["std"][0])
        raw = torch.cat([data.x, data.x_test]).reshape(-1) * s + m
        grid_x = torch.linspace(raw.min().item(), raw.max().item(), GRID_POINTS, device=data.x.device)
        grid_in = ((grid_x - m) / s)[:, None]
        grid = torch.stack([predict(model, grid_in) for model in models]).reshape(len(models), -1)
        arrays.update(grid_x=grid_x.cpu().numpy(), grid_best=grid[best].cpu().numpy(),
                      grid_mean=ensemble.mean(grid).cpu().numpy(),
                      x_test=(data.x_test.reshape(-1) * s + m).cpu().numpy())
    return arrays


def _write_files(folder: Path, spec: StudySpec, data: Dataset, hp: dict, metrics: dict, curves: list,
                 arrays: dict, models) -> dict[str, Path]:
    files = {"metrics.json": folder / "metrics.json", "curves.json": folder / "curves.json",
             "predictions.npz": folder / "predictions.npz", "model.json": folder / "model.json"}
    files["metrics.json"].write_text(json.dumps(metrics, indent=2))
    files["curves.json"].write_text(json.dumps({"folds": curves}))
    np.savez_compressed(files["predictions.npz"], **arrays)
    files["model.json"].write_text(json.dumps({
        "family": spec.model, "in_shape": list(data.in_shape), "out_features": data.out_features,
        "task": data.task, "hyperparams": hp, "normalization": data.normalization, "classes": list(data.classes),
    }, indent=2))
    for i, model in enumerate(models):
        path = folder / f"fold_{i}.pt"
        torch.save({n: t.detach().cpu() for n, t in model.state_dict().items()}, path)
        files[path.name] = path
    return files
