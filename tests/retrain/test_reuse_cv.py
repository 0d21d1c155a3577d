"""``hpo retrain --reuse-cv``: the best CV trial's own fold models, kept by its worker, become the
retrain's folds; the result equals a retrain that trains them again, and every mismatch is refused."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_hpo
from test_checkpoint import trials_of
from test_cv import cv_spec
from test_parallel import create

from hpo.errors import HpoError
from hpo.retrain.run import run_retrain
from hpo.running.worker import run_worker
from hpo.search.cv import kept_key
from hpo.training.checkpoint import CheckpointStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cv_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create(cv_spec(tmp_path, n_trials=3, score="mean"), url)
    run_worker("cv", storage_url=url, echo=lambda line: None)
    return url, trials_of(url, "cv")


def test_the_reused_folds_are_the_trained_ones_and_only_the_best_trial_keeps_them(tmp_path, cv_study):
    url, trials = cv_study
    best = min(trials, key=lambda t: t.value)
    store = CheckpointStore.for_study("cv", storage_url=url)
    assert [k for k in store.keys() if k.startswith("cv-models-")] == [kept_key(best.number)]

    cpu = torch.device("cpu")
    reused = run_retrain("cv", storage_url=url, device=cpu, reuse_cv=True).metrics
    trained = run_retrain("cv", storage_url=url, device=cpu, folds=4).metrics
    assert reused.trial_number == trained.trial_number == best.number and reused.folds == trained.folds == 4
    assert "--reuse-cv" in reused.path_reason and reused.train_seconds == 0.0
    # each reused fold's validation value is the one the trial scored it by (score: mean, the final value)
    assert [f["val_metric"] for f in reused.per_fold] == pytest.approx(best.user_attrs["cv_fold_values"], rel=1e-6)
    # the same folds, seeds and epochs: retraining gives the very same models
    assert reused.fold_seeds == trained.fold_seeds
    assert [f["test_metric"] for f in reused.per_fold] == pytest.approx([f["test_metric"] for f in trained.per_fold],
                                                                       rel=1e-5)
    assert reused.ensemble["mean"]["test_metric"] == pytest.approx(trained.ensemble["mean"]["test_metric"], rel=1e-5)


def test_every_mismatch_is_refused_in_one_line(tmp_path, cv_study):
    url, trials = cv_study
    best = min(trials, key=lambda t: t.value)
    other = next(t for t in trials if t.number != best.number)
    cpu = torch.device("cpu")
    cases = [
        ({"folds": 3}, "--folds: got 3; --reuse-cv reuses the trial's 4 fold models"),
        ({"epochs": 7}, "--epochs: the fold models of trial .* trained 30 epochs, the retrain asks 7"),
        ({"trial_number": other.number}, f"the fold models of trial {other.number} are not in "),
        ({"full_data": True}, "--full-data/--search-data: not with --reuse-cv"),
        ({"stacked": True}, "--stacked/--sequential: not with --reuse-cv"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HpoError, match=message) as e:
            run_retrain("cv", storage_url=url, device=cpu, reuse_cv=True, **kwargs)
        assert "\n" not in str(e.value)
    # a damaged file is not reused: it is removed with a warning, and the retrain refuses
    store = CheckpointStore.for_study("cv", storage_url=url)
    path = store.path(kept_key(best.number))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HpoError, match="are not in "):
        run_retrain("cv", storage_url=url, device=cpu, reuse_cv=True)
    assert not path.exists()

    env = dict(os.environ, HPO_STORAGE=url)
    proc = run_hpo("retrain", "--study", "cv", "--reuse-cv", env=env, check=2)
    assert proc.stderr.startswith("hpo: error: --reuse-cv: the fold models of trial") and proc.stderr.count("\n") == 1


def test_a_study_without_cv_is_refused(tmp_path, cli_env):
    from conftest import small_regression_spec

    run_hpo("create-study", str(small_regression_spec(tmp_path)), env=cli_env, check=0)
    run_hpo("worker", "--study", "regression", "--n-trials", "1", env=cli_env, check=0)
    proc = run_hpo("retrain", "--study", "regression", "--reuse-cv", env=cli_env, check=2)
    assert "--reuse-cv: study 'regression' has no cross-validated trials" in proc.stderr
