"""`objectives` and `constraints` in a spec: what is taken, and what is refused with one line (the
CLI: exit 2, nothing written)."""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import STUDIES, run_hpo

from hpo.errors import SpecError
from hpo.spec.schema import ConstraintSpec, ObjectiveSpec, parse_spec

MO = [{"metric": "val_mse"}, {"metric": "n_params", "direction": "minimize"}]


def raw_spec(**changes) -> dict:
    raw = yaml.safe_load((STUDIES / "regression.yaml").read_text())
    raw["data"]["train"] = str(STUDIES / "data" / "regression_train.csv")
    raw["data"]["test"] = str(STUDIES / "data" / "regression_test.csv")
    for key in ("metric", "direction", "pruner"):
        raw.pop(key)
    raw.update(changes)
    return raw


def test_objectives_and_constraints_parse_and_round_trip():
    spec = parse_spec(raw_spec(objectives=MO, sampler={"kind": "nsga2", "population_size": 8},
                               constraints={"n_params": {"max": 100000}, "val_mse": {"min": 0.1, "max": 2}}))
    assert spec.objectives == (ObjectiveSpec("val_mse", "minimize"), ObjectiveSpec("n_params", "minimize"))
    assert spec.metric == "val_mse" and spec.multi_objective and spec.pruner.kind == "pareto"  # the default
    assert spec.constraints[0] == ConstraintSpec("n_params", None, 100000.0) and spec.constraints[0].before_training
    assert spec.constraints[1].violations(0.05) == {"val_mse.min": pytest.approx(0.05), "val_mse.max": -1.95}
    assert parse_spec(spec.to_dict()) == spec
    one = parse_spec(raw_spec(objectives=[{"metric": "val_mae"}]))
    assert not one.multi_objective and one.metric == "val_mae" and one.to_dict()["metric"] == "val_mae"


@pytest.mark.parametrize("changes, message", [
    ({"objectives": MO, "metric": "val_mse"}, "metric: given with objectives"),
    ({"objectives": MO, "pruner": {"kind": "median"}}, "pruner.kind: got 'median'; allowed: pareto or none"),
    ({"objectives": MO, "pruner": {"kind": "hyperband"}}, "pruner.kind: got 'hyperband'"),
    ({"constraints": {"val_accuracy": {"min": 0.9}}}, "constraints.val_accuracy: unknown metric 'val_accuracy'"),
    ({"objectives": [{"metric": "val_mse"}, {"metric": "flops"}]}, "objectives[1].metric: got 'flops'"),
    ({"objectives": [{"metric": "n_params"}, {"metric": "latency_ms"}]}, "at least one of val_mse"),
    ({"objectives": [{"metric": "val_mse", "direction": "maximize"}, {"metric": "n_params"}]},
     "objectives[0].direction: got 'maximize'"),
    ({"constraints": {"n_params": {"max": 10, "min": 20}}}, "constraints.n_params.max: got 10"),
    ({"constraints": {"n_params": {}}}, "constraints.n_params: got {}"),
])
def test_refused(changes, message):
    with pytest.raises(SpecError) as e:
        parse_spec(raw_spec(**changes), source="s.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes", [
    {"objectives": MO, "metric": "val_mse"},
    {"objectives": MO, "pruner": {"kind": "median"}},
    {"constraints": {"accuracy": {"min": 0.9}}},
])
def test_cli_refuses_with_one_line_and_writes_nothing(changes, tmp_path, store_url):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**raw_spec(**changes), "name": "bad"}, sort_keys=False))
    env = dict(os.environ, HPO_STORAGE=store_url)
    proc = run_hpo("create-study", str(path), env=env, check=2)
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr
    assert "no studies in the store" in run_hpo("studies", env=env, check=0).stdout
