"""``model: {choice: [...]}``: a searched model family, parsed and refused as one-family specs are."""

from __future__ import annotations

import copy
import re

import optuna
import pytest
import yaml
from conftest import run_hpo

from hpo.errors import SpecError
from hpo.nn import registry
from hpo.search.space import hyperparams_from_params, suggest
from hpo.spec.schema import FAMILY, parse_spec

CNN_ONLY = {n for n, hp in registry.family("cnn").hyperparameters.items()} - set(registry.family("mlp").hyperparameters)
MLP_ONLY = {n for n, hp in registry.family("mlp").hyperparameters.items()} - set(registry.family("cnn").hyperparameters)

RAW = {
    "name": "cnn-vs-mlp", "direction": "maximize", "metric": "val_accuracy",
    "data": {"source": "fashion_mnist", "val_fraction": 0.2, "train_subset": 600, "val_subset": 200},
    "model": {"choice": ["mlp", "cnn"]},
    "space": {
        "lr": {"float": [1.0e-3, 1.0e-2], "log": True},
        "n_layers": {"int": [1, 3], "when": {"model": "mlp"}},
        "width": {"int": [16, 64], "per_layer": "n_layers", "when": {"model": ["mlp"]}},
        "n_conv": {"int": [1, 2], "when": {"model": "cnn"}},
        "filters": {"int": [4, 16], "per_layer": "n_conv", "when": {"model": "cnn"}},
        "batch_norm": {"choice": [True, False], "when": {"model": "cnn"}},
        "init": {"choice": ["default", "glorot"]},
        "optimizer": {"choice": ["Adam", "SGD"]},
        "momentum": {"float": [0.5, 0.9], "when": {"optimizer": "SGD"}},
    },
    "fixed": {"epochs": 1, "batch_size": 64, "dense_width": 32, "n_dense": 1},
    "sampler": {"kind": "random"},
    "budget": {"n_trials": 8},
}


def with_(**changes):
    raw = copy.deepcopy(RAW)
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return raw


def test_the_spec_round_trips_and_each_family_sees_its_own_parameters_only():
    spec = parse_spec(RAW)
    assert spec.families == ("mlp", "cnn") and spec.searches_family and spec.model == "mlp|cnn"
    assert parse_spec(spec.to_dict()) == spec
    assert spec.to_dict()["model"] == {"choice": ["mlp", "cnn"]}
    mlp, cnn = spec.for_family("mlp"), spec.for_family("cnn")
    assert {p.name for p in mlp.space} == {"lr", "n_layers", "width", "init", "optimizer", "momentum"}
    assert {p.name for p in cnn.space} == {"lr", "n_conv", "filters", "batch_norm", "init", "optimizer", "momentum"}
    assert all(FAMILY not in p.when for p in (*mlp.space, *cnn.space))
    assert set(mlp.fixed) == {"epochs", "batch_size"} and set(cnn.fixed) == {"epochs", "batch_size", "dense_width", "n_dense"}
    with pytest.raises(SpecError, match="not 'resnet'"):
        spec.for_family("resnet")


def test_a_trial_draws_its_family_first_and_never_a_parameter_of_the_other():
    spec = parse_spec(RAW)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        hp = suggest(trial, spec)
        family = spec.family_of(hp)
        seen.add(family)
        names = {re.sub(r"_l\d+$", "", n) for n in trial.params}  # width_l0 -> width
        assert next(iter(trial.params)) == FAMILY and trial.params[FAMILY] == family
        assert not names & (MLP_ONLY if family == "cnn" else CNN_ONLY), (family, trial.params)
        assert hyperparams_from_params(spec, trial.params) == hp  # a finished trial's hp rebuilt from its params
        study.tell(trial, 0.0)
    assert seen == {"mlp", "cnn"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"space__n_conv__when": None}, r"space.n_conv: is a parameter of model cnn only: add when: \{model: \[cnn\]\}"),
    ({"space__width__when": {"model": ["mlp", "cnn"]}}, r"space.width.when.model\[1\]: got 'cnn'; allowed: mlp"),
    ({"space__n_conv__when": {"model": "resnet"}}, r"space.n_conv.when.model\[0\]: got 'resnet'"),
    ({"model": {"choice": ["mlp"]}}, "model.choice: got .*; allowed: a list of at least two different families"),
    ({"model": {"choice": ["mlp", "mlp"]}}, "model.choice: got"),
    ({"model": {"choice": ["mlp", "resnet"]}}, r"model.choice\[1\]: got 'resnet'"),
    ({"model": {"pick": ["mlp", "cnn"]}}, "model.pick: unknown key"),
    ({"fixed__kernel_sise": 3}, "fixed.kernel_sise: unknown hyperparameter"),
    ({"space__model": {"choice": ["mlp"]}}, "space.model: is searched by model"),
    ({"fixed__model": "mlp"}, "fixed.model: is the searched family"),
    ({"sampler": {"kind": "grid"}}, "sampler.kind: got 'grid'; allowed: tpe or random with a searched model family"),
    ({"space__filters__per_layer": "n_layers"}, r"space.filters.per_layer: .* \(in the trials of model cnn\)"),
    ({"space__lr": {"float": [1.0, 0.1]}}, r"space.lr.*\(in the trials of model mlp\)"),
])
def test_refused_with_one_line_naming_the_field(changes, message):
    with pytest.raises(SpecError, match=message) as e:
        parse_spec(with_(**changes), source="s.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("s.yaml: ")


def test_create_study_refuses_with_exit_2_and_writes_nothing(tmp_path, cli_env):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(with_(space__n_conv__when=None), sort_keys=False))
    proc = run_hpo("create-study", str(spec), env=cli_env, check=2)
    assert proc.stderr.count("\n") == 1 and "space.n_conv" in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


@pytest.mark.parametrize("multivariate", [True, False])
def test_multivariate_tpe_models_each_familys_own_parameters_together(multivariate):
    """With ``sampler: {kind: tpe, multivariate: true}`` a searched family's parameters are modelled
    jointly per family (Optuna's ``group``), not only those every trial has."""
    from hpo.search.study import build_sampler

    raw = with_(sampler={"kind": "tpe", "n_startup_trials": 4, "multivariate": multivariate})
    spec = parse_spec(raw)
    sampler = build_sampler(spec)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for i in range(12):
        trial = study.ask()
        hp = suggest(trial, spec)
        study.tell(trial, float(i % 5) + (0.5 if hp["model"] == "cnn" else 0.0))
    relative = set(sampler.infer_relative_search_space(study, study.ask()))
    if multivariate:  # each family's own parameters are modelled too, not only the shared ones
        assert {"model", "lr", "n_layers", "n_conv"} <= relative, relative
    else:
        assert relative == set()
