"""Cross-validated trials (``cv:``): real trials on the regression seed's data, checked against fold
models trained independently here; stacked against sequential; a killed CV trial resumed on another
worker; the Wilcoxon pruner between folds; two workers sharing the budget; the spec's refusals."""

from __future__ import annotations

import os
import signal
import statistics
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import STUDIES, run_hpo
from optuna.trial import TrialState
from sklearn.model_selection import KFold
from test_checkpoint import FAST_HEARTBEAT, trials_of, wait_for_checkpoint
from test_parallel import budget_trials, create, start_worker

from hpo.data.sources import load_dataset
from hpo.data.splits import folds_digest
from hpo.nn.models import build_model
from hpo.running.worker import run_worker
from hpo.search.cv import kept_key
from hpo.search.space import hyperparams_from_params
from hpo.spec.schema import load_spec_file
from hpo.store.config import Heartbeat
from hpo.training.checkpoint import CheckpointStore, trial_key
from hpo.training.seeds import trial_seed
from hpo.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = {"source": "csv", "train": str(STUDIES / "data" / "regression_train.csv"),
        "test": str(STUDIES / "data" / "regression_test.csv")}


def cv_raw(*, folds: int = 4, score: str = "mean", path: str = "auto", n_trials: int = 2, name: str = "cv",
           **overrides) -> dict:
    return {"name": name, "model": "mlp", "metric": "val_mse", "seed": 5, "data": dict(DATA),
           "fixed": {"n_layers": 1, "width": 16, "epochs": 30, "batch_size": 20},
           "space": {"lr": {"float": [1e-3, 3e-2], "log": True}},
           "cv": {"folds": folds, "score": score, "path": path}, "report_every": 5,
           "pruner": {"kind": "none"}, "budget": {"n_trials": n_trials}, **overrides}


def cv_spec(folder: Path, *, name: str = "cv", **settings) -> Path:
    raw = cv_raw(name=name, **settings)
    spec = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def run_study(folder: Path, spec: Path, name: str = "cv") -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{folder / 'hpo.db'}"
    create(spec, url)
    run_worker(name, storage_url=url, echo=lambda line: None)
    return trials_of(url, name)


def independent_folds(spec_path: Path, trial: optuna.trial.FrozenTrial) -> tuple[list, list]:
    """The trial's K fold models trained here one by one with the trainer, on folds made here with
    scikit-learn: each fold's validation-metric history, and the folds."""
    spec = load_spec_file(spec_path)
    data = load_dataset(spec)
    hp = hyperparams_from_params(spec, trial.params)
    seed = trial_seed(spec.seed, trial.number)
    splits = [(np.sort(tr), np.sort(va)) for tr, va in
              KFold(n_splits=spec.cv.folds, shuffle=True, random_state=spec.seed).split(np.arange(len(data.x)))]
    histories = []
    for i, (tr, va) in enumerate(splits):
        torch.manual_seed(seed * 100 + i)
        model = build_model(spec.model, hp, in_shape=data.in_shape, out_features=data.out_features)
        result = train(model, data, hp, seed=seed * 100 + i, train_idx=torch.from_numpy(tr), val_idx=torch.from_numpy(va))
        histories.append([h[spec.metric] for h in result.history])
    return histories, splits


@pytest.mark.parametrize("path, score, rel", [("sequential", "mean", 1e-6), ("stacked", "mean_best", 1e-3)])
def test_a_cv_trial_reports_the_mean_of_its_folds(tmp_path, path, score, rel):
    spec = cv_spec(tmp_path, path=path, score=score, n_trials=1)
    (trial,) = run_study(tmp_path, spec)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["cv_path"] == path
    histories, splits = independent_folds(spec, trial)
    # the recorded folds are the seeded ones made here
    assert trial.user_attrs["cv_folds_sha256"] == folds_digest(splits)
    assert trial.user_attrs["cv_split"] == "KFold" and trial.user_attrs["cv_fold_seed"] == 5
    pick = min if score == "mean_best" else (lambda h: h[-1])
    folds = [pick(h) for h in histories]
    assert trial.user_attrs["cv_fold_values"] == pytest.approx(folds, rel=rel)
    assert trial.value == pytest.approx(sum(folds) / 4, rel=rel)
    assert trial.user_attrs["cv_std"] == pytest.approx(statistics.pstdev(folds), rel=10 * rel, abs=1e-7)
    for step, value in trial.intermediate_values.items():  # the mean curve, every report_every epochs
        at = [pick(h[:step]) for h in histories]
        assert value == pytest.approx(sum(at) / 4, rel=rel), step
    assert sorted(trial.intermediate_values) == [5, 10, 15, 20, 25, 30]
    # hpo status: the best value as mean ± std of the folds
    env = dict(os.environ, HPO_STORAGE=f"sqlite:///{tmp_path / 'hpo.db'}")
    out = run_hpo("status", "--study", "cv", env=env, check=0).stdout
    assert f"value {trial.value:.6g} ± {trial.user_attrs['cv_std']:.6g} (mean ± std of 4 folds)" in out, out


def test_same_seed_same_folds_and_values_and_stacked_equals_sequential(tmp_path):
    runs = {}
    for label, path in (("a", "stacked"), ("b", "stacked"), ("seq", "sequential")):
        runs[label] = run_study(tmp_path / label, cv_spec(tmp_path / label, path=path))
    for a, b in zip(runs["a"], runs["b"]):  # same seed: the very same trials
        assert a.params == b.params and a.value == b.value
        assert a.user_attrs["cv_fold_values"] == b.user_attrs["cv_fold_values"]
        assert a.user_attrs["cv_folds_sha256"] == b.user_attrs["cv_folds_sha256"]
    for a, s in zip(runs["a"], runs["seq"]):  # stacked and sequential: test_stacked's tolerance
        assert a.params == s.params and a.user_attrs["cv_folds_sha256"] == s.user_attrs["cv_folds_sha256"]
        assert a.user_attrs["cv_fold_values"] == pytest.approx(s.user_attrs["cv_fold_values"], rel=1e-3, abs=1e-5)


def test_wilcoxon_prunes_a_configuration_worse_on_every_fold_and_keeps_the_best(tmp_path):
    spec = cv_spec(tmp_path, n_trials=2, pruner={"kind": "wilcoxon", "p_threshold": 0.2})
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create(spec, url)
    study = optuna.load_study(study_name="cv", storage=url)
    study.enqueue_trial({"lr": 3e-2})  # good
    study.enqueue_trial({"lr": 1e-3})  # 30 epochs at lr 1e-3: far from fitted on every fold
    run_worker("cv", storage_url=url, echo=lambda line: None)
    best, worse = trials_of(url, "cv")
    assert best.state == TrialState.COMPLETE and best.user_attrs["cv_path"] == "sequential"
    assert sorted(best.intermediate_values) == [0, 1, 2, 3]  # step = fold index
    assert best.value == pytest.approx(np.mean(best.user_attrs["cv_fold_values"]))
    assert len(best.user_attrs["cv_curve"]) == 30  # the per-epoch mean curve, kept aside
    assert worse.state == TrialState.PRUNED
    # after 3 folds, each worse than the best's same fold, the one-sided test's p is 1/8 < 0.2
    assert sorted(worse.intermediate_values) == [0, 1, 2]
    assert all(worse.intermediate_values[i] > best.intermediate_values[i] for i in range(3))
    assert worse.user_attrs["model_epochs"] == 90


@pytest.mark.slow
@pytest.mark.parametrize("path, how", [("stacked", "sigterm"), ("sequential", "sigkill")])
def test_a_killed_cv_trial_resumes_on_another_worker_with_the_uninterrupted_value(tmp_path, path, how):
    long = {"n_layers": 2, "width": [32, 32], "epochs": 150, "batch_size": 4, "scheduler": "plateau",
            "plateau_patience": 10, "early_stopping": 40}

    def spec_in(folder: Path) -> Path:
        spec = cv_spec(folder, folds=3, path=path, n_trials=1, checkpoint={"every_seconds": 0.05})
        raw = yaml.safe_load(spec.read_text())
        raw["fixed"].update(long)
        raw["space"] = {"lr": {"choice": [2e-3]}}
        spec.write_text(yaml.safe_dump(raw))
        return spec

    (reference,) = run_study(tmp_path / "ref", spec_in(tmp_path / "ref"))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    artifacts = tmp_path / "artifacts"
    env = dict(os.environ, HPO_STORAGE=url, HPO_ARTIFACTS=str(artifacts), **FAST_HEARTBEAT)
    create(spec_in(tmp_path / "run"), url, heartbeat=Heartbeat(interval=1, grace=2))
    store = CheckpointStore.for_study("cv", artifacts=str(artifacts))
    first = start_worker(env, "cv", tmp_path / "first.log")
    try:
        wait_for_checkpoint(store, first, 40 if path == "stacked" else 200)
        first.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = first.wait(timeout=60)
    finally:
        first.kill()
    assert code == (0 if how == "sigterm" else -signal.SIGKILL), (tmp_path / "first.log").read_text()
    left = store.meta(trial_key(0))["epoch"]
    second = start_worker(env, "cv", tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    original, retry = trials_of(url, "cv")
    assert store.keys() == [kept_key(retry.number)]  # the checkpoint is gone; the best trial's folds are kept
    assert original.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] == left
    assert left < reference.user_attrs["model_epochs"] and retry.user_attrs["cv_path"] == path
    assert retry.value == reference.value
    assert retry.user_attrs["cv_fold_values"] == reference.user_attrs["cv_fold_values"]
    assert retry.intermediate_values == reference.intermediate_values
    assert retry.user_attrs["cv_fold_epochs"] == reference.user_attrs["cv_fold_epochs"]


@pytest.mark.slow
def test_two_workers_share_the_budget_of_cv_trials_exactly(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create(cv_spec(tmp_path, n_trials=6, pruner={"kind": "median", "n_startup_trials": 2}), url)
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    procs = [start_worker(env, "cv", tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"w{i}.log").read_text()
    trials = budget_trials(url, "cv")
    assert len(trials) == 6 == len(trials_of(url, "cv"))
    assert all(len(t.user_attrs["cv_fold_epochs"]) == 4 for t in trials if t.state == TrialState.COMPLETE)


def refused(tmp_path: Path, cli_env: dict, raw: dict) -> str:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    proc = run_hpo("create-study", str(spec), env=cli_env, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(spec) in lines[0], proc.stderr
    return lines[0]


def base(**overrides) -> dict:
    return {k: v for k, v in cv_raw(name="base", **overrides).items() if v is not None}


def test_bad_cv_settings_are_refused_in_one_line(tmp_path, cli_env):
    assert "cv.folds: got 1; allowed: an integer >= 2" in refused(tmp_path, cli_env, base(cv={"folds": 1}))
    line = refused(tmp_path, cli_env, base(data={**DATA, "val_fraction": 0.2}))
    assert "data.val_fraction: got 0.2; allowed: nothing with cv" in line
    line = refused(tmp_path, cli_env, base(cv=None, pruner={"kind": "wilcoxon"}))
    assert "pruner.kind: got 'wilcoxon'" in line and "add cv" in line
    line = refused(tmp_path, cli_env, base(pruner={"kind": "wilcoxon", "p_threshold": 0.1}))
    assert "pruner.p_threshold: got 0.1; allowed: a number in (0.125, 1) with cv.folds 4" in line
    assert "cv.score: got 'median'" in refused(tmp_path, cli_env, base(cv={"folds": 3, "score": "median"}))
    # more folds than the rarest class has rows (a CSV classification study: its rows are at hand)
    rows = ["x,y"] + [f"{i},{int(i < 3)}" for i in range(30)]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    data = {"source": "csv", "task": "classification", "train": str(tmp_path / "cls.csv"), "test": str(tmp_path / "cls.csv")}
    line = refused(tmp_path, cli_env, base(data=data, metric="val_accuracy", cv={"folds": 4}))
    assert "cv.folds: 4 stratified folds need at least 4 samples of every class; the rarest class has 3" in line
    assert run_hpo("studies", env=cli_env).stdout.count("base") == 0  # nothing written
