"""Studies of several objectives and constrained studies, end to end: real trials, real workers, the
CLI through its entry point (SQLite and the real PostgreSQL)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_hpo, small_regression_spec
from optuna.trial import TrialState
from test_parallel import create, start_worker

from hpo.store.storage import open_storage

MO = [{"metric": "val_mse", "direction": "minimize"}, {"metric": "n_params", "direction": "minimize"}]


def spec_file(tmp_path: Path, name: str, *, epochs=(5, 15), **overrides) -> Path:
    path = small_regression_spec(tmp_path, name=name, **overrides)
    raw = yaml.safe_load(path.read_text())
    raw["space"]["epochs"] = {"int": list(epochs), "step": 5}
    if "objectives" in overrides:
        del raw["metric"], raw["direction"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def independent_pareto(trials: list[optuna.trial.FrozenTrial]) -> dict[int, list[float]]:
    """The non-dominated COMPLETE trials (both objectives minimized), by brute force."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]

    def dominated(t):
        return any(all(a <= b for a, b in zip(o.values, t.values)) and o.values != t.values for o in complete)

    return {t.number: t.values for t in complete if not dominated(t)}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_objectives_two_workers(backend, tmp_path, store_url, request):
    url = store_url if backend == "sqlite" else request.getfixturevalue("pg_url")
    create(spec_file(tmp_path, "mo", objectives=MO, budget={"n_trials": 8},
                     pruner={"kind": "pareto", "n_startup_trials": 2, "n_warmup_steps": 5}), url)
    env = dict(os.environ, HPO_STORAGE=url, PYTHONUNBUFFERED="1")
    procs = [start_worker(env, "mo", tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()

    study = optuna.load_study(study_name="mo", storage=open_storage(url, heartbeat=False))
    assert study.metric_names == ["val_mse", "n_params"]
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert len(t.values) == 2 and t.values[1] == t.user_attrs["n_params"]
        else:  # pruned by the Pareto rule: dominated by more than half of the complete trials then
            k, n = map(int, t.user_attrs["pruned_by"].split("dominated by ")[1].split(" complete")[0].split(" of "))
            assert 2 * k > n
    status = run_hpo("status", "--study", "mo", "--json", env=env, check=0)
    pareto = json.loads(status.stdout)["pareto"]
    assert {m["trial"]: m["values"] for m in pareto} == independent_pareto(trials)
    assert all(m["params"] == trials[m["trial"]].params for m in pareto)
    assert "pareto set of" in run_hpo("studies", env=env, check=0).stdout

    refused = run_hpo("export-best", "--study", "mo", "--out", "-", env=env, check=2)
    assert refused.stderr.count("\n") == 1 and "Pareto trials (" in refused.stderr
    assert ", ".join(str(m["trial"]) for m in pareto) in refused.stderr
    assert run_hpo("retrain", "--study", "mo", env=env, check=2).stderr.count("\n") == 1
    if backend != "sqlite":
        return
    member = str(pareto[0]["trial"])
    run_hpo("retrain", "--study", "mo", "--trial", member, "--folds", "2", "--artifacts", str(tmp_path / "a"),
            env=env, check=0)
    out = tmp_path / "export"
    run_hpo("export-best", "--study", "mo", "--trial", member, "--out", str(out), "--artifacts", str(tmp_path / "a"),
            env=env, check=0)
    params = json.loads((out / "params.json").read_text())
    assert params["trial_number"] == int(member) and params["metrics"] == ["val_mse", "n_params"]
    assert (out / "fold_0.pt").is_file()
    report = tmp_path / "mo.html"
    run_hpo("report", "--study", "mo", "--out", str(report), "--artifacts", str(tmp_path / "a"), env=env, check=0)
    text = report.read_text()
    assert "Pareto-front Plot" in text and "Hypervolume History Plot" in text and '"name":"retrained"' in text


def test_constraints_best_is_feasible(tmp_path, store_url):
    """n_params max 1000 leaves only one-layer networks of the space; val_mse min 0.39 makes the
    trials that fit best infeasible. The random sampler draws the same points whatever the
    constraints, so the study is the same as the run that chose the threshold."""
    create(spec_file(tmp_path, "con", sampler={"kind": "random"}, pruner={"kind": "none"}, budget={"n_trials": 10},
                     constraints={"n_params": {"max": 1000}, "val_mse": {"min": 0.39}}), store_url)
    env = dict(os.environ, HPO_STORAGE=store_url)
    run_hpo("worker", "--study", "con", env=env, check=0, timeout=900)
    trials = optuna.load_study(study_name="con", storage=store_url).get_trials()

    def feasible(t):
        return all(v <= 0 for v in t.constraints.values())

    before = [t for t in trials if t.user_attrs["n_params"] > 1000]
    assert before and all(t.state == TrialState.PRUNED and t.user_attrs["epochs_run"] == 0
                          and not t.intermediate_values and t.user_attrs["feasible"] is False
                          and t.user_attrs["pruned_by"].startswith("infeasible: n_params ") for t in before)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min((t for t in complete if feasible(t)), key=lambda t: t.value)
    # Without the constraint another trial would win: the test sees the filter at work.
    assert min(complete, key=lambda t: t.value).number != best.number
    status = json.loads(run_hpo("status", "--study", "con", "--json", env=env, check=0).stdout)
    assert status["best_trial"] == best.number and status["infeasible"] == len([t for t in trials if not feasible(t)])
    assert "Infeasible trials:" in run_hpo("status", "--study", "con", env=env, check=0).stdout
