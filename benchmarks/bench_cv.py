"""Cross-validated trials, measured (benchmarks/README.md, "Cross-validated trials").

    python benchmarks/bench_cv.py lenet|mlp [--device cpu] [--epochs 1] [--data-dir DIR]
    python benchmarks/bench_cv.py regression [--store DIR]

``lenet``: one 4-fold CV trial of the seed's LeNet-5 on Fashion-MNIST 10k (the shipped ``fmnist``
spec's search subset, split by ``hpo.search.cv`` as a ``cv: {folds: 4}`` study splits it): the 4
fold models trained stacked (``hpo.training.folds.train_stacked_folds``, what the objective runs)
against one after another (``train_sequential``), from the same initial weights and fold seeds,
in one run; model-epochs/s of each and the largest difference in the folds' validation accuracy.
``mlp``: the same for the regression seed's 5-fold grid network (``regression-cv``: 2 layers of
128, SELU then sigmoid; lr 1e-3, weight decay 1e-5, batch 25) on its 80 training points.

``regression``: the shipped ``regression-cv`` study (the seed's 5-fold CV grid) run in a temporary
SQLite store (or, with ``--store``, a run made before and stopped or finished), then ``hpo retrain``
(5 folds, test MSE of the ensemble mean and of each fold) of its best trial and of the seed's own
configuration (lr 4e-4, weight decay 1.5e-3, batch 50: a grid point, run as a one-point CV study
when the grid run did not reach it), beside the seed's figure (test MSE 0.38).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def paths(args) -> dict:
    """One CV trial's fold models trained stacked, then sequentially: ``lenet`` (4 folds of
    Fashion-MNIST 10k) or ``mlp`` (the regression seed's 5-fold grid network on its 80 points)."""
    import torch

    from hpo.bench.retrain import SEED_HP
    from hpo.data.sources import load_dataset
    from hpo.running.progress import QUIET
    from hpo.search.cv import cv_splits
    from hpo.spec.hyperparams import resolve
    from hpo.spec.schema import CvSpec, find_spec_file, load_spec_file
    from hpo.training.boundary import EpochBoundary
    from hpo.training.folds import device_folds, fold_models, train_sequential, train_stacked_folds

    device = torch.device(args.device)
    if args.what == "lenet":
        spec = load_spec_file(find_spec_file(str(REPO / "studies" / "fmnist.yaml")))
        spec = replace(spec, cv=CvSpec(folds=4), data=replace(spec.data, val_subset=None))
        hp = resolve({**spec.fixed, **SEED_HP, "epochs": args.epochs})
    else:
        spec = load_spec_file(find_spec_file(str(REPO / "studies" / "regression-cv.yaml")))
        hp = resolve({**spec.fixed, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 25, "epochs": args.epochs})
    k = spec.cv.folds
    data = load_dataset(spec, data_dir=args.data_dir).to(device)
    splits = cv_splits(spec, data)
    folds = device_folds(splits, base_seed=1, device=device)
    metric = spec.metric
    out = {"what": args.what, "device": str(device), "torch_threads": torch.get_num_threads(), "folds": k,
           "pool": int(sum(len(v) for _, v in splits)), "epochs": args.epochs, "hp": hp}
    accuracies, seconds_of = {}, {"stacked": [], "sequential": []}
    # Each path twice, alternating (stacked, sequential, stacked, sequential): the first run of a
    # process pays one-time costs, and the machine's load drifts; each path's faster run counts.
    for path in ("stacked", "sequential") * args.repeat:
        models = fold_models(spec.family_of(hp), hp, data, seeds=[f.seed for f in folds], device=device)
        bar = QUIET.bar(total=k * args.epochs, desc=path)
        boundary = EpochBoundary(should_stop=None, every_seconds=0, label=path)  # no checkpoints, never stops
        start = time.perf_counter()
        if path == "stacked":
            results = train_stacked_folds(models, data, hp, folds, on_epoch=lambda *a: None, checkpoint=None,
                                          boundary=boundary, saved=None, bar=bar).results
        else:
            results = train_sequential(models, data, hp, folds, on_epoch=lambda *a: None, on_fold=lambda *a: None,
                                       checkpoint=None, boundary=boundary, saved=None, bar=bar)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds_of[path].append(time.perf_counter() - start)
        seconds = min(seconds_of[path])
        model_epochs = sum(r.epochs_run for r in results)
        accuracies[path] = [r.metrics[metric] for r in results]
        out[path] = {"seconds": round(seconds, 2), "runs_seconds": [round(x, 2) for x in seconds_of[path]],
                     "model_epochs": model_epochs, "model_epochs_per_s": round(model_epochs / seconds, 4),
                     metric: accuracies[path]}
    out["stacked_over_sequential"] = round(out["stacked"]["model_epochs_per_s"] / out["sequential"]["model_epochs_per_s"], 3)
    out[f"max_fold_{metric}_difference"] = max(abs(a - b) for a, b in zip(accuracies["stacked"], accuracies["sequential"]))
    return out


SEED_POINT = {"lr": 4e-4, "weight_decay": 1.5e-3, "batch_size": 50}  # the seed's best; test MSE 0.38


def regression(args) -> dict:
    import optuna
    import torch
    import yaml

    from hpo.retrain.run import run_retrain
    from hpo.running.worker import run_worker
    from hpo.search.study import create_from_file
    from hpo.spec.schema import find_spec_file
    from hpo.store.storage import open_storage

    folder = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="bench-cv-"))
    url = f"sqlite:///{folder / 'hpo.db'}"
    start = time.perf_counter()
    if not args.store:  # a fresh store: run the grid (60 points x 5 folds); --store: a grid run before, stopped or not
        create_from_file(str(REPO / "studies" / "regression-cv.yaml"), storage_url=url)
        run_worker("regression-cv", storage_url=url, echo=lambda line: None)
    search_seconds = time.perf_counter() - start
    storage = open_storage(url, heartbeat=False)
    study = optuna.load_study(study_name="regression-cv", storage=storage)
    trials = [t for t in study.trials if t.value is not None]
    ranked = sorted(trials, key=lambda t: t.value)
    seed_trial = next((t for t in trials if all(abs(t.params[k] - v) < 1e-12 for k, v in SEED_POINT.items())), None)
    seed_study = "regression-cv"
    if seed_trial is None:  # not reached by the grid run: one CV trial of the seed's point, in its own study
        raw = yaml.safe_load(find_spec_file(str(REPO / "studies" / "regression-cv.yaml")).read_text())
        raw["name"], raw["space"] = "regression-cv-seed", {k: {"choice": [v]} for k, v in SEED_POINT.items()}
        raw["budget"] = {"n_trials": 1}
        raw["data"].update(train=str(REPO / "studies/data/regression_train.csv"),
                           test=str(REPO / "studies/data/regression_test.csv"))
        spec = folder / "regression-cv-seed.yaml"
        spec.write_text(yaml.safe_dump(raw))
        create_from_file(str(spec), storage_url=url, force=True)
        run_worker("regression-cv-seed", storage_url=url, echo=lambda line: None)
        seed_study = "regression-cv-seed"
        (seed_trial,) = optuna.load_study(study_name=seed_study, storage=storage).trials
    out = {"grid_points_done": len(trials), "grid_points": 60, "search_seconds": round(search_seconds, 1),
           "cv_path": trials[0].user_attrs["cv_path"], "model_epochs": sum(t.user_attrs["model_epochs"] for t in trials),
           "ranking": [[t.params["lr"], t.params["weight_decay"], t.params["batch_size"], round(t.value, 4),
                        round(t.user_attrs["cv_std"], 4)] for t in ranked]}
    for label, name, trial in (("best", "regression-cv", ranked[0]), ("seed_config", seed_study, seed_trial)):
        retrain_start = time.perf_counter()
        metrics = run_retrain(name, storage_url=url, artifacts=str(folder / "artifacts"), trial_number=trial.number,
                              device=torch.device("cpu")).metrics.to_dict()
        out[label] = {"retrain_seconds": round(time.perf_counter() - retrain_start, 2)}
        if label == "best":  # its worker kept its fold models: the same retrain without training them
            reuse_start = time.perf_counter()
            reused = run_retrain(name, storage_url=url, artifacts=str(folder / "artifacts"), trial_number=trial.number,
                                 device=torch.device("cpu"), reuse_cv=True).metrics.to_dict()
            out[label]["reuse_cv_seconds"] = round(time.perf_counter() - reuse_start, 2)
            out[label]["reuse_cv_test_mse_ensemble_mean"] = reused["ensemble"]["mean"]["test_metric"]
        out[label] |= {"params": trial.params, "cv_mean_best_mse": round(trial.value, 4),
                      "cv_std": round(trial.user_attrs["cv_std"], 4),
                      "test_mse_ensemble_mean": metrics["ensemble"]["mean"]["test_metric"],
                      "test_mse_per_fold": [f["test_metric"] for f in metrics["per_fold"]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lenet", "mlp", "regression"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="lenet, mlp: runs of each path (alternating)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--store", default=None, help="regression: a folder whose hpo.db holds a grid run already")
    args = parser.parse_args()
    out = regression(args) if args.what == "regression" else paths(args)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
