"""The k-fold retrain: folds, artifacts read back, fold models that reproduce the recorded metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hpo.data.sources import load_dataset
from hpo.data.tables import embed_csv
from hpo.errors import HpoError
from hpo.nn.models import rebuild
from hpo.retrain import ensemble
from hpo.retrain.results import fetch_files, list_retrains, load_retrain, read_json
from hpo.retrain.run import run_retrain
from hpo.running.worker import run_worker
from hpo.search.study import create, open_study
from hpo.spec.schema import load_spec_file
from hpo.store import optuna_private
from hpo.store.artifacts import open_artifact_store
from hpo.store.storage import open_storage
from hpo.training.trainer import score
from tests.conftest import run_hpo, small_regression_spec

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs_spec(tmp_path: Path) -> Path:
    """A tiny 3-class CSV study (classes 60/30/15: unbalanced on purpose) that trains in a second."""
    rng = np.random.default_rng(0)

    def table(counts):
        rows = []
        for label, count in enumerate(counts):
            centre = np.array([[0, 0], [3, 0], [0, 3]][label])
            for a, b in centre + rng.normal(size=(count, 2)):
                rows.append(f"{a:.5f},{b:.5f},{label}")
        return "a,b,label\n" + "\n".join(rows) + "\n"

    (tmp_path / "train.csv").write_text(table([60, 30, 15]))
    (tmp_path / "test.csv").write_text(table([20, 20, 20]))
    spec = {
        "name": "blobs", "direction": "maximize", "metric": "val_accuracy", "seed": 3,
        "data": {"source": "csv", "task": "classification", "train": str(tmp_path / "train.csv"),
                 "test": str(tmp_path / "test.csv"), "features": ["a", "b"], "target": "label", "val_fraction": 0.25},
        "model": "mlp",
        "space": {"lr": {"float": [3e-3, 1e-2], "log": True}},
        "fixed": {"n_layers": 1, "width": 16, "epochs": 12, "batch_size": 16, "optimizer": "Adam"},
        "report_every": 4, "sampler": {"kind": "random"}, "pruner": {"kind": "none"},
        "budget": {"n_trials": 2}, "retrain": {"folds": 3},
    }
    path = tmp_path / "blobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def make_study(spec_path: Path, store_url: str, n_trials: int) -> None:
    create(embed_csv(load_spec_file(spec_path)), open_storage(store_url, heartbeat=False))
    if n_trials:
        run_worker(load_spec_file(spec_path).name, storage_url=store_url, n_trials=n_trials, echo=lambda line: None)


def read_back(store_url: str, artifacts: Path, name: str, retrain_id: str | None = None):
    study, spec = open_study(name, open_storage(store_url, heartbeat=False))
    record = load_retrain(study, retrain_id)
    folder = fetch_files(open_artifact_store(store_url, str(artifacts)), record)
    return study, spec, record, folder


def rebuilt_models(folder: Path, folds: int) -> list[torch.nn.Module]:
    info = read_json(folder, "model.json")
    return [rebuild(info, folder / f"fold_{i}.pt") for i in range(folds)]


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "sequential"])
def test_classification_retrain_artifacts_reproduce_the_metrics(tmp_path, store_url, stacked):
    make_study(blobs_spec(tmp_path), store_url, n_trials=2)
    artifacts = tmp_path / "artifacts"
    record = run_retrain("blobs", storage_url=store_url, artifacts=str(artifacts), device=CPU, stacked=stacked)
    study, spec, loaded, folder = read_back(store_url, artifacts, "blobs")
    assert loaded == record and record.folds == 3 and record.trial_number == study.best_trial.number
    assert set(record.files) == {"metrics.json", "curves.json", "predictions.npz", "model.json",
                                 "fold_0.pt", "fold_1.pt", "fold_2.pt"}
    trial_id = optuna_private.trial_id(study.best_trial)  # each file is linked to the retrained trial in optuna-dashboard
    attrs = optuna_private.study_storage(study).get_study_system_attrs(optuna_private.study_id(study))
    assert {f"dashboard:artifacts:{trial_id}:{a}" for a in record.files.values()} <= set(attrs)

    metrics = read_json(folder, "metrics.json")
    assert metrics["path"] == ("stacked" if stacked else "sequential")
    assert metrics["task"] == "classification" and metrics["folds"] == 3 and metrics["metric"] == "accuracy"
    assert metrics["classes"] == ["0", "1", "2"] and len(metrics["fold_seeds"]) == 3
    curves = read_json(folder, "curves.json")["folds"]
    assert [len(c["epoch"]) for c in curves] == [f["epochs_run"] for f in metrics["per_fold"]] == [12, 12, 12]

    data = load_dataset(spec)
    preds = np.load(folder / "predictions.npz")
    outputs = []
    for i, model in enumerate(rebuilt_models(folder, 3)):
        with torch.no_grad():
            out = model(data.x_test)
        outputs.append(out)
        test = score("classification", out, data.y_test)
        assert test["accuracy"] == pytest.approx(metrics["per_fold"][i]["test_metric"], abs=1e-6)
        assert test["loss"] == pytest.approx(metrics["per_fold"][i]["test_loss"], rel=1e-5)
    outputs = torch.stack(outputs)
    assert np.allclose(preds["fold_outputs"], outputs.numpy(), atol=1e-5)
    assert preds["y_test"].tolist() == data.y_test.tolist()

    best = metrics["best_fold"]
    vote = ensemble.majority_vote(outputs, tie_breaker=best)
    assert preds["majority_vote"].tolist() == vote.tolist()
    assert np.allclose(preds["soft_vote"], torch.softmax(outputs, -1).mean(0).numpy(), atol=1e-6)
    accuracy = (vote == data.y_test).float().mean().item()
    assert metrics["ensemble"]["majority_vote"]["test_metric"] == pytest.approx(accuracy)
    assert metrics["ensemble"]["soft_vote"]["test_metric"] > 0.8  # separable blobs
    confusion = np.array(metrics["confusion"]["majority_vote"])
    assert confusion.shape == (3, 3) and confusion.sum() == 60
    assert np.trace(confusion) == round(accuracy * 60)
    assert np.array(metrics["confusion"]["best"]).sum(axis=1).tolist() == [20, 20, 20]


def test_regression_ensemble_mean_and_grid(tmp_path, store_url):
    make_study(small_regression_spec(tmp_path, budget={"n_trials": 3}), store_url, n_trials=3)
    artifacts = tmp_path / "artifacts"
    run_retrain("regression", storage_url=store_url, artifacts=str(artifacts), folds=3, device=CPU, stacked=True)
    _, spec, record, folder = read_back(store_url, artifacts, "regression")
    preds = np.load(folder / "predictions.npz")
    metrics = read_json(folder, "metrics.json")
    assert preds["fold_outputs"].shape == (3, 100, 1)
    assert np.allclose(preds["ensemble_mean"], preds["fold_outputs"].mean(axis=0)[:, 0], atol=1e-6)
    mse = float(np.mean((preds["ensemble_mean"] - preds["y_test"]) ** 2))
    assert metrics["ensemble"]["mean"]["test_metric"] == pytest.approx(mse, rel=1e-5)
    assert record.summary["mean_test_metric"] == pytest.approx(mse, rel=1e-5)

    # The grid spans the raw x range of training and test data; predictions there match the models.
    data = load_dataset(spec)
    raw_x = np.concatenate([data.x.numpy(), data.x_test.numpy()])[:, 0] * data.normalization["std"][0] \
        + data.normalization["mean"][0]
    assert preds["grid_x"][0] == pytest.approx(raw_x.min(), abs=1e-4)
    assert preds["grid_x"][-1] == pytest.approx(raw_x.max(), abs=1e-4)
    assert np.allclose(preds["x_test"], raw_x[len(data.x):], atol=1e-4)
    grid_in = torch.from_numpy((preds["grid_x"] - data.normalization["mean"][0]) / data.normalization["std"][0])
    models = rebuilt_models(folder, 3)
    with torch.no_grad():
        grid = torch.stack([m(grid_in.float()[:, None])[:, 0] for m in models]).numpy()
    assert np.allclose(preds["grid_mean"], grid.mean(0), atol=1e-4)
    assert np.allclose(preds["grid_best"], grid[metrics["best_fold"]], atol=1e-4)


def test_sequential_retrain_records_the_path_its_folds_took(tmp_path, store_url, monkeypatch):
    import hpo.training.folds

    make_study(blobs_spec(tmp_path), store_url, n_trials=1)
    artifacts = tmp_path / "artifacts"
    record = run_retrain("blobs", storage_url=store_url, artifacts=str(artifacts), folds=2, device=CPU, stacked=False)
    assert record.metrics.cuda_graph is False  # eager on the CPU

    real_train = hpo.training.folds.train

    def graphed(*args, **kwargs):  # what train() reports after a CUDA-graph run
        result = real_train(*args, **kwargs)
        result.path, result.path_reason = "cuda_graph", ""
        return result

    monkeypatch.setattr(hpo.training.folds, "train", graphed)
    record = run_retrain("blobs", storage_url=store_url, artifacts=str(artifacts), folds=2, device=CPU, stacked=False)
    assert record.metrics.cuda_graph is True
    # the record's metrics are the saved metrics.json, key for key (the seven keys it once left undocumented too)
    saved = read_json(fetch_files(open_artifact_store(store_url, str(artifacts)), record), "metrics.json")
    assert saved == json.loads(json.dumps(record.metrics.to_dict()))
    assert {"path_reason", "cuda_graph", "device", "metric", "fold_seeds", "split", "resumed_from"} <= set(saved)


def test_rerun_makes_a_new_record_and_keeps_the_old_one(tmp_path, store_url):
    make_study(blobs_spec(tmp_path), store_url, n_trials=2)
    artifacts = tmp_path / "artifacts"
    first = run_retrain("blobs", storage_url=store_url, artifacts=str(artifacts), folds=2, device=CPU)
    second = run_retrain("blobs", storage_url=store_url, artifacts=str(artifacts), folds=2, trial_number=0, device=CPU)
    study, _, latest, _ = read_back(store_url, artifacts, "blobs")
    assert latest.id == second.id != first.id and second.trial_number == 0
    # (sorted by creation second, then id: two retrains within one second may list in either order)
    assert {r.id for r in list_retrains(study)} == {first.id, second.id}
    old = fetch_files(open_artifact_store(store_url, str(artifacts)), load_retrain(study, first.id))
    assert read_json(old, "metrics.json")["folds"] == 2
    some = fetch_files(open_artifact_store(store_url, str(artifacts)), second, tmp_path / "some",
                       names=["model.json", "fold_1.pt", "no-such-file"])
    assert sorted(p.name for p in some.iterdir()) == ["fold_1.pt", "model.json"]
    assert set(first.files.values()).isdisjoint(second.files.values())


def test_bad_trial_choices_are_clear_errors(tmp_path, store_url):
    make_study(blobs_spec(tmp_path), store_url, n_trials=0)
    with pytest.raises(HpoError, match="no complete trial; run: hpo worker --study blobs$"):
        run_retrain("blobs", storage_url=store_url, artifacts=str(tmp_path / "a"), device=CPU)
    run_worker("blobs", storage_url=store_url, n_trials=1, echo=lambda line: None)
    with pytest.raises(HpoError, match=r"^--folds: got 1000; allowed: an integer in \[2, 100\] \(HPO_LIMITS=retrain.folds=N"):
        run_retrain("blobs", storage_url=store_url, artifacts=str(tmp_path / "a"), folds=1000, device=CPU)
    with pytest.raises(HpoError, match="no trial 5; trials are 0..0"):
        run_retrain("blobs", storage_url=store_url, artifacts=str(tmp_path / "a"), trial_number=5, device=CPU)
    study, _ = open_study("blobs", open_storage(store_url, heartbeat=False))
    assert not any(k.startswith("hpo_retrain") for k in study.user_attrs)


@pytest.mark.slow
def test_cli_retrain_exits_2_without_a_complete_trial_then_prints_the_table(tmp_path, cli_env):
    artifacts = tmp_path / "a"
    run_hpo("create-study", str(blobs_spec(tmp_path)), env=cli_env, check=0)
    proc = run_hpo("retrain", "--study", "blobs", "--artifacts", str(artifacts), env=cli_env, check=2)
    assert proc.stderr.strip() == "hpo: error: study 'blobs' has no complete trial; run: hpo worker --study blobs"
    run_hpo("worker", "--study", "blobs", "--n-trials", "1", env=cli_env, check=0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_hpo("retrain", "--study", "blobs", "--folds", "2", "--stacked", "--artifacts", str(artifacts),
                   env={**cli_env, "TMPDIR": str(scratch)}, check=0)
    for text in ("fold 0", "fold 1", "folds: mean ± std", "majority vote", "soft vote", "trained 2 models (stacked)",
                 "saved retrain"):
        assert text in proc.stdout
    assert len([p for p in artifacts.rglob("*") if p.is_file()]) == 6  # 4 files + 2 fold weights
    assert not list(scratch.glob("hpo-retrain-*"))  # the table comes from the run itself: nothing downloaded, nothing left


def test_results_table_labels_the_ensemble_and_the_folds_mean_and_drops_repeated_columns():
    from hpo.console import retrain_table as results_table

    def fold(i, epochs, val, test, val_loss=None, test_loss=None):
        return {"fold": i, "epochs_run": epochs, "val_metric": val, "test_metric": test,
                "val_loss": val if val_loss is None else val_loss, "test_loss": test if test_loss is None else test_loss}

    regression = {"metric": "mse", "best_fold": 1, "per_fold": [fold(0, 100, 0.2134, 0.19), fold(1, 80, 0.1, 0.2012345)],
                  "ensemble": {"mean": {"test_loss": 0.181, "test_metric": 0.181}}}
    assert results_table(regression).splitlines() == [
        "model              epochs           val_mse           test_mse",
        "fold 0                100            0.2134             0.1900",
        "fold 1 *               80            0.1000             0.2012",
        "folds: mean ± std          0.1567 ± 0.05670  0.1956 ± 0.005617",
        "ensemble mean                                           0.1810",
        "* best fold on validation",
    ]
    classification = {"metric": "accuracy", "best_fold": 0,
                      "per_fold": [fold(0, 10, 0.89, 0.88, 0.4134, 0.45), fold(1, 10, 0.87, 0.8712, 0.5, 0.5)],
                      "ensemble": {"majority_vote": {"test_metric": 0.9},
                                   "soft_vote": {"test_loss": 0.3, "test_metric": 0.905}}}
    lines = results_table(classification).splitlines()
    assert lines[0].split() == ["model", "epochs", "val_loss", "val_accuracy", "test_loss", "test_accuracy"]
    assert lines[3].split() == ["folds:", "mean", "±", "std", "0.4567", "±", "0.04330", "0.8800", "±", "0.01000",
                                "0.4750", "±", "0.02500", "0.8756", "±", "0.004400"]
    assert lines[4].split() == ["majority", "vote", "-", "0.9000"]
    assert lines[5].split() == ["soft", "vote", "0.3000", "0.9050"]
    assert lines[6] == "* best fold on validation (breaks majority-vote ties)"


def subset_blobs_spec(tmp_path: Path) -> Path:
    """The blobs study searched on 40 training and 10 validation samples of its 105."""
    path = blobs_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["data"].update(train_subset=40, val_subset=10)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("full_data", [None, True], ids=["search-data", "full-data"])
def test_retrain_trains_on_the_search_data_unless_told_full_data(tmp_path, store_url, monkeypatch, full_data):
    import hpo.training.folds

    make_study(subset_blobs_spec(tmp_path), store_url, n_trials=1)
    seen: list[tuple[torch.Tensor, int, int]] = []  # (the pool trained on, fold train size, fold val size)
    real_train = hpo.training.folds.train

    def watched(model, data, hp, **kwargs):
        seen.append((data.x.clone(), len(kwargs["train_idx"]), len(kwargs["val_idx"]), hp["epochs"]))
        return real_train(model, data, hp, **kwargs)

    monkeypatch.setattr(hpo.training.folds, "train", watched)
    lines: list[str] = []
    metrics = run_retrain("blobs", storage_url=store_url, artifacts=str(tmp_path / "a"), folds=2, device=CPU,
                          stacked=False, full_data=full_data, epochs=3, echo=lines.append).metrics

    _, spec = open_study("blobs", open_storage(store_url, heartbeat=False))
    searched = load_dataset(spec)  # as a worker loads it: the whole pool, split into the two subsets
    assert (len(searched.train_idx), len(searched.val_idx)) == (40, 10)
    if full_data:
        pool = searched.x
        assert "  data: all 105 training samples (--full-data)" in lines
    else:
        pool = searched.x[torch.cat([searched.train_idx, searched.val_idx]).sort().values]
        assert ("  data: the search's 50 of 105 training samples (data.train_subset: 40 and data.val_subset: 10); "
                "--full-data trains on all") in lines
    assert [(n_train + n_val, epochs) for _, n_train, n_val, epochs in seen] == [(len(pool), 3)] * 2
    assert all(torch.equal(x, pool) for x, *_ in seen)
    assert metrics.data == {"samples": len(pool), "of": 105, "full_data": bool(full_data)}
    assert [f["epochs_run"] for f in metrics.per_fold] == [3, 3]


def test_trained_line_keeps_a_slow_rate_readable():
    from hpo.console import trained_line

    line = trained_line({"folds": 3, "path": "sequential", "train_seconds": 363.04, "model_epochs_per_s": 0.03306})
    assert line == "trained 3 models (sequential) in 363.0s, 0.0331 model-epochs/s"
    assert trained_line({"folds": 2, "path": "stacked", "train_seconds": 0.5, "model_epochs_per_s": 48.04}).endswith(
        ", 48.0 model-epochs/s")


@pytest.mark.slow
def test_cli_retrain_says_which_data_and_takes_full_data_and_epochs(tmp_path, cli_env):
    run_hpo("create-study", str(subset_blobs_spec(tmp_path)), env=cli_env, check=0)
    run_hpo("worker", "--study", "blobs", "--n-trials", "1", env=cli_env, check=0)
    args = ("retrain", "--study", "blobs", "--folds", "2", "--epochs", "2", "--artifacts", str(tmp_path / "a"))
    proc = run_hpo(*args, env=cli_env, check=0)
    assert "2 folds, 2 epochs" in proc.stdout and "data: the search's 50 of 105 training samples" in proc.stdout
    proc = run_hpo(*args, "--full-data", env=cli_env, check=0)
    assert "data: all 105 training samples (--full-data)" in proc.stdout
    assert "model-epochs/s" in proc.stdout
