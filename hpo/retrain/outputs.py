"""What a k-fold retrain makes of its trained fold models: each fold's test scores and the best
fold, the learning curves, the ensembles (``hpo.retrain.ensemble``) and the files of ``hpo.retrain.results``'
contract, saved as artifacts of the study.

Shapes in ``predictions.npz``: ``fold_outputs`` is ``(K, N, C)``; for regression ``y_test``,
``ensemble_mean``, ``grid_*`` and ``x_test`` (raw x units, added for the fit plot) are 1-D, and the
grid is given only for one input feature; for classification ``y_test`` and ``majority_vote`` are
``(N,)`` class indices and ``soft_vote`` is ``(N, C)`` probabilities. ``metrics.json`` adds
``metric`` (the name behind ``test_metric``: mse or accuracy), ``fold_seeds``, ``split``,
``cuda_graph``, ``path_reason`` and ``device``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from hpo.data.dataset import Dataset, raw_input_stats
from hpo.export.json_text import strict_dumps
from hpo.nn import registry
from hpo.retrain import ensemble
from hpo.retrain.results import RetrainMetrics, RetrainRecord, save_retrain
from hpo.spec.schema import StudySpec
from hpo.store import optuna_private
from hpo.training.trainer import TrainResult, predict, score

GRID_POINTS = 500


def metric_name(task: str) -> str:
    """The metric behind ``val_metric`` and ``test_metric``: accuracy for classes, else mse."""
    return "accuracy" if task == "classification" else "mse"


def fold_scores(data: Dataset, outputs: torch.Tensor, results: list[TrainResult]) -> tuple[list[dict[str, Any]], int]:
    """Each fold's validation and test scores (test ``outputs`` ``(K, N, C)``), and the best fold:
    by validation metric, then validation loss."""
    metric = metric_name(data.task)
    per_fold = []
    for i, (result, out) in enumerate(zip(results, outputs)):
        test = score(data.task, out, data.y_test)
        per_fold.append({"fold": i, "val_loss": result.metrics["val_loss"],
                         "val_metric": result.metrics[f"val_{metric}"], "test_loss": test["loss"],
                         "test_metric": test[metric], "epochs_run": result.epochs_run})
    sign = 1 if data.task == "classification" else -1  # higher accuracy, lower mse is better
    best = max(range(len(per_fold)), key=lambda i: (sign * per_fold[i]["val_metric"], -per_fold[i]["val_loss"]))
    return per_fold, best


def curves(results: list[TrainResult], metric: str) -> list[dict[str, list[float]]]:
    """Each fold's learning curves, for ``curves.json``."""
    return [{"epoch": [h["epoch"] for h in r.history], "train_loss": [h["train_loss"] for h in r.history],
             "val_loss": [h["val_loss"] for h in r.history],
             "val_metric": [h[f"val_{metric}"] for h in r.history]} for r in results]


def ensembles(data: Dataset, outputs: torch.Tensor, best: int, metrics: dict, models) -> dict[str, np.ndarray]:
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


def write_files(folder: Path, spec: StudySpec, data: Dataset, hp: dict, metrics: RetrainMetrics, curves: list,
                arrays: dict, models) -> dict[str, Path]:
    """The files of ``hpo.retrain.results``' contract, written into ``folder``; returns them by name."""
    files = {"metrics.json": folder / "metrics.json", "curves.json": folder / "curves.json",
             "predictions.npz": folder / "predictions.npz", "model.json": folder / "model.json"}
    files["metrics.json"].write_text(strict_dumps(metrics.to_dict()))
    files["curves.json"].write_text(strict_dumps({"folds": curves}, indent=None))
    np.savez_compressed(files["predictions.npz"], **arrays)
    given = registry.entry(spec.family_of(hp)).provenance  # the code that trained these weights
    files["model.json"].write_text(strict_dumps({
        "family": spec.family_of(hp), "distribution": given["distribution"], "version": given["version"],
        "in_shape": list(data.in_shape), "out_features": data.out_features,
        "task": data.task, "hyperparams": hp, "normalization": data.normalization, "classes": list(data.classes),
        "input_stats": raw_input_stats(data),
    }))
    for i, model in enumerate(models):
        path = folder / f"fold_{i}.pt"
        torch.save({n: t.detach().cpu() for n, t in model.state_dict().items()}, path)
        files[path.name] = path
    return files


def save(study: optuna.Study, artifact_store, trial: optuna.trial.FrozenTrial, *, spec: StudySpec, data: Dataset,
         hp: dict, metrics: RetrainMetrics, curves: list, arrays: dict, models) -> RetrainRecord:
    """Write the files and save them as a new retrain record of the study (``hpo.retrain.results``)."""
    with tempfile.TemporaryDirectory(prefix="hpo-retrain-") as tmp:
        files = write_files(Path(tmp), spec, data, hp, metrics, curves, arrays, models)
        best = metrics.best_fold
        summary = {"metric": metrics.metric, "path": metrics.path,
                   "train_seconds": round(metrics.train_seconds, 3),
                   "best_fold": best, "best_fold_test_metric": metrics.per_fold[best]["test_metric"],
                   **{f"{name}_test_metric": e["test_metric"] for name, e in metrics.ensemble.items()}}
        return save_retrain(study, artifact_store, trial_number=trial.number, trial_id=optuna_private.trial_id(trial),
                            folds=metrics.folds, files=files, summary=summary)
