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

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from optuna.trial import TrialState

from hpo import ensemble
from hpo.data import load_dataset
from hpo.dataset import Dataset
from hpo.errors import HpoError
from hpo.models import build_model
from hpo.objective import trial_seed
from hpo.progress import QUIET, Progress
from hpo.results import RetrainRecord, save_retrain
from hpo.space import hyperparams_from_params
from hpo.spec import StudySpec
from hpo.stacked import Fold, stack_problem, train_stacked
from hpo import optuna_private
from hpo.store import open_artifact_store, open_storage
from hpo.study import load
from hpo.train import predict, score, train

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
        echo: where progress lines go (default: nowhere).
        on_metrics: called with the contents of ``metrics.json`` once the retrain is saved.
        progress: shows the folds x epochs done, the latest fold's validation value and the time
            left (default: nothing).

    Returns:
        The new record (``hpo.results.load_retrain`` reads it back); a re-run makes a new one.

    Raises:
        HpoError: no such study, no complete trial, bad fold count, or training failed.
    """
    echo = echo or (lambda line: None)
    storage = open_storage(storage_url, heartbeat=False)
    study, spec = load(study_name, storage)
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
    echo(f"retrain of trial #{trial.number} of {study_name!r}: {k} folds, {hp['epochs']} epochs, "
         f"{'stacked' if use_stacked else 'sequential'} on {device}")

    curves: list[dict[str, list]] = [{"epoch": [], "train_loss": [], "val_loss": [], "val_metric": []} for _ in range(k)]
    metric_name = "accuracy" if data.task == "classification" else "mse"

    progress = progress or QUIET
    epochs = int(hp["epochs"])
    bar = progress.bar(total=k * epochs, desc=f"retrain ({k} folds x {epochs} epochs)")

    def record(fold: int, epoch: int, stats: dict[str, float]) -> None:
        c = curves[fold]
        c["epoch"].append(epoch)
        c["train_loss"].append(stats["train_loss"])
        c["val_loss"].append(stats["val_loss"])
        c["val_metric"].append(stats[f"val_{metric_name}"])
        bar.set_postfix_str(f"fold {fold} val_{metric_name}={stats[f'val_{metric_name}']:.4g}", refresh=False)
        bar.update()

    start = time.perf_counter()
    cuda_graph, notes = False, []
    with bar:
        if use_stacked:
            outcome = train_stacked(models, data, hp, folds=fold_list, on_epoch=record)
            results, cuda_graph, notes = outcome.results, outcome.cuda_graph, outcome.notes
        else:
            results = []
            for i, (model, f) in enumerate(zip(models, fold_list)):
                results.append(train(model, data, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx,
                                     on_epoch=lambda epoch, stats, i=i: record(i, epoch, stats)))
                bar.total -= epochs - results[-1].epochs_run  # early stopping: the time left shrinks
                with progress.printing():
                    echo(f"  fold {i}: {results[-1].epochs_run} epochs, val {metric_name} "
                         f"{results[-1].metrics[f'val_{metric_name}']:.4g}")
            cuda_graph = all(r.path == "cuda_graph" for r in results)
            if device.type == "cuda":
                notes = list(dict.fromkeys(f"eager path: {r.path_reason}" for r in results if r.path_reason))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for note in notes:
        echo(f"  note: {note}")

    outputs = torch.stack([predict(m, data.x_test) for m in models])  # (K, N, C)
    per_fold = []
    for i, (result, out) in enumerate(zip(results, outputs)):
        test = score(data.task, out, data.y_test)
        per_fold.append({"fold": i, "val_loss": result.metrics["val_loss"],
                         "val_metric": result.metrics[f"val_{metric_name}"], "test_loss": test["loss"],
                         "test_metric": test[metric_name], "epochs_run": result.epochs_run})
    sign = 1 if data.task == "classification" else -1  # higher accuracy, lower mse is better
    best = max(range(k), key=lambda i: (sign * per_fold[i]["val_metric"], -per_fold[i]["val_loss"]))

    epochs_total = sum(r.epochs_run for r in results)
    metrics: dict[str, Any] = {
        "task": data.task, "folds": k, "seed": spec.seed, "trial_number": trial.number,
        "params": dict(trial.params), "hyperparams": hp, "path": "stacked" if use_stacked else "sequential",
        "path_reason": reason, "cuda_graph": cuda_graph, "device": str(device),
        "train_seconds": seconds, "model_epochs_per_s": epochs_total / seconds if seconds > 0 else None,
        "per_fold": per_fold, "best_fold": best, "metric": metric_name, "classes": list(data.classes),
        "fold_seeds": [f.seed for f in fold_list],
        "split": "StratifiedKFold" if data.task == "classification" else "KFold",
    }
    arrays = _ensembles(data, outputs, best, metrics, models)

    with tempfile.TemporaryDirectory(prefix="hpo-retrain-") as tmp:
        files = _write_files(Path(tmp), spec, data, hp, metrics, curves, arrays, models)
        summary = {"metric": metric_name, "path": metrics["path"], "train_seconds": round(seconds, 3),
                   "best_fold": best, "best_fold_test_metric": per_fold[best]["test_metric"],
                   **{f"{name}_test_metric": e["test_metric"] for name, e in metrics["ensemble"].items()}}
        saved = save_retrain(study, artifact_store, trial_number=trial.number, trial_id=optuna_private.trial_id(trial),
                             folds=k, files=files, summary=summary)
    if on_metrics:
        on_metrics(metrics)
    return saved


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
