"""A model family from an installed package (the worked example, examples/resnet_small) on an
image_folder data set (scikit-learn's digits as PNGs) through every stage, by the CLI: create-study,
two workers, a 3-fold retrain, export, hpo.load and hpo predict on an image and a folder; and the
refusals: an uninstalled source, another version of the family at the worker, an export whose
family is missing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import HPO, REPO, run_hpo
from plugin_package import digits_folders, env_with, example_installed, install_example  # noqa: F401

pytestmark = pytest.mark.slow


def write_spec(tmp_path: Path, train: Path, test: Path, **overrides) -> Path:
    raw = yaml.safe_load((REPO / "examples" / "resnet_small" / "digits.yaml").read_text())
    raw["data"].update(train=str(train), test=str(test))
    raw.update(overrides)
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def digits(tmp_path):
    return digits_folders(tmp_path / "digits")


def test_a_plugin_family_through_every_stage(tmp_path, cli_env, digits):
    env = env_with(install_example(tmp_path / "site"), cli_env)
    spec = write_spec(tmp_path, *digits)
    created = run_hpo("create-study", str(spec), env=env, check=0)
    assert "resnet_small" in created.stdout and "image_folder.npz" in created.stdout, created.stdout

    workers = [subprocess.Popen([*HPO, "worker", "--study", "digits", "--n-trials", "2"], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, out + err
    status = run_hpo("status", "--study", "digits", env=env, check=0)
    assert "4" in status.stdout

    artifacts = tmp_path / "artifacts"
    retrain = run_hpo("retrain", "--study", "digits", "--folds", "3", "--artifacts", str(artifacts), env=env, check=0)
    assert "majority vote" in retrain.stdout, retrain.stdout

    html = tmp_path / "report.html"
    run_hpo("report", "--study", "digits", "--artifacts", str(artifacts), "--out", str(html), env=env, check=0)
    page = html.read_text()
    for text in ("resnet_small", "Model insight", "Weights of each layer", "First-layer filters",
                 "Feature maps of one test image"):  # the sections that apply to any nn.Module with convs
        assert text in page, text
    assert "not drawn" not in page

    out = tmp_path / "export"
    run_hpo("export-best", "--study", "digits", "--artifacts", str(artifacts), "--out", str(out), env=env, check=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_family"] == {"name": "resnet_small", "distribution": "hpo-resnet-small", "version": "0.1.0"}

    # hpo.load in a fresh interpreter with the package installed: the ensemble on raw uint8 pixels
    check = ("import hpo, numpy as np, sys; from PIL import Image; m = hpo.load(sys.argv[1]); "
             "x = np.asarray(Image.open(sys.argv[2]).convert('RGB'), dtype=np.float32).transpose(2, 0, 1)[None]; "
             "print(m.in_shape, len(m.models), m.classes[int(m.predict(x)[0])])")
    one = next((digits[1] / "3").iterdir())
    loaded = subprocess.run([*HPO[:1], "-c", check, str(out), str(one)], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("(3, 8, 8) 3 "), loaded.stdout

    predictions = tmp_path / "pred.csv"
    run_hpo("predict", "--model", str(out), "--input", str(digits[1]), "--output", str(predictions), env=env, check=0)
    import pandas as pd

    frame = pd.read_csv(predictions)
    truth = [Path(f).parent.name for f in frame["file"]]
    assert len(frame) == 60 and set(frame["class"].astype(str)) <= {str(i) for i in range(10)}
    accuracy = float(np.mean(frame["class"].astype(str).to_numpy() == np.asarray(truth)))
    assert accuracy > 0.2, accuracy  # ten classes: chance is 0.1, even after a few epochs on 240 images
    single = run_hpo("predict", "--model", str(out), "--input", str(one), "--output", "-", env=env, check=0)
    assert single.stdout.splitlines()[0] == "file,prediction,class" and len(single.stdout.splitlines()) == 2

    # Without the package: the export names what to install, in one line.
    missing = run_hpo("predict", "--model", str(out), "--input", str(one), "--output", "-", env=cli_env, check=2)
    assert missing.stderr.strip().endswith("which is not installed here: pip install 'hpo-resnet-small==0.1.0'")
    assert missing.stderr.count("\n") == 1


def test_a_worker_with_another_version_of_the_family_refuses_unless_allowed(tmp_path, cli_env, digits):
    spec = write_spec(tmp_path, *digits, budget={"n_trials": 1})
    run_hpo("create-study", str(spec), env=env_with(install_example(tmp_path / "v1"), cli_env), check=0)
    newer = env_with(install_example(tmp_path / "v2", version="0.2.0"), cli_env)
    refused = run_hpo("worker", "--study", "digits", env=newer, check=2)
    assert refused.stderr.strip() == (
        "hpo: error: study 'digits': model family 'resnet_small': the study was created with hpo-resnet-small "
        "0.1.0, this machine has hpo-resnet-small 0.2.0: pip install 'hpo-resnet-small==0.1.0', "
        "or pass --allow-version-mismatch")
    import optuna

    assert optuna.load_study(study_name="digits", storage=cli_env["HPO_STORAGE"]).trials == []
    absent = run_hpo("worker", "--study", "digits", env=cli_env, check=2)
    assert absent.stderr.strip() == ("hpo: error: study 'digits' uses model family 'resnet_small' from "
                                     "hpo-resnet-small 0.1.0, which is not installed here: "
                                     "pip install 'hpo-resnet-small==0.1.0'")
    run_hpo("worker", "--study", "digits", "--allow-version-mismatch", env=newer, check=0)
    trial = optuna.load_study(study_name="digits", storage=cli_env["HPO_STORAGE"]).trials[0]
    assert trial.user_attrs["version_mismatch"].endswith("this machine has hpo-resnet-small 0.2.0")


@pytest.mark.parametrize("change, expected", [
    ({"data": {"source": "parquet_folder"}}, "data.source: got 'parquet_folder'; allowed: csv, fashion_mnist, mnist"),
    ({"fixed": {"depth": 3}}, "fixed.depth: unknown hyperparameter 'depth' of model 'resnet_small'"),
    ({"fixed": {"blocks": 7}}, "fixed.blocks: got 7; allowed: an integer in [1, 6]"),
])
def test_bad_plugin_specs_are_refused_in_one_line_with_nothing_written(tmp_path, cli_env, digits, change, expected):
    env = env_with(install_example(tmp_path / "site"), cli_env)
    spec = write_spec(tmp_path, *digits, **change)
    proc = run_hpo("create-study", str(spec), env=env, check=2)
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "store").exists()
