"""hpo report: the page from a real study, sections that say what to run, bad input, and the
size and speed of a 300-trial study with a 10-fold retrain."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from conftest import run_hpo, small_regression_spec

from hpo.errors import DataError
from hpo.nn.models import build_model
from hpo.retrain.results import save_retrain
from hpo.search.study import open_study
from hpo.store.artifacts import open_artifact_store
from hpo.store.storage import open_storage

MLP_HP = {"n_layers": 2, "width": [16, 8], "dropout": 0.0, "activation": "relu", "init": "default"}
FIGURE_DIV = re.compile(r'<div id="figure-\d+" class="plotly-graph-div"')


def write_contract_retrain(study: optuna.Study, artifact_store, folder: Path, *, folds: int, task: str,
                           in_shape: tuple[int, ...], classes: list[str] | None = None, epochs: int = 30,
                           n_test: int = 100, hp: dict | None = None, family: str = "mlp", seed: int = 0) -> None:
    """A retrain that follows hpo.retrain.results' file contract, recorded with save_retrain (no training)."""
    rng = np.random.default_rng(seed)
    hp = hp or MLP_HP
    out_features = len(classes) if task == "classification" else 1
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(folds):
        torch.manual_seed(seed + i)
        model = build_model(family, hp, in_shape=in_shape, out_features=out_features)
        torch.save(model.state_dict(), folder / f"fold_{i}.pt")
        files[f"fold_{i}.pt"] = folder / f"fold_{i}.pt"
    per_fold = [{"fold": i, "val_loss": float(rng.uniform(0.2, 0.4)), "val_metric": float(rng.uniform(0.8, 0.9)),
                 "test_loss": float(rng.uniform(0.2, 0.4)), "test_metric": float(rng.uniform(0.8, 0.9)),
                 "epochs_run": epochs} for i in range(folds)]
    best = int(np.argmax([f["test_metric"] for f in per_fold]))
    metrics = {"task": task, "folds": folds, "seed": seed, "trial_number": study.best_trial.number,
               "params": study.best_trial.params, "hyperparams": hp, "path": "sequential", "train_seconds": 12.5,
               "model_epochs_per_s": 24.0, "per_fold": per_fold, "best_fold": best, "classes": classes or []}
    curves = {"folds": [{"epoch": list(range(1, epochs + 1)),
                         "train_loss": list(np.exp(-np.linspace(0, 3, epochs)) + rng.uniform(0, .05, epochs)),
                         "val_loss": list(np.exp(-np.linspace(0, 2, epochs)) + rng.uniform(0, .1, epochs)),
                         "val_metric": list(np.linspace(0.5, 0.9, epochs))} for _ in range(folds)]}
    if task == "classification":
        k = len(classes)
        y = rng.integers(0, k, n_test)
        outputs = rng.normal(size=(folds, n_test, k)).astype(np.float32)
        vote = rng.integers(0, k, n_test)
        metrics["ensemble"] = {"majority_vote": {"test_metric": 0.91}, "soft_vote": {"test_loss": 0.2, "test_metric": 0.915}}
        metrics["confusion"] = {"best": rng.integers(0, 50, (k, k)).tolist(),
                                "majority_vote": rng.integers(0, 50, (k, k)).tolist()}
        np.savez(folder / "predictions.npz", y_test=y, fold_outputs=outputs, majority_vote=vote, soft_vote=vote)
    else:
        grid = np.linspace(-3, 3, 200)
        metrics["ensemble"] = {"mean": {"test_loss": 0.25, "test_metric": 0.25}}
        np.savez(folder / "predictions.npz", y_test=rng.normal(size=(n_test, 1)),
                 fold_outputs=rng.normal(size=(folds, n_test, 1)), ensemble_mean=rng.normal(size=(n_test, 1)),
                 grid_x=grid, grid_best=np.sin(grid), grid_mean=np.sin(grid) * 0.9)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "curves.json").write_text(json.dumps(curves))
    (folder / "model.json").write_text(json.dumps({
        "family": family, "in_shape": list(in_shape), "out_features": out_features, "task": task,
        "hyperparams": hp, "normalization": {"mean": [0.5], "std": [1.2]}, "classes": classes or []}))
    for name in ("metrics.json", "curves.json", "predictions.npz", "model.json"):
        files[name] = folder / name
    record_retrain(study, artifact_store, trial_number=study.best_trial.number, folds=folds, files=files)


def record_retrain(study: optuna.Study, artifact_store, *, trial_number: int, folds: int, files: dict) -> None:
    save_retrain(study, artifact_store, trial_number=trial_number, folds=folds, files=files,
                 summary={"ensemble_test_metric": 0.9})


TINY_SPACE = {
    "n_layers": {"int": [1, 2]},
    "width": {"int": [8, 32], "per_layer": "n_layers"},
    "batch_size": {"int": [16, 50]},
    "epochs": {"int": [10, 20], "step": 10},
    "lr": {"float": [1.0e-3, 1.0e-2], "log": True},
    "weight_decay": {"float": [1.0e-7, 1.0e-3], "log": True},
    "optimizer": {"choice": ["Adam", "SGD"]},
    "momentum": {"float": [0.0, 0.9], "when": {"optimizer": ["SGD"]}},
}


def tiny_spec(tmp_path: Path, name: str) -> Path:
    """The regression spec with small models and few epochs: 6 real trials in a few seconds."""
    return small_regression_spec(tmp_path, name=name, budget={"n_trials": 6}, space=TINY_SPACE,
                                 pruner={"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 5})


def report_text(path: Path) -> str:
    """The page's text, checked: every figure has its div, none failed, plotly.js once, no fetches."""
    text = path.read_text()
    assert text.count("Plotly.newPlot(") == len(FIGURE_DIV.findall(text))
    assert "not drawn" not in text, re.findall(r"[^>]*not drawn[^<]*", text)
    assert text.count("<script type=\"text/javascript\">/**") == 1
    assert not re.search(r"<script[^>]+src=", text)
    return text


@pytest.mark.slow
def test_report_without_retrain_then_with(tmp_path, cli_env, store_url):
    study = _synthetic_study(open_storage(store_url, heartbeat=False), "rep", n_trials=20, steps=10)
    out = tmp_path / "r.html"
    proc = run_hpo("report", "--study", "rep", "--out", str(out), env=cli_env, check=0)
    assert "wrote" in proc.stdout and out.exists()
    text = report_text(out)
    for section in ("statistics", "history", "importances", "contour", "parallel", "intermediate", "timeline"):
        assert f'<section id="{section}">' in text
    assert text.count("run: hpo retrain --study rep") == 2  # retrain and insight both say what to run
    assert len(FIGURE_DIV.findall(text)) == 6

    write_contract_retrain(study, open_artifact_store(store_url), tmp_path / "retrain", folds=3,
                           task="regression", in_shape=(1,))
    from hpo.report.html import write_report

    text = report_text(write_report("rep", storage_url=store_url, out=out))
    assert out.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable as umask allows
    assert "run: hpo retrain" not in text
    for section in ("retrain", "curves", "fit", "insight"):
        assert f'<section id="{section}">' in text
    # per-fold bars, curves, fit, weight histograms, activation profiles
    assert len(FIGURE_DIV.findall(text)) == 6 + 5
    assert text.count("no training data") == 2  # the two gaps of the seed data set are shaded


def test_images_classification_retrain_sections(tmp_path, store_url):
    """An MLP on 8x8 images: confusion matrices with class names, receptive fields, activation maximisation."""
    storage = open_storage(store_url, heartbeat=False)
    study = _synthetic_study(storage, "img", n_trials=12, steps=5)
    classes = ["zero", "one", "two"]
    write_contract_retrain(study, open_artifact_store(store_url), tmp_path / "retrain", folds=2,
                           task="classification", in_shape=(1, 8, 8), classes=classes)
    from hpo.report.html import write_report

    path = write_report("img", storage_url=store_url, out=tmp_path / "img.html")
    text = report_text(path)
    for title in ("Confusion matrices", "Receptive fields", "Activation maximisation", "majority vote", "soft vote"):
        assert title in text
    assert '"two"' in text  # class names label the heatmaps

    # The retrain's files are elsewhere: the page still comes out and says how to point at them.
    path = write_report("img", storage_url=store_url, artifacts=str(tmp_path / "elsewhere"), out=tmp_path / "x.html")
    text = report_text(path)
    assert "cannot be read from the artifact store" in text and "pass --artifacts DIR" in text


def test_cnn_insight_on_fashion_mnist(tmp_path, store_url):
    """A CNN retrain: first-layer filters and feature maps of a real Fashion-MNIST test image."""
    from hpo.data.images import find_idx_files
    from hpo.search.space import hyperparams_from_params

    try:
        find_idx_files("fashion_mnist", download=False)
    except DataError as e:  # only "not found" skips: any other failure fails the test
        pytest.skip(f"Fashion-MNIST files not found: {e}")
    storage = open_storage(store_url, heartbeat=False)
    study = _synthetic_study(storage, "cnn", n_trials=12, steps=3, spec_name="fmnist-cnn")
    _, spec = open_study("cnn", storage)
    hp = hyperparams_from_params(spec, study.best_trial.params)
    write_contract_retrain(study, open_artifact_store(store_url), tmp_path / "retrain", folds=2, family="cnn",
                           hp=hp, task="classification", in_shape=(1, 28, 28), classes=[f"c{i}" for i in range(10)])
    from hpo.report.html import write_report

    text = report_text(write_report("cnn", storage_url=store_url, out=tmp_path / "cnn.html"))
    for title in ("First-layer filters", "Feature maps of one test image", "Weights of each layer"):
        assert title in text
    assert "Receptive fields" not in text


def _synthetic_study(storage, name: str, *, n_trials: int, steps: int, seed: int = 0,
                     spec_name: str = "regression") -> optuna.Study:
    """A study of the regression spec filled with fake values by ask/tell (no training): built in
    memory, then copied into the store in one go."""
    from dataclasses import replace

    from hpo.data.tables import embed_csv
    from hpo.search.space import suggest
    from hpo.search.study import create
    from hpo.spec.schema import find_spec_file, load_spec_file

    spec = embed_csv(load_spec_file(find_spec_file(spec_name)))
    rng = np.random.default_rng(seed)
    scratch = optuna.create_study(direction=spec.direction, sampler=optuna.samplers.RandomSampler(seed=seed))
    for i in range(n_trials):
        trial = scratch.ask()
        suggest(trial, spec)
        value = 1.0
        pruned = i > 10 and rng.random() < 0.8
        for step in range(1, (steps // 3 if pruned else steps) + 1):
            value = float(np.exp(-step / steps) + rng.uniform(0, 0.5))
            trial.report(value, step * 10)
        scratch.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else None,
                     values=None if pruned else value)
    study = create(replace(spec, name=name), storage)
    study.add_trials(scratch.get_trials(deepcopy=False))
    return study


def test_bad_input(tmp_path, cli_env, store_url):
    proc = run_hpo("report", "--study", "nope", env=cli_env, check=2)
    assert "no study named 'nope'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    _synthetic_study(open_storage(store_url, heartbeat=False), "empty", n_trials=0, steps=0)
    out = tmp_path / "empty.html"
    proc = run_hpo("report", "--study", "empty", "--out", str(out), env=cli_env, check=2)
    assert "has no trials yet; run: hpo worker --study empty" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_300_trials_10_folds_is_light_and_fast(tmp_path, store_url):
    storage = open_storage(store_url, heartbeat=False)
    study = _synthetic_study(storage, "big", n_trials=300, steps=100)
    write_contract_retrain(study, open_artifact_store(store_url), tmp_path / "retrain", folds=10,
                           task="classification", in_shape=(1, 28, 28), classes=[f"c{i}" for i in range(10)],
                           epochs=100, n_test=10_000, hp={**MLP_HP, "width": [256, 128]})
    from hpo.report.html import write_report

    start = time.perf_counter()
    path = write_report("big", storage_url=store_url, out=tmp_path / "big.html")
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"300 trials + 10-fold retrain: {seconds:.1f} s, {size / 1e6:.2f} MB")
    report_text(path)
    assert seconds < 30 and size < 15e6


def test_one_trial_degrades_to_plain_messages(tmp_path, store_url):
    _synthetic_study(open_storage(store_url, heartbeat=False), "one", n_trials=1, steps=3)
    from hpo.report.html import write_report

    text = report_text(write_report("one", storage_url=store_url, out=tmp_path / "one.html"))
    assert "parameter importances need at least 2 complete trials" in text
    assert "the contour needs two parameters" in text
    assert "parallel coordinates need at least 2 complete trials" in text
    assert len(FIGURE_DIV.findall(text)) == 3  # history, intermediate values, timeline


def test_spec_block_as_written_and_timeline_title_by_workers(tmp_path, store_url):
    """The spec block shows the data paths as the spec's author wrote them and the chosen pruner's
    settings only; the timeline's title counts the workers that ran the trials."""
    import html

    from hpo.data.tables import embed_csv
    from hpo.report.html import write_report
    from hpo.report.study_figures import timeline_title
    from hpo.search.study import create
    from hpo.spec.schema import find_spec_file, load_spec_file

    study = create(embed_csv(load_spec_file(find_spec_file("regression"))), open_storage(store_url, heartbeat=False))
    for i, worker in enumerate(["host:1", "host:2", "host:1"]):
        study.add_trial(optuna.trial.create_trial(value=1.0 / (i + 1), user_attrs={"worker": worker}))
    text = html.unescape(write_report("regression", storage_url=store_url, out=tmp_path / "r.html").read_text())
    spec_block = text[text.index("<h3>Spec</h3>"):]
    spec_block = spec_block[:spec_block.index("</pre>")]
    assert "train: data/regression_train.csv\n" in spec_block and "test: data/regression_test.csv\n" in spec_block
    assert str(find_spec_file("regression").parent) not in spec_block and "as_written" not in spec_block
    assert "pruner:\n  kind: median\n  n_startup_trials: 5\n  n_warmup_steps: 50\n  interval_steps: 1\n" in spec_block
    assert "min_resource" not in spec_block and "reduction_factor" not in spec_block
    assert '<section id="timeline"><h2>Timeline (2 workers)</h2>' in text
    one = [optuna.trial.create_trial(value=1.0, user_attrs={"worker": "host:7"})]
    assert timeline_title(one) == "Timeline (1 worker)"
    assert timeline_title([optuna.trial.create_trial(value=1.0)]) == "Timeline"

    from hpo.errors import HpoError

    too_long = tmp_path / ("r" * 300 + ".html")
    with pytest.raises(HpoError, match=r"^--out: cannot write the report to .*: File name too long$"):
        write_report("regression", storage_url=store_url, out=too_long)


def test_out_folder_gets_the_report_inside(tmp_path, store_url, cli_env):
    """``--out DIR/`` (new or existing) and ``--out DIR`` (existing) write DIR/STUDY.html."""
    _synthetic_study(open_storage(store_url, heartbeat=False), "one", n_trials=1, steps=3)
    from hpo.report.html import write_report

    assert write_report("one", storage_url=store_url, out=f"{tmp_path / 'new'}/") == tmp_path / "new" / "one.html"
    assert write_report("one", storage_url=store_url, out=tmp_path / "new") == tmp_path / "new" / "one.html"
    assert write_report("one", storage_url=store_url, out=tmp_path / "r.html") == tmp_path / "r.html"
    proc = run_hpo("report", "--study", "one", "--out", f"{tmp_path / 'cli'}/", env=cli_env, check=0)
    assert (tmp_path / "cli" / "one.html").is_file() and str(tmp_path / "cli" / "one.html") in proc.stdout
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["one.html"]


def test_a_report_replaces_only_an_earlier_report(tmp_path, store_url):
    _synthetic_study(open_storage(store_url, heartbeat=False), "one", n_trials=1, steps=3)
    from hpo.errors import HpoError
    from hpo.report.html import write_report

    mine = tmp_path / "notes.html"
    mine.write_text("<html><title>my notes</title></html>")
    with pytest.raises(HpoError, match=r"notes.html exists and is not an hpo report"):
        write_report("one", storage_url=store_url, out=mine)
    assert mine.read_text() == "<html><title>my notes</title></html>"
    path = write_report("one", storage_url=store_url, out=tmp_path / "r.html")
    assert write_report("one", storage_url=store_url, out=path) == path  # an earlier report: replaced


def trials_data(text: str) -> dict:
    """The trials table's data, as the page's script reads it."""
    raw = re.search(r'<script type="application/json" id="trials-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def test_trials_table_spec_as_written_and_few_trial_importances(tmp_path, store_url):
    """A study made from the shipped spec file: the spec block is the file's text (comments and all),
    the importances of 8 complete trials say they are not yet meaningful, and the trials table holds
    every trial, a re-queued FAIL as interrupted."""
    import html

    from hpo.report.html import write_report
    from hpo.search.space import suggest
    from hpo.search.study import create_from_file
    from hpo.spec.schema import find_spec_file
    from hpo.store.budget import RETRY_HISTORY_ATTR

    study, spec, _ = create_from_file("regression", storage_url=store_url)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(8):
        trial = scratch.ask()
        suggest(trial, spec)
        scratch.tell(trial, 1.0 / (i + 1))
    stopped = scratch.ask()
    suggest(stopped, spec)
    scratch.tell(stopped, state=optuna.trial.TrialState.FAIL)
    study.add_trials(scratch.get_trials(deepcopy=False))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=study.trials[8].params,
        distributions=study.trials[8].distributions, system_attrs={RETRY_HISTORY_ATTR: [8]}))
    text = write_report("regression", storage_url=store_url, out=tmp_path / "r.html").read_text()

    written = find_spec_file("regression").read_text()
    assert "# The seed regression study" in written
    assert f"<h3>Spec</h3><p>As written in its file at create-study.</p><pre>{html.escape(written)}</pre>" in text
    assert "only 8 complete trials: importances from fewer than ~20 are not yet meaningful" in text
    assert '<tr><th>failed trials</th><td>0</td></tr><tr><th>interrupted (re-queued)</th><td>1</td></tr>' in text
    data = trials_data(text)
    assert data["columns"][:5] == ["number", "state", "value", "duration (s)", "worker"]
    assert "n_layers" in data["columns"] and "lr" in data["columns"]
    assert [r[0] for r in data["rows"]] == list(range(10))
    assert [r[1] for r in data["rows"]][7:] == ["COMPLETE", "FAIL (interrupted, re-queued)", "WAITING"]
    assert data["rows"][0][2] == 1.0 and data["rows"][9][2] is None
    assert '<section id="trials"><h2>All trials (10)</h2>' in text


def test_parallel_coordinates_integer_parameters_get_whole_ticks():
    from optuna.distributions import FloatDistribution, IntDistribution

    from hpo.report.study_figures import integer_ticks

    study = optuna.create_study()
    for i, (n, width) in enumerate([(1, 128), (3, 256), (2, 200), (1, 131)]):
        study.add_trial(optuna.trial.create_trial(
            value=float(i), params={"n_layers": n, "width": width, "lr": 10.0 ** -(i + 1)},
            distributions={"n_layers": IntDistribution(1, 3), "width": IntDistribution(128, 256),
                           "lr": FloatDistribution(1e-5, 1e-1, log=True)}))
    fig = optuna.visualization.plot_parallel_coordinate(study)
    labels = list(fig.layout.xaxis.ticktext)

    def ticks(name: str) -> list[str]:
        return [a.text for a in sorted(fig.layout.annotations, key=lambda a: a.y) if a.x == labels.index(name)]

    assert "1.5" in ticks("n_layers")  # Optuna's own: five evenly spaced ticks
    lr_ticks = ticks("lr")
    integer_ticks(fig, study.trials)
    assert ticks("n_layers") == ["1", "2", "3"]
    assert all(t.isdigit() for t in ticks("width")) and ticks("width")[0] == "128" and len(ticks("width")) <= 6
    assert ticks("lr") == lr_ticks  # a log-scaled float keeps its ticks
    n_axis = labels.index("n_layers")
    placed = {a.text: a.y for a in fig.layout.annotations if a.x == n_axis}
    assert placed["1"] == pytest.approx(0) and placed["2"] == pytest.approx(0.5) and placed["3"] == pytest.approx(1)
