"""Every spec shipped under studies/ creates a study through the CLI, studies/README.md lists each
one, and the regression seed's CV grid runs trials to the end on the CPU."""

from __future__ import annotations

import pytest
import yaml
from conftest import STUDIES, run_hpo
from optuna.trial import TrialState
from test_checkpoint import trials_of
from test_parallel import create

from hpo.running.worker import run_worker

SHIPPED = sorted(p.stem for p in STUDIES.glob("*.yaml"))


def test_the_seed_table_lists_every_shipped_spec():
    table = (STUDIES / "README.md").read_text()
    assert SHIPPED and all(f"`{name}.yaml`" in table for name in SHIPPED)


def test_every_shipped_spec_creates_a_study(cli_env):
    for name in SHIPPED:
        run_hpo("create-study", name, env=cli_env, check=0)
    listed = run_hpo("studies", env=cli_env, check=0).stdout
    assert all(name in listed for name in SHIPPED), listed


@pytest.mark.usefixtures("one_torch_thread")
def test_the_regression_cv_grid_runs_trials_to_the_end(tmp_path):
    raw = yaml.safe_load((STUDIES / "regression-cv.yaml").read_text())
    raw["data"].update(train=str(STUDIES / "data" / "regression_train.csv"), test=str(STUDIES / "data" / "regression_test.csv"))
    raw["fixed"]["epochs"] = 20  # the shipped spec trains 500: a few trials of it are the point here
    raw["budget"]["n_trials"] = 3
    spec = tmp_path / "regression-cv.yaml"
    spec.write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create(spec, url)
    run_worker("regression-cv", storage_url=url, echo=lambda line: None)
    trials = trials_of(url, "regression-cv")
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert len(t.user_attrs["cv_fold_values"]) == 5 and t.user_attrs["cv_score"] == "mean_best"
        assert t.user_attrs["cv_path"] == "stacked"
        assert t.value == pytest.approx(sum(t.user_attrs["cv_fold_values"]) / 5)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # grid points, each once
