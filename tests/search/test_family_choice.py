"""A searched model family end to end: one study runs trials of both families on real images
(Fashion-MNIST), and whichever family a trial has retrains, exports, loads and predicts."""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pytest
import yaml
from conftest import run_hpo

import hpo
from hpo.nn import registry
from hpo.nn.measures import n_params
from hpo.nn.models import build_model
from hpo.search.space import hyperparams_from_params
from hpo.search.study import open_study
from hpo.store.storage import open_storage

SPEC = {
    "name": "families", "direction": "maximize", "metric": "val_accuracy", "seed": 1,
    "data": {"source": "fashion_mnist", "val_fraction": 0.2, "train_subset": 300, "val_subset": 100},
    "model": {"choice": ["mlp", "cnn"]},
    "space": {
        "lr": {"float": [1.0e-3, 1.0e-2], "log": True},
        "n_layers": {"int": [1, 2], "when": {"model": "mlp"}},
        "width": {"int": [8, 32], "per_layer": "n_layers", "when": {"model": "mlp"}},
        "n_conv": {"int": [1, 2], "when": {"model": "cnn"}},
        "filters": {"int": [2, 6], "per_layer": "n_conv", "when": {"model": "cnn"}},
        "dropout": {"float": [0.0, 0.3]},
    },
    "fixed": {"epochs": 1, "batch_size": 64, "n_dense": 1, "dense_width": 16},
    "sampler": {"kind": "random"},
    "pruner": {"kind": "none"},
    "budget": {"n_trials": 4},
}


@pytest.mark.slow
def test_both_families_run_in_one_study_and_each_winner_exports_and_predicts(tmp_path, cli_env, store_url):
    spec = tmp_path / "families.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    queued = tmp_path / "queued.yaml"
    queued.write_text(yaml.safe_dump([{"model": "mlp"}, {"model": "cnn"}]))  # one trial of each for certain
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    run_hpo("enqueue", "--study", "families", "--params", str(queued), env=cli_env, check=0)
    run_hpo("worker", "--study", "families", env=cli_env, check=0, timeout=600)

    study, parsed = open_study("families", open_storage(store_url, heartbeat=False))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    by_family: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        family = t.params["model"]
        by_family.setdefault(family, []).append(t)
        own = set(registry.vocabulary(family))
        assert {re.sub(r"_l\d+$", "", name) for name in t.params} - {"model"} <= own, t.params  # width_l0 -> width
        hp = hyperparams_from_params(parsed, t.params)
        net = build_model(parsed.family_of(hp), hp, in_shape=(1, 28, 28), out_features=10)
        assert t.user_attrs["n_params"] == n_params(net)  # the trial trained the family it drew
    assert set(by_family) == {"mlp", "cnn"}

    report = tmp_path / "report.html"
    run_hpo("report", "--study", "families", "--out", str(report), env=cli_env, check=0)
    table = re.search(r'<table class="families">(.*?)</table>', report.read_text()).group(1)
    rows = {cells[0]: cells for cells in (re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")) if cells}
    assert set(rows) == {"mlp", "cnn"}
    for family, own in by_family.items():
        best = max(own, key=lambda t: t.value)
        assert rows[family][1] == f"{len(own)} / 0 / 0" and rows[family][3] == f"#{best.number}"
        assert rows[family][4] == f"{best.user_attrs['n_params']:,}"

    images = np.random.default_rng(0).integers(0, 256, size=(12, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    for family, own in by_family.items():
        best = max(own, key=lambda t: t.value)
        artifacts, out = tmp_path / f"artifacts-{family}", tmp_path / f"export-{family}"
        run_hpo("retrain", "--study", "families", "--trial", str(best.number), "--folds", "2", "--epochs", "1",
                "--artifacts", str(artifacts), env=cli_env, check=0, timeout=600)
        run_hpo("export-best", "--study", "families", "--trial", str(best.number), "--artifacts", str(artifacts),
                "--out", str(out), env=cli_env, check=0)
        description = json.loads((out / "model.json").read_text())
        assert description["family"] == family and description["hyperparams"]["model"] == family
        model = hpo.load(out)
        labels = model.predict(images)
        assert labels.shape == (12,)
        predicted = tmp_path / f"predicted-{family}.csv"
        run_hpo("predict", "--model", str(out), "--input", str(tmp_path / "images.npy"), "--output", str(predicted),
                env=cli_env, check=0)
        lines = predicted.read_text().splitlines()
        assert len(lines) == 13  # a header, then one prediction per image
        assert [line.split(",")[-1] for line in lines[1:]] == [model.classes[i] for i in labels.tolist()]
