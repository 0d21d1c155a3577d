"""hpo export-best, hpo.load and hpo predict on the real pipeline: a tiny study -> hpo retrain ->
export -> load in a fresh process; checksums and weights_only; bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
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
REGRESSION_TEST_CSV = STUDIES / "data" / "regression_test.csv"
TOL = {"rtol": 1e-5, "atol": 1e-6}


def store_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HPO_STORAGE=f"sqlite:///{folder / 'store' / 'hpo.db'}")
    env.pop("HPO_ARTIFACTS", None)  # artifacts/ beside the SQLite file
    return env


def classification_spec(folder: Path) -> Path:
    """Three 2-D blobs in raw units far from N(0, 1), so a missing normalisation would show."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0]])
    for part, n in (("train", 90), ("test", 30)):
        labels = np.arange(n) % 3
        points = centres[labels] + rng.normal(scale=8.0, size=(n, 2)) + 100.0
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


def make_study(folder: Path, spec: Path, name: str, *, trials: int = 3) -> None:
    run_hpo("create-study", str(spec), env=store_env(folder), check=0)
    run_hpo("worker", "--study", name, "--n-trials", str(trials), env=store_env(folder), check=0)


def retrain(folder: Path, name: str, *, folds: int) -> Path:
    """``hpo retrain``, then its files fetched from the artifact store (for the recorded predictions)."""
    from hpo.retrain.results import fetch_files, load_retrain
    from hpo.search.study import open_study
    from hpo.store.artifacts import open_artifact_store
    from hpo.store.storage import open_storage

    run_hpo("retrain", "--study", name, "--folds", str(folds), env=store_env(folder), check=0)
    url = store_env(folder)["HPO_STORAGE"]
    study, _ = open_study(name, open_storage(url, heartbeat=False))
    return fetch_files(open_artifact_store(url), load_retrain(study), folder / "retrain-files")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A regression study with 3 complete trials and no retrain."""
    folder = tmp_path_factory.mktemp("trained")
    make_study(folder, small_regression_spec(folder, space=TINY_SPACE, budget={"n_trials": 3}), "regression")
    return folder


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, trained) -> Path:
    """The same study after ``hpo retrain --folds 2``."""
    folder = tmp_path_factory.mktemp("retrained")
    shutil.copytree(trained / "store", folder / "store")
    retrain(folder, "regression", folds=2)
    return folder


def load_in_fresh_process(export: Path, inputs: np.ndarray, *, calls: dict[str, str]) -> dict[str, np.ndarray]:
    """Run ``import hpo; m = hpo.load(...)`` in a new interpreter; ``calls`` maps a result name to an
    expression of ``m`` and ``x`` (the raw inputs as a tensor)."""
    np.save(export.parent / "inputs.npy", inputs)
    results = export.parent / "results.npz"
    code = "\n".join([
        "import hpo, numpy as np, torch",
        f"x = torch.from_numpy(np.load({str(export.parent / 'inputs.npy')!r}))",
        "out = {}",
        *(f"m = {load}\nassert not m.training\nout[{name!r}] = ({expr}).detach().numpy()"
          for name, (load, expr) in calls.items()),
        f"np.savez({str(results)!r}, **out)",
    ])
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    return dict(np.load(results))


def raw_columns(csv: Path, columns: list[str]) -> np.ndarray:
    return pd.read_csv(csv)[columns].to_numpy(dtype=np.float32)


def test_export_without_retrain_gives_params_and_spec(tmp_path, trained):
    import hpo
    from hpo.errors import HpoError
    from hpo.export.folder import best_params_text

    env = store_env(trained)
    out = tmp_path / "export"
    proc = run_hpo("export-best", "--study", "regression", "--out", str(out), env=env, check=0)
    assert "no weights" in proc.stdout and "hpo retrain --study regression" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"] is False and "hpo retrain" in manifest["note"]
    assert sorted(manifest["files"]) == ["params.json", "spec.json", "study.json"]
    assert set(manifest["versions"]) >= {"hpo", "torch", "optuna"}
    params = json.loads((out / "params.json").read_text())
    study = json.loads((out / "study.json").read_text())
    assert params["trial_number"] == study["best_trial"] and params["params"] == study["best_params"]
    assert study["counts"]["COMPLETE"] == 3
    assert params["hyperparams"]["n_layers"] == params["params"]["n_layers"]
    assert json.loads((out / "spec.json").read_text())["name"] == "regression"

    printed = run_hpo("export-best", "--study", "regression", "--out", "-", env=env, check=0)
    assert json.loads(printed.stdout) == params["params"]
    as_yaml = best_params_text("regression", storage_url=env["HPO_STORAGE"], fmt="yaml")
    assert yaml.safe_load(as_yaml) == params["params"]
    with pytest.raises(HpoError, match="no weights"):
        hpo.load(out)


def test_export_of_a_retrain_of_another_trial_gives_that_trials_params(tmp_path, trained):
    import torch

    from hpo.export.folder import export_best
    from hpo.retrain.run import run_retrain
    from hpo.search.study import open_study
    from hpo.store.storage import open_storage

    shutil.copytree(trained / "store", tmp_path / "store")
    url = store_env(tmp_path)["HPO_STORAGE"]
    study, _ = open_study("regression", open_storage(url, heartbeat=False))
    other = next(t for t in study.trials if t.number != study.best_trial.number)
    record = run_retrain("regression", storage_url=url, folds=2, trial_number=other.number,
                         device=torch.device("cpu"), stacked=False)
    out = export_best("regression", storage_url=url, out=tmp_path / "export", retrain_id=record.id)
    params = json.loads((out / "params.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert params["trial_number"] == manifest["trial_number"] == other.number != study.best_trial.number
    assert params["params"] == other.params and params["value"] == other.value


def test_regression_round_trip_in_fresh_process(tmp_path, retrained):
    from hpo.errors import HpoError
    from hpo.export.loading import predict_file

    env = store_env(retrained)
    recorded = np.load(retrained / "retrain-files" / "predictions.npz")
    out = tmp_path / "export"
    proc = run_hpo("export-best", "--study", "regression", "--out", str(out), "--format", "yaml", env=env, check=0)
    assert "mean ensemble" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"fold_0.pt", "fold_1.pt", "model.json", "metrics.json", "params.yaml", "spec.yaml",
            "study.yaml"} == set(manifest["files"])
    model = json.loads((out / "model.json").read_text())
    assert model["ensemble"] == "mean" and model["features"] == ["x"] and len(model["normalization"]["mean"]) == 1

    x_raw = raw_columns(REGRESSION_TEST_CSV, ["x"])
    got = load_in_fresh_process(out, x_raw, calls={
        "ensemble": (f"hpo.load({str(out)!r})", "m.predict(x)"),
        "forward": (f"hpo.load({str(out)!r})", "m(x)"),
        "fold1": (f"hpo.load({str(out)!r}, fold=1)", "m.predict(x)"),
    })
    assert got["ensemble"].shape == (len(x_raw), 1)
    np.testing.assert_allclose(got["ensemble"].ravel(), recorded["ensemble_mean"].ravel(), **TOL)
    np.testing.assert_allclose(got["forward"].ravel(), recorded["ensemble_mean"].ravel(), **TOL)
    np.testing.assert_allclose(got["fold1"].ravel(), recorded["fold_outputs"][1].ravel(), **TOL)
    assert not np.allclose(got["fold1"], got["ensemble"])  # the ensemble is not one fold

    written = tmp_path / "pred.csv"
    run_hpo("predict", "--model", str(out), "--input", str(REGRESSION_TEST_CSV), "--output", str(written), env=env, check=0)
    frame = pd.read_csv(written)
    assert list(frame.columns) == ["x", "y", "prediction"]
    np.testing.assert_allclose(frame["prediction"], recorded["ensemble_mean"].ravel(), **TOL)
    np.save(tmp_path / "x.npy", x_raw)
    predict_file(out, tmp_path / "x.npy", tmp_path / "p.npy", fold=0)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), recorded["fold_outputs"][0].ravel(), **TOL)
    with pytest.raises(HpoError, match=r"folds 0\.\.1"):
        predict_file(out, REGRESSION_TEST_CSV, tmp_path / "q.csv", fold=5)
    (tmp_path / "nox.csv").write_text("u,y\n1,2\n")
    with pytest.raises(HpoError, match="missing feature column"):
        predict_file(out, tmp_path / "nox.csv")


@pytest.mark.slow
def test_classification_round_trip_both_vote_rules(tmp_path):
    from hpo.export.folder import export_best
    from hpo.export.loading import predict_file

    make_study(tmp_path, classification_spec(tmp_path), "blobs", trials=2)
    files = retrain(tmp_path, "blobs", folds=3)
    recorded = np.load(files / "predictions.npz")
    env = store_env(tmp_path)
    soft, majority = tmp_path / "soft", tmp_path / "majority"
    run_hpo("export-best", "--study", "blobs", "--out", str(soft), env=env, check=0)
    export_best("blobs", storage_url=env["HPO_STORAGE"], out=majority, ensemble="majority_vote")
    model = json.loads((soft / "model.json").read_text())
    metrics = json.loads((files / "metrics.json").read_text())
    assert model["ensemble"] == "soft_vote" and model["classes"] == ["0", "1", "2"]
    assert model["tie_breaker"] == metrics["best_fold"]

    x_raw = raw_columns(tmp_path / "cls_test.csv", ["a", "b"])
    got = load_in_fresh_process(soft, x_raw, calls={
        "soft_probs": (f"hpo.load({str(soft)!r})", "m(x)"),
        "soft_classes": (f"hpo.load({str(soft)!r})", "m.predict(x)"),
        "majority": (f"hpo.load({str(majority)!r})", "m.predict(x)"),
    })
    np.testing.assert_allclose(got["soft_probs"], recorded["soft_vote"], **TOL)
    np.testing.assert_array_equal(got["soft_classes"], recorded["soft_vote"].argmax(1))
    np.testing.assert_array_equal(got["majority"], recorded["majority_vote"])
    assert (got["soft_classes"] == recorded["y_test"]).mean() > 0.5  # it learned the blobs at all

    written = predict_file(soft, tmp_path / "cls_test.csv", tmp_path / "classes.csv")
    frame = pd.read_csv(written)
    assert list(frame.columns) == ["a", "b", "label", "prediction", "class"]
    np.testing.assert_array_equal(frame["prediction"], recorded["soft_vote"].argmax(1))


def test_tampered_truncated_or_pickled_weights_are_refused(tmp_path, retrained):
    import hpo
    from hpo.data.checksum import sha256_file as sha256
    from hpo.errors import HpoError
    from hpo.export.folder import export_best

    good = export_best("regression", storage_url=store_env(retrained)["HPO_STORAGE"], out=tmp_path / "export")
    assert hpo.load(good).predict(np.zeros((2, 1), dtype=np.float32)).shape == (2, 1)

    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    raw = bytearray((tampered / "fold_1.pt").read_bytes())
    raw[-30] ^= 0xFF
    (tampered / "fold_1.pt").write_bytes(bytes(raw))
    proc = run_hpo("predict", "--model", str(tampered), "--input", str(REGRESSION_TEST_CSV), check=2)
    assert "fold_1.pt: checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "fold_0.pt").write_bytes((good / "fold_0.pt").read_bytes()[:100])
    with pytest.raises(HpoError, match="checksum mismatch"):
        hpo.load(truncated)
    (truncated / "fold_0.pt").unlink()
    with pytest.raises(HpoError, match="fold_0.pt is missing"):
        hpo.load(truncated)

    # A pickle that runs code, with the manifest rewritten to match: weights_only refuses it.
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "fold_0.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["files"]["fold_0.pt"] = {"sha256": sha256(evil / "fold_0.pt"), "bytes": (evil / "fold_0.pt").stat().st_size}
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HpoError, match="cannot load the weights"):
        hpo.load(evil)
    assert not marker.exists()


def test_bad_input_exits_2(tmp_path, trained):
    from hpo.errors import HpoError
    from hpo.export.folder import export_best
    from hpo.export.loading import load

    env = store_env(tmp_path)
    shutil.copytree(trained / "store", tmp_path / "store")
    proc = run_hpo("export-best", "--study", "nope", "--out", str(tmp_path / "x"), env=env, check=2)
    assert "no study named 'nope'" in proc.stderr and not (tmp_path / "x").exists()

    run_hpo("create-study", str(small_regression_spec(tmp_path, name="empty")), env=env, check=0)
    proc = run_hpo("export-best", "--study", "empty", "--out", "-", env=env, check=2)
    assert "no complete trial" in proc.stderr and "hpo worker --study empty" in proc.stderr
    with pytest.raises(HpoError, match="no complete trial"):
        export_best("empty", storage_url=env["HPO_STORAGE"], out=tmp_path / "y")
    assert not (tmp_path / "y").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    proc = run_hpo("export-best", "--study", "regression", "--out", str(existing), env=env, check=2)
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    # --force replaces only a folder export-best wrote: never a folder of someone else's files.
    with pytest.raises(HpoError, match=r"is not an export folder \(no manifest.json\); --force replaces only"):
        export_best("regression", storage_url=env["HPO_STORAGE"], out=existing, force=True)
    assert (existing / "keep.txt").read_text() == "mine"
    (existing / "keep.txt").unlink()
    export_best("regression", storage_url=env["HPO_STORAGE"], out=existing, force=True)  # an empty folder
    (existing / "keep.txt").write_text("mine")
    export_best("regression", storage_url=env["HPO_STORAGE"], out=existing, force=True)  # an export
    assert not (existing / "keep.txt").exists() and (existing / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []

    with pytest.raises(HpoError, match="not an hpo export"):
        load(tmp_path / "missing")
    with pytest.raises(HpoError, match="has no retrain 'r0'"):
        export_best("regression", storage_url=env["HPO_STORAGE"], out=tmp_path / "z", retrain_id="r0")
    assert not (tmp_path / "z").exists()


def image_export(tmp_path: Path, *, input_stats: dict | None):
    """An image retrain's model.json (the loader's normalisation: scale 1/255, mean, std) exported as a
    one-fold MLP; returns (export folder, the net, the source)."""
    import torch

    from hpo.data.checksum import sha256_file as sha256
    from hpo.data.images import SOURCES
    from hpo.export.folder import EXPORT_FORMAT, MANIFEST, _model_description
    from hpo.nn.models import build_model
    from hpo.retrain.results import RetrainRecord
    from hpo.spec.schema import parse_spec

    spec = parse_spec({"name": "fm", "data": {"source": "fashion_mnist"}, "model": "mlp"})
    src = SOURCES["fashion_mnist"]
    hp = {"n_layers": 1, "width": 8, "dropout": 0.0, "activation": "relu", "init": "default"}
    retrain_files = tmp_path / "retrain"
    retrain_files.mkdir()
    (retrain_files / "model.json").write_text(json.dumps({
        "family": "mlp", "in_shape": [1, 28, 28], "out_features": 10, "task": "classification", "hyperparams": hp,
        "normalization": {"scale": 1 / 255, "mean": [src.mean], "std": [src.std]}, "classes": list(src.classes),
        **({"input_stats": input_stats} if input_stats else {})}))
    record = RetrainRecord(id="r", trial_number=0, folds=1, created="", files={}, summary={})
    description = _model_description(retrain_files, record, spec, None)
    assert description["normalization"]["scale"] == pytest.approx(1 / 255)

    export = tmp_path / "export"
    export.mkdir()
    torch.manual_seed(0)
    net = build_model("mlp", hp, in_shape=(1, 28, 28), out_features=10).eval()
    torch.save(net.state_dict(), export / "fold_0.pt")
    (export / "model.json").write_text(json.dumps(description))
    (export / MANIFEST).write_text(json.dumps({"format": EXPORT_FORMAT, "weights": True, "files": {
        p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in export.iterdir()}}))

    return export, net, src


def test_image_export_takes_raw_idx_pixels(tmp_path):
    """A module that takes raw 0..255 pixels; ``hpo predict`` reads a gzipped IDX file. An export made
    before the training inputs' statistics were recorded still loads (and checks nothing)."""
    import gzip

    import torch

    import hpo
    from hpo.export.loading import predict_file

    export, net, src = image_export(tmp_path, input_stats=None)
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + np.array([5, 28, 28], dtype=">i4").tobytes()
    (tmp_path / "images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
    expected = net((torch.from_numpy(pixels).float()[:, None] / 255 - src.mean) / src.std).softmax(-1)

    module = hpo.load(export)
    assert module.input_stats is None and module.scale_problem(pixels / 255) is None
    np.testing.assert_allclose(module(torch.from_numpy(pixels)).detach(), expected.detach(), **TOL)
    written = predict_file(export, tmp_path / "images-idx3-ubyte.gz", tmp_path / "labels.csv")
    frame = pd.read_csv(written)
    np.testing.assert_array_equal(frame["prediction"], expected.argmax(-1).numpy())
    assert list(frame["class"]) == [src.classes[i] for i in expected.argmax(-1)]


def test_predict_output_and_load_types(tmp_path, retrained, monkeypatch):
    """``hpo predict`` writes under storage/predictions/ (never beside its input), refuses to
    replace a file without --force, or prints a CSV with --output -; ``predict`` returns the type
    it is given; an export folder the file system refuses is one line, exit 2."""
    import io
    import warnings

    import torch

    import hpo
    from hpo.errors import HpoError
    from hpo.export.folder import export_best
    from hpo.export.loading import predict_file

    env = store_env(retrained)
    out = export_best("regression", storage_url=env["HPO_STORAGE"], out=tmp_path / "export")
    model = hpo.load(out)
    x = raw_columns(REGRESSION_TEST_CSV, ["x"]).copy()
    read_only = x.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns (once per process) on read-only arrays: predict copies them
        y = model.predict(read_only)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (len(x), 1)
    y_torch = model.predict(torch.from_numpy(x))
    assert isinstance(y_torch, torch.Tensor)
    np.testing.assert_allclose(y_torch.numpy(), y)
    np.testing.assert_allclose(model.predict(x), y)
    np.testing.assert_allclose(model.predict(x.tolist()), y)

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REGRESSION_TEST_CSV, data / "points.csv")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    written = predict_file(out, data / "points.csv")
    assert written == Path("storage/predictions/regression/points.csv") and written.is_file()
    assert [p.name for p in data.iterdir()] == ["points.csv"]
    with pytest.raises(HpoError, match=r"^--output: storage/predictions/regression/points.csv already exists; "
                                       r"pass --force to replace it"):
        predict_file(out, data / "points.csv")
    written.write_text("old")
    predict_file(out, data / "points.csv", force=True)
    np.testing.assert_allclose(pd.read_csv(written)["prediction"], y.ravel(), **TOL)

    proc = run_hpo("predict", "--model", str(out), "--input", str(data / "points.csv"), "--output", "-", env=env, check=0)
    frame = pd.read_csv(io.StringIO(proc.stdout))
    assert list(frame.columns) == ["x", "y", "prediction"]
    np.testing.assert_allclose(frame["prediction"], y.ravel(), **TOL)
    proc = run_hpo("predict", "--model", str(out), "--input", str(data / "points.csv"),
                   "--output", str(tmp_path / "work" / written), env=env, check=2)
    assert proc.stderr.strip().endswith("already exists; pass --force to replace it (or --output FILE, or --output - "
                                        "for standard output)")

    # The manifest is not signed: a study name edited to leave storage/predictions is refused, nothing written.
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    for study in ("../../../outside", "..", "/tmp/x"):
        manifest["study"] = study
        (tampered / "manifest.json").write_text(json.dumps(manifest))
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        proc = run_hpo("predict", "--model", str(tampered), "--input", str(data / "points.csv"), cwd=tmp_path / "work",
                       env=env, check=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{tampered / 'manifest.json'}: study: got " in lines[0], proc.stderr
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before

    too_long = tmp_path / ("x" * 300)
    proc = run_hpo("export-best", "--study", "regression", "--out", str(too_long), env=env, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpo: error: --out: cannot write the export {too_long}")
    assert lines[0].endswith("File name too long")


def test_predict_bad_input_files_are_one_line_naming_the_file(tmp_path, retrained):
    """Ragged rows, unterminated quotes, empty files, non-finite cells (shown as written), truncated or
    non-numeric .npy files: one line naming the file (and its line), exit 2, nothing written."""
    from hpo.errors import HpoError
    from hpo.export.folder import export_best
    from hpo.export.loading import predict_file

    env = store_env(retrained)
    model = export_best("regression", storage_url=env["HPO_STORAGE"], out=tmp_path / "export")
    good = np.arange(12, dtype=np.float32).reshape(12, 1)
    np.save(tmp_path / "good.npy", good)
    raw = (tmp_path / "good.npy").read_bytes()
    files = {
        "ragged.csv": ("x,y\n1,2\n3,4,5\n", r"ragged.csv: cannot read as CSV: .*Expected 2 fields in line 3, saw 3"),
        "quote.csv": ('x,y\n1,2\n"3,4\n', r"quote.csv: cannot read as CSV: .*EOF inside string"),
        "empty.csv": ("", r"empty.csv: cannot read as CSV: the file is empty"),
        "huge.csv": ("x\n1\n1e400\n", r"huge.csv: line 3, column 'x': expected a finite number, got '1e400'"),
        "big.csv": ("x\n1e300\n", r"big.csv: line 2, column 'x': expected a number within ±3.4e38 \(float32\), got '1e300'"),
        "nan.csv": ("x\nnan\n", r"nan.csv: line 2, column 'x': expected a finite number, got 'nan'"),
        "latin1.csv": (b"x\n\xe91\n", r"latin1.csv: cannot read as CSV: not UTF-8 text \(byte 0xe9\)"),
        "cut.npy": (raw[:-5], r"cut.npy: cannot read as .npy: "),
        "header.npy": (raw[:20], r"header.npy: cannot read as .npy: "),
        "nan.npy": (np.array([[1.0], [np.nan]]), r"nan.npy: element \[1, 0\]: got nan; allowed: a finite number"),
        "text.npy": (np.array(["a", "b"]), r"text.npy: holds <U1 values; allowed: numbers"),
    }
    for name, (content, message) in files.items():
        path = tmp_path / name
        if isinstance(content, np.ndarray):
            np.save(path, content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(HpoError, match=message) as e:
            predict_file(model, path, tmp_path / "out.csv")
        assert "\n" not in str(e.value) and not (tmp_path / "out.csv").exists(), name
    for name in ("ragged.csv", "cut.npy"):
        proc = run_hpo("predict", "--model", str(model), "--input", str(tmp_path / name), "--output",
                       str(tmp_path / "out.csv"), env=env, check=2)
        assert proc.stderr.count("\n") == 1 and f"{tmp_path / name}: cannot read as" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.csv").exists()


def test_an_infinite_best_value_exports_as_strict_json(tmp_path, trained):
    """A trial value of -inf (Optuna accepts one) is written as null with a note, never as -Infinity."""
    import optuna

    from hpo.export.folder import export_best

    shutil.copytree(trained / "store", tmp_path / "store")
    url = store_env(tmp_path)["HPO_STORAGE"]
    study = optuna.load_study(study_name="regression", storage=url)
    t = study.best_trial
    study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=float("-inf")))
    out = export_best("regression", storage_url=url, out=tmp_path / "export")

    def refuse(name):
        raise AssertionError(f"not JSON: {name}")

    for name in ("params.json", "study.json", "manifest.json"):
        json.loads((out / name).read_text(), parse_constant=refuse)
    params = json.loads((out / "params.json").read_text())
    assert params["value"] is None and params["non_finite"] == {"value": "-inf"}


def test_malformed_export_files_are_one_line_naming_the_file(tmp_path, retrained):
    """A manifest or model.json that is not JSON, not UTF-8, or of the wrong shape (checksums made to
    match): one line naming the file, never a traceback."""
    import hpo
    from hpo.data.checksum import sha256_file as sha256
    from hpo.errors import HpoError
    from hpo.export.folder import export_best

    good = export_best("regression", storage_url=store_env(retrained)["HPO_STORAGE"], out=tmp_path / "export")
    manifest = json.loads((good / "manifest.json").read_text())

    def variant(name: str, *, manifest_text: str | bytes | None = None, model: object = None) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        m = json.loads(json.dumps(manifest))
        if model is not None:
            (folder / "model.json").write_text(json.dumps(model))
            m["files"]["model.json"] = {"sha256": sha256(folder / "model.json"), "bytes": (folder / "model.json").stat().st_size}
        text = manifest_text if manifest_text is not None else json.dumps(m)
        (folder / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        return folder

    description = json.loads((good / "model.json").read_text())
    cases = {
        variant("not-json", manifest_text="{"): r"not-json/manifest.json: unreadable manifest \(",
        variant("not-utf8", manifest_text=b"\xff\xfe{}"): r"not-utf8/manifest.json: unreadable manifest \(",
        variant("a-list", manifest_text="[]"): r"a-list/manifest.json: unreadable manifest \(expected a JSON object\)",
        variant("files-text", manifest_text=json.dumps({**manifest, "files": "x"})): r"files-text/manifest.json: unreadable manifest \(files:",
        variant("files-out", manifest_text=json.dumps({**manifest, "files": {"../x": {"sha256": "0", "bytes": 1}}})):
            r"files-out/manifest.json: files: '../x' is not a file name of the folder",
        variant("model-list", model=[]): r"model-list/model.json: unreadable model.json \(expected a JSON object\)",
        variant("model-weights", model={**description, "weights": "fold_0.pt"}): r"model-weights/model.json: malformed \(weights",
        variant("model-shape", model={k: v for k, v in description.items() if k != "in_shape"}): r"model-shape/fold_0.pt: cannot load",
    }
    for folder, message in cases.items():
        with pytest.raises(HpoError, match=message) as e:
            hpo.load(folder)
        assert "\n" not in str(e.value), folder.name
    proc = run_hpo("predict", "--model", str(tmp_path / "not-utf8"), "--input", str(REGRESSION_TEST_CSV), check=2)
    assert proc.stderr.count("\n") == 1 and "not-utf8/manifest.json: unreadable manifest" in proc.stderr


def test_predict_refuses_inputs_on_another_scale(tmp_path):
    """A model trained on raw 0..255 pixels given pixels scaled to [0, 1] (torchvision's ToTensor):
    ``hpo.load(...).predict`` warns and ``hpo predict`` refuses (exit 2, one line naming the
    training range) unless --force; raw pixels pass; --proba rows sum to 1; predict runs in
    inference mode on a module in eval mode."""
    import torch

    import hpo
    from hpo.data.dataset import Dataset, raw_input_stats
    from hpo.data.images import SOURCES
    from hpo.export.loading import InputScaleWarning

    src = SOURCES["fashion_mnist"]
    rng = np.random.default_rng(1)
    train_pixels = rng.integers(0, 256, size=(40, 1, 28, 28)).astype(np.float32)
    train_pixels[0, 0, 0, 0], train_pixels[1, 0, 0, 0] = 0, 255
    data = Dataset(task="classification", x=torch.from_numpy((train_pixels / 255 - src.mean) / src.std),
                   y=torch.zeros(40, dtype=torch.int64), train_idx=torch.arange(40), val_idx=torch.arange(0),
                   x_test=torch.zeros(0, 1, 28, 28), y_test=torch.zeros(0, dtype=torch.int64), in_shape=(1, 28, 28),
                   out_features=10, classes=src.classes,
                   normalization={"scale": 1 / 255, "mean": [src.mean], "std": [src.std]})
    stats = raw_input_stats(data)
    assert stats["over"] == "all" and stats["count"] == 40
    assert stats["min"] == [0.0] and stats["max"] == pytest.approx([255.0], abs=1e-3)
    assert stats["mean"] == pytest.approx([train_pixels.mean()], rel=1e-4)
    assert stats["std"] == pytest.approx([train_pixels.std()], rel=1e-4)
    export, _, _ = image_export(tmp_path, input_stats=stats)

    pixels = rng.integers(0, 256, size=(3, 1, 28, 28)).astype(np.float32)
    model = hpo.load(export)
    assert not model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = model.predict(pixels)  # raw pixels: no warning
        one = model.predict(torch.from_numpy(pixels[:1]))
    assert torch.is_inference(one) and not one.requires_grad
    with pytest.warns(InputScaleWarning, match=r"span \[0, 1\] but the model was trained on values in \[0, 255\]"):
        model.predict(pixels / 255)
    with pytest.warns(InputScaleWarning, match=r"trained on values in \[0, 255\]"):
        model.predict_proba(pixels / 255)
    probabilities = model.predict_proba(pixels)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(1), labels)

    np.save(tmp_path / "scaled.npy", pixels / 255)
    np.save(tmp_path / "raw.npy", pixels)
    out = tmp_path / "pred.csv"
    proc = run_hpo("predict", "--model", str(export), "--input", str(tmp_path / "scaled.npy"), "--output", str(out),
                   check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained on values in [0, 255]" in lines[0] and "--force" in lines[0], proc.stderr
    assert not out.exists()
    proc = run_hpo("predict", "--model", str(export), "--input", str(tmp_path / "scaled.npy"), "--output", str(out),
                   "--force", check=0)
    assert proc.stderr.startswith("warning: ") and "[0, 255]" in proc.stderr and out.is_file()
    proc = run_hpo("predict", "--model", str(export), "--input", str(tmp_path / "raw.npy"), "--output", "-",
                   "--proba", check=0)
    assert proc.stderr == ""
    frame = pd.read_csv(io.StringIO(proc.stdout))
    columns = [f"proba_{c}" for c in src.classes]
    assert list(frame.columns) == ["prediction", "class", *columns]
    np.testing.assert_allclose(frame[columns].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(frame[columns], probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(frame["prediction"], labels)


def test_predict_checks_csv_features_and_refuses_proba_for_regression(tmp_path, retrained):
    """A real retrain records each feature's raw range; a CSV whose feature is 1000 times the
    training's is refused naming the feature; --proba of a regression model is refused."""
    from hpo.export.folder import export_best

    env = store_env(retrained)
    out = export_best("regression", storage_url=env["HPO_STORAGE"], out=tmp_path / "export")
    stats = json.loads((out / "model.json").read_text())["input_stats"]
    train_x = pd.read_csv(STUDIES / "data" / "regression_train.csv")["x"]
    assert stats["over"] == "feature" and stats["count"] == len(train_x)
    assert stats["min"] == pytest.approx([train_x.min()], abs=1e-4)
    assert stats["max"] == pytest.approx([train_x.max()], abs=1e-4)
    frame = pd.read_csv(REGRESSION_TEST_CSV)
    frame["x"] *= 1000
    frame.to_csv(tmp_path / "milli.csv", index=False)
    proc = run_hpo("predict", "--model", str(out), "--input", str(tmp_path / "milli.csv"), check=2)
    assert "feature 'x' span" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_hpo("predict", "--model", str(out), "--input", str(REGRESSION_TEST_CSV), "--proba", "--output", "-",
                   check=2)
    assert "--proba: a regression model predicts values" in proc.stderr
