"""hpo export-best, hpo.load and hpo predict: round trips through a fresh process, checksums, bad input."""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from conftest import REPO, STUDIES, run_hpo, small_regression_spec

TINY_SPACE = {
    "n_layers": {"int": [1, 2]},
    "width": {"int": [8, 16], "per_layer": "n_layers"},
    "batch_size": {"int": [16, 32]},
    "epochs": {"int": [3, 6]},
    "lr": {"float": [1.0e-3, 1.0e-2], "log": True},
}


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["HPO_STORAGE"] = f"sqlite:///{folder / 'store' / 'hpo.db'}"
    env.pop("HPO_ARTIFACTS", None)
    return env


def _regression_spec(folder: Path) -> Path:
    path = small_regression_spec(folder, space=TINY_SPACE, budget={"n_trials": 3})
    return path


def _classification_spec(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    for part, n in (("train", 90), ("test", 30)):
        labels = np.arange(n) % 3
        points = centres[labels] * 10 + rng.normal(scale=8.0, size=(n, 2)) + 100.0  # raw units far from N(0, 1)
        pd.DataFrame({"a": points[:, 0], "b": points[:, 1], "label": labels}).to_csv(folder / f"cls_{part}.csv", index=False)
    spec = {
        "name": "blobs", "seed": 0, "metric": "val_accuracy", "model": "mlp",
        "data": {"source": "csv", "task": "classification", "train": str(folder / "cls_train.csv"),
                 "test": str(folder / "cls_test.csv"), "features": ["a", "b"], "target": "label"},
        "space": TINY_SPACE, "fixed": {"activation": "relu"},
        "sampler": {"kind": "random"}, "pruner": {"kind": "none"}, "budget": {"n_trials": 3},
    }
    path = folder / "blobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _make_study(folder: Path, spec: Path, name: str, trials: int = 3) -> None:
    env = _env(folder)
    run_hpo("create-study", str(spec), env=env, check=0)
    run_hpo("worker", "--study", name, "--n-trials", str(trials), env=env, check=0)


@pytest.fixture(scope="module")
def regression_store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("regression")
    _make_study(folder, _regression_spec(folder), "regression")
    return folder


@pytest.fixture(scope="module")
def classification_store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classification")
    _make_study(folder, _classification_spec(folder), "blobs")
    return folder


def _copy_store(source: Path, tmp_path: Path) -> Path:
    shutil.copytree(source / "store", tmp_path / "store")
    return tmp_path


def fake_retrain(folder: Path, study_name: str, *, folds: int = 2) -> Path:
    """Write a retrain that follows hpo/results.py's file contract (briefly trained fold MLPs) and
    record it with save_retrain, as ``hpo retrain`` does. Returns the folder of its files."""
    import torch

    from hpo.data import load_dataset
    from hpo.models import build_model
    from hpo.results import save_retrain
    from hpo.space import hyperparams_from_params
    from hpo.store import open_artifact_store, open_storage
    from hpo.study import load
    from hpo.train import predict, train

    url = _env(folder)["HPO_STORAGE"]
    study, spec = load(study_name, open_storage(url, heartbeat=False))
    best = study.best_trial
    hp = hyperparams_from_params(spec, best.params)
    data = load_dataset(spec)
    out = folder / "retrain-files"
    out.mkdir()
    outputs = []
    for k in range(folds):
        torch.manual_seed(k)
        model = build_model(spec.model, hp, in_shape=data.in_shape, out_features=data.out_features)
        train(model, data, {**hp, "epochs": 2}, seed=k)
        torch.save(model.state_dict(), out / f"fold_{k}.pt")
        outputs.append(predict(model, data.x_test))
    stacked = torch.stack(outputs)
    arrays = {"y_test": data.y_test.numpy(), "fold_outputs": stacked.numpy()}
    if spec.task == "regression":
        arrays["ensemble_mean"] = stacked.mean(0).numpy()
    else:
        arrays["soft_vote"] = stacked.softmax(-1).mean(0).argmax(-1).numpy()
        # majority vote, ties to the class the best fold (1, per metrics.json) scores highest
        votes = torch.nn.functional.one_hot(stacked.argmax(-1), stacked.shape[-1]).sum(0)
        tied = votes == votes.max(-1, keepdim=True).values
        arrays["majority_vote"] = stacked[1].masked_fill(~tied, float("-inf")).argmax(-1).numpy()
    np.savez(out / "predictions.npz", **arrays)
    (out / "metrics.json").write_text(json.dumps({"task": spec.task, "folds": folds, "best_fold": 1,
                                                  "trial_number": best.number, "classes": list(data.classes)}))
    (out / "curves.json").write_text(json.dumps({"folds": []}))
    (out / "model.json").write_text(json.dumps({
        "family": spec.model, "in_shape": list(data.in_shape), "out_features": data.out_features, "task": spec.task,
        "hyperparams": hp, "normalization": data.normalization, "classes": list(data.classes)}))
    files = {p.name: p for p in out.iterdir()}
    try:
        save_retrain(study, open_artifact_store(url), trial_number=best.number, folds=folds, files=files,
                     summary={"fake": True})
    except optuna.exceptions.UpdateFinishedTrialError:
        # Optuna 5 refuses trial system attrs on a finished trial; until hpo.results handles that,
        # attach the files the way optuna-dashboard also reads them (study attrs keyed by trial).
        with mock.patch("hpo.results.upload_artifact", functools.partial(_upload_to_finished_trial, study._study_id)):
            save_retrain(study, open_artifact_store(url), trial_number=best.number, folds=folds, files=files,
                         summary={"fake": True})
    return out


def _upload_to_finished_trial(study_id, *, artifact_store, file_path, study_or_trial, storage):
    artifact_id = str(uuid.uuid4())
    name = Path(file_path).name
    meta = {"artifact_id": artifact_id, "filename": name,
            "mimetype": mimetypes.guess_type(name)[0] or "application/octet-stream", "encoding": None}
    with open(file_path, "rb") as f:
        artifact_store.write(artifact_id, f)
    storage.set_study_system_attr(study_id, f"dashboard:artifacts:{study_or_trial._trial_id}:{artifact_id}", json.dumps(meta))
    return artifact_id


def _load_in_fresh_process(export: Path, inputs: np.ndarray, *, extra: str = "") -> np.ndarray:
    """Load the export with ``import hpo; hpo.load(...)`` in a new interpreter; its outputs on ``inputs``."""
    np.save(export.parent / "inputs.npy", inputs)
    code = (f"import hpo, numpy as np, torch\n"
            f"m = hpo.load({str(export)!r}{extra})\n"
            f"assert not m.training\n"
            f"x = torch.from_numpy(np.load({str(export.parent / 'inputs.npy')!r}))\n"
            f"np.save({str(export.parent / 'outputs.npy')!r}, m.predict(x).numpy())\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    return np.load(export.parent / "outputs.npy")


def _raw_test(columns: list[str], csv: Path) -> np.ndarray:
    return pd.read_csv(csv)[columns].to_numpy(dtype=np.float32)


def test_export_without_retrain_gives_params_and_spec(tmp_path, regression_store):
    folder = _copy_store(regression_store, tmp_path)
    env = _env(folder)
    out = tmp_path / "export"
    proc = run_hpo("export-best", "--study", "regression", "--out", str(out), env=env, check=0)
    assert "hpo retrain --study regression" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"] is False and "hpo retrain" in manifest["note"]
    assert sorted(manifest["files"]) == ["params.json", "spec.json", "study.json"]
    assert set(manifest["versions"]) >= {"hpo", "torch", "optuna"}
    params = json.loads((out / "params.json").read_text())
    study = json.loads((out / "study.json").read_text())
    assert params["trial_number"] == study["best_trial"] and params["params"] == study["best_params"]
    assert params["hyperparams"]["n_layers"] == params["params"]["n_layers"]
    assert json.loads((out / "spec.json").read_text())["name"] == "regression"

    printed = run_hpo("export-best", "--study", "regression", "--out", "-", env=env, check=0)
    assert json.loads(printed.stdout) == params["params"]
    printed = run_hpo("export-best", "--study", "regression", "--out", "-", "--format", "yaml", env=env, check=0)
    assert yaml.safe_load(printed.stdout) == params["params"]

    refused = run_hpo("predict", "--model", str(out), "--input", str(STUDIES / "data" / "regression_test.csv"), env=env, check=2)
    assert "no weights" in refused.stderr and "Traceback" not in refused.stderr


def test_regression_round_trip_in_fresh_process(tmp_path, regression_store):
    folder = _copy_store(regression_store, tmp_path)
    env = _env(folder)
    files = fake_retrain(folder, "regression")
    recorded = np.load(files / "predictions.npz")
    out = tmp_path / "export"
    proc = run_hpo("export-best", "--study", "regression", "--out", str(out), "--format", "yaml", env=env, check=0)
    assert "mean ensemble" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"fold_0.pt", "fold_1.pt", "model.json", "params.yaml", "spec.yaml", "study.yaml"} <= set(manifest["files"])
    model = json.loads((out / "model.json").read_text())
    assert model["ensemble"] == "mean" and model["features"] == ["x"] and len(model["normalization"]["mean"]) == 1

    test_csv = STUDIES / "data" / "regression_test.csv"
    x_raw = _raw_test(["x"], test_csv)
    loaded = _load_in_fresh_process(out, x_raw)
    np.testing.assert_allclose(loaded, recorded["ensemble_mean"], rtol=1e-5, atol=1e-6)
    one_fold = _load_in_fresh_process(out, x_raw, extra=", fold=1")
    np.testing.assert_allclose(one_fold, recorded["fold_outputs"][1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(one_fold, loaded)  # the ensemble is not just one fold

    written = tmp_path / "pred.csv"
    run_hpo("predict", "--model", str(out), "--input", str(test_csv), "--output", str(written), env=env, check=0)
    frame = pd.read_csv(written)
    np.testing.assert_allclose(frame["prediction"], recorded["ensemble_mean"][:, 0], rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", x_raw)
    run_hpo("predict", "--model", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.npy"),
            "--fold", "0", env=env, check=0)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), recorded["fold_outputs"][0][:, 0], rtol=1e-5, atol=1e-6)
    bad_fold = run_hpo("predict", "--model", str(out), "--input", str(test_csv), "--fold", "5", env=env, check=2)
    assert "folds 0..1" in bad_fold.stderr


def test_classification_round_trip_both_vote_rules(tmp_path, classification_store):
    folder = _copy_store(classification_store, tmp_path)
    env = _env(folder)
    files = fake_retrain(folder, "blobs", folds=3)
    recorded = np.load(files / "predictions.npz")
    x_raw = _raw_test(["a", "b"], classification_store / "cls_test.csv")
    for rule in ("soft_vote", "majority_vote"):
        out = tmp_path / rule
        run_hpo("export-best", "--study", "blobs", "--out", str(out), "--ensemble", rule, env=env, check=0)
        model = json.loads((out / "model.json").read_text())
        assert model["ensemble"] == rule and model["classes"] == ["0", "1", "2"] and model["tie_breaker"] == 1
        np.testing.assert_array_equal(_load_in_fresh_process(out, x_raw), recorded[rule])
    import hpo

    module = hpo.load(tmp_path / "soft_vote")
    probs = module(x_raw).detach().numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    written = tmp_path / "classes.csv"
    run_hpo("predict", "--model", str(tmp_path / "soft_vote"), "--input", str(classification_store / "cls_test.csv"),
            "--output", str(written), env=env, check=0)
    frame = pd.read_csv(written)
    np.testing.assert_array_equal(frame["prediction"], recorded["soft_vote"])
    assert list(frame.columns) == ["a", "b", "label", "prediction", "class"]


def test_tampered_truncated_or_pickled_weights_are_refused(tmp_path, regression_store):
    import hpo
    from hpo.errors import HpoError

    folder = _copy_store(regression_store, tmp_path)
    env = _env(folder)
    fake_retrain(folder, "regression")
    good = tmp_path / "export"
    run_hpo("export-best", "--study", "regression", "--out", str(good), env=env, check=0)
    assert hpo.load(good).predict(np.zeros((2, 1), dtype=np.float32)).shape == (2, 1)

    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    raw = bytearray((tampered / "fold_1.pt").read_bytes())
    raw[-30] ^= 0xFF
    (tampered / "fold_1.pt").write_bytes(bytes(raw))
    with pytest.raises(HpoError, match="checksum mismatch"):
        hpo.load(tampered)
    proc = run_hpo("predict", "--model", str(tampered), "--input", str(STUDIES / "data" / "regression_test.csv"), env=env, check=2)
    assert "fold_1.pt: checksum mismatch" in proc.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "fold_0.pt").write_bytes((good / "fold_0.pt").read_bytes()[:100])
    with pytest.raises(HpoError, match="checksum mismatch"):
        hpo.load(truncated)

    # A pickle that runs code, with the manifest rewritten to match: weights_only refuses it.
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "fold_0.pt").write_bytes(pickle.dumps(Payload()))
    from hpo.export import sha256

    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["files"]["fold_0.pt"] = {"sha256": sha256(evil / "fold_0.pt"), "bytes": (evil / "fold_0.pt").stat().st_size}
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HpoError, match="cannot load the weights"):
        hpo.load(evil)
    assert not marker.exists()


def test_bad_input_exits_2(tmp_path, regression_store):
    folder = _copy_store(regression_store, tmp_path)
    env = _env(folder)
    proc = run_hpo("export-best", "--study", "nope", "--out", str(tmp_path / "x"), env=env, check=2)
    assert "no study named 'nope'" in proc.stderr and not (tmp_path / "x").exists()

    empty = small_regression_spec(tmp_path, name="empty")
    run_hpo("create-study", str(empty), env=env, check=0)
    for out in (str(tmp_path / "y"), "-"):
        proc = run_hpo("export-best", "--study", "empty", "--out", out, env=env, check=2)
        assert "no complete trial" in proc.stderr and "hpo worker --study empty" in proc.stderr
    assert not (tmp_path / "y").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    proc = run_hpo("export-best", "--study", "regression", "--out", str(existing), env=env, check=2)
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    run_hpo("export-best", "--study", "regression", "--out", str(existing), "--force", env=env, check=0)
    assert not (existing / "keep.txt").exists() and (existing / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []

    proc = run_hpo("predict", "--model", str(tmp_path / "missing"), "--input", "x.csv", env=env, check=2)
    assert "not an hpo export" in proc.stderr
    proc = run_hpo("export-best", "--study", "regression", "--retrain", "r0", "--out", str(tmp_path / "z"), env=env, check=2)
    assert "has no retrain 'r0'" in proc.stderr
