import optuna
import pytest
import yaml
from conftest import STUDIES

from hpo.search.space import grid_space, hyperparams_from_params, suggest
from hpo.search.study import build_sampler
from hpo.spec.schema import load_spec_file, parse_spec


def spec_with(space: dict, fixed: dict | None = None, **extra):
    raw = yaml.safe_load((STUDIES / "regression.yaml").read_text())
    raw["space"], raw["fixed"] = space, fixed or {}
    raw.update(extra)
    return parse_spec(raw, base_dir=STUDIES)


def sample(spec, n=30, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, suggest(trial, spec)))
        study.tell(trial, 0.0)
    return out


def test_momentum_only_for_sgd_and_rmsprop():
    spec = load_spec_file(STUDIES / "regression.yaml")
    seen = set()
    for trial, hp in sample(spec, 60):
        seen.add(hp["optimizer"])
        assert ("momentum" in trial.params) == (hp["optimizer"] in ("SGD", "RMSprop"))
    assert seen == {"Adam", "SGD", "RMSprop"}


def test_per_layer_widths_follow_the_layer_count():
    spec = load_spec_file(STUDIES / "regression.yaml")
    for trial, hp in sample(spec, 40):
        n = hp["n_layers"]
        assert len(hp["width"]) == n
        assert sorted(k for k in trial.params if k.startswith("width_")) == [f"width_l{i}" for i in range(n)]
        assert all(128 <= w <= 256 for w in hp["width"])


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_width_schedules(schedule):
    spec = spec_with({"n_layers": {"int": [1, 3]}, "width": {"int": [100, 600], "per_layer": "n_layers", "schedule": schedule}})
    for _, hp in sample(spec, 40):
        widths = hp["width"]
        if schedule == "constant":
            assert len(set(widths)) == 1
        else:
            assert widths == sorted(widths, reverse=True)


def test_search_schedule_suggests_the_schedule():
    spec = spec_with({"n_layers": {"choice": [2, 3]}, "width": {"int": [100, 600], "per_layer": "n_layers", "schedule": "search"}})
    schedules = {trial.params["width_schedule"] for trial, _ in sample(spec, 30)}
    assert schedules == {"constant", "decreasing"}


def test_fixed_values_and_defaults_fill_the_rest():
    spec = spec_with({"lr": {"float": [1e-3, 1e-2], "log": True}}, fixed={"n_layers": 2, "width": [64, 32]})
    _, hp = sample(spec, 1)[0]
    assert hp["n_layers"] == 2 and hp["width"] == [64, 32] and hp["optimizer"] == "Adam"


def test_int_step_and_log():
    spec = spec_with({"epochs": {"int": [100, 1000], "step": 50}, "lr": {"float": [1e-4, 1e-2], "log": True}})
    for _, hp in sample(spec, 30):
        assert hp["epochs"] % 50 == 0 and 1e-4 <= hp["lr"] <= 1e-2


def test_hyperparams_rebuilt_from_recorded_params():
    spec = load_spec_file(STUDIES / "regression.yaml")
    for trial, hp in sample(spec, 10):
        assert hyperparams_from_params(spec, trial.params) == hp


def test_same_seed_same_sequence_with_tpe():
    spec = load_spec_file(STUDIES / "regression.yaml")

    def run():
        study = optuna.create_study(sampler=build_sampler(spec))
        params = []
        for i in range(15):
            trial = study.ask()
            suggest(trial, spec)
            study.tell(trial, float(i % 4))
            params.append(trial.params)
        return params

    assert run() == run()


def test_grid_space_covers_per_layer_names():
    spec = spec_with({"n_layers": {"choice": [1, 2]}, "width": {"int": [16, 32], "step": 16, "per_layer": "n_layers"},
                      "optimizer": {"choice": ["Adam", "SGD"]}}, sampler={"kind": "grid"})
    grid = grid_space(spec)
    assert grid == {"n_layers": [1, 2], "width_l0": [16, 32], "width_l1": [16, 32], "optimizer": ["Adam", "SGD"]}


def test_grid_with_constant_schedule_has_no_duplicate_points():
    spec = spec_with({"n_layers": {"int": [1, 3]}, "width": {"int": [32, 64], "step": 32, "per_layer": "n_layers",
                                                             "schedule": "constant"}}, sampler={"kind": "grid"})
    assert grid_space(spec) == {"n_layers": [1, 2, 3], "width": [32, 64]}
    study = optuna.create_study(sampler=build_sampler(spec))
    seen = []

    def objective(trial):
        hp = suggest(trial, spec)
        seen.append((hp["n_layers"], tuple(hp["width"])))
        return 0.0

    study.optimize(objective, n_trials=20)  # the grid sampler stops the study once the grid is done
    assert len(seen) == 6 and len(set(seen)) == 6


def test_activation_searched_per_layer():
    spec = spec_with({"n_layers": {"int": [1, 3]},
                      "activation": {"choice": ["selu", "sigmoid", "relu"], "per_layer": "n_layers"}})
    seen = set()
    for trial, hp in sample(spec, 40):
        n = hp["n_layers"]
        assert len(hp["activation"]) == n
        assert sorted(k for k in trial.params if k.startswith("activation")) == [f"activation_l{i}" for i in range(n)]
        seen.update(hp["activation"])
    assert seen == {"selu", "sigmoid", "relu"}
    fixed = spec_with({"lr": {"float": [1e-3, 1e-2]}}, fixed={"n_layers": 2, "activation": ["selu", "sigmoid"]})
    assert hyperparams_from_params(fixed, {"lr": 1e-3})["activation"] == ["selu", "sigmoid"]


def test_activation_is_one_value_in_a_cnn():
    from hpo.errors import SpecError

    raw = yaml.safe_load((STUDIES / "fmnist.yaml").read_text())
    raw["fixed"]["activation"] = ["relu", "tanh"]
    with pytest.raises(SpecError, match=r"fixed.activation: got \['relu', 'tanh'\]; allowed: one value"):
        parse_spec(raw, base_dir=STUDIES)
