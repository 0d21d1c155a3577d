"""Warm starts: `hpo enqueue` sets run first and exactly once across two workers, within the
budget; a set outside the space is refused naming it; `create-study --warm-start` queues only the
configurations that fit the new space."""

from __future__ import annotations

import json
import os

import optuna
import yaml
from conftest import run_hpo
from optuna.trial import TrialState
from test_parallel import budget_trials, create, fast_spec, start_worker

SETS = [{"n_layers": 1, "width_l0": 130, "lr": 0.001, "optimizer": "Adam"},
        {"n_layers": 2, "lr": 0.005},
        {"batch_size": 7, "epochs": 10}]


def test_enqueued_sets_run_first_and_once(tmp_path, store_url):
    create(fast_spec(tmp_path, 6), store_url)
    env = dict(os.environ, HPO_STORAGE=store_url, PYTHONUNBUFFERED="1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([SETS[0], {"n_layers": 4}]))
    refused = run_hpo("enqueue", "--study", "regression", "--params", str(bad), env=env, check=2)
    assert refused.stderr.count("\n") == 1 and f"{bad}: [1].n_layers: got 4; allowed: an integer in [1, 3]" in refused.stderr
    assert optuna.load_study(study_name="regression", storage=store_url).trials == []  # nothing queued
    good = tmp_path / "sets.json"
    good.write_text(json.dumps(SETS))
    run_hpo("enqueue", "--study", "regression", "--params", str(good), env=env, check=0)

    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start_worker(env, "regression", log) for log in logs]
    for p, log in zip(procs, logs):
        assert p.wait(timeout=900) == 0, log.read_text()
    trials = optuna.load_study(study_name="regression", storage=store_url).trials
    assert len(trials) == 6 and len(budget_trials(store_url, "regression")) == 6
    for number, wanted in enumerate(SETS):  # the first trials are the sets, each run once
        assert trials[number].state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert all(trials[number].params[k] == v for k, v in wanted.items())
        assert sum(all(t.params.get(k) == v for k, v in wanted.items()) for t in trials) == 1


def test_warm_start_takes_only_fitting_configurations(tmp_path, store_url):
    create(fast_spec(tmp_path, 6, name="old"), store_url)
    env = dict(os.environ, HPO_STORAGE=store_url)
    run_hpo("worker", "--study", "old", env=env, check=0, timeout=900)
    new = fast_spec(tmp_path, 4, name="new")
    raw = yaml.safe_load(new.read_text())
    raw["space"]["width"]["int"] = [128, 200]  # narrower than old's [128, 256]
    new.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run_hpo("create-study", str(new), "--warm-start", "old", "--top", "6", env=env, check=0).stdout

    old = optuna.load_study(study_name="old", storage=store_url)
    ranked = sorted((t for t in old.trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, t.number))

    def fits(t):
        return all(v <= 200 for k, v in t.params.items() if k.startswith("width_l"))

    fitting = [t.params for t in ranked[:6] if fits(t)]
    skipped = [t for t in ranked[:6] if not fits(t)]
    assert fitting and skipped, "the old study should have trials with widths on both sides of 200"
    assert f"queued {len(fitting)} of the best 6 trials of 'old'" in out
    assert out.count("warm start: skipped trial ") == len(skipped) and "width_l" in out
    queued = optuna.load_study(study_name="new", storage=store_url).trials
    assert [t.state for t in queued] == [TrialState.WAITING] * len(fitting)
    assert [t.system_attrs["fixed_params"] for t in queued] == fitting
    assert "no study named 'nope'" in run_hpo("create-study", str(new), "--force", "--warm-start", "nope",
                                              env=env, check=2).stderr
