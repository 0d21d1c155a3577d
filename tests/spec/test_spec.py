import pytest
import yaml
from conftest import STUDIES

from hpo.errors import SpecError
from hpo.spec.schema import find_spec_file, load_spec_file, parse_spec


def regression_raw() -> dict:
    return yaml.safe_load((STUDIES / "regression.yaml").read_text())


def test_shipped_regression_spec_is_valid():
    spec = load_spec_file(STUDIES / "regression.yaml")
    assert spec.name == "regression" and spec.direction == "minimize" and spec.metric == "val_mse"
    assert spec.task == "regression"
    names = [p.name for p in spec.space]
    assert names.index("optimizer") < names.index("momentum")
    momentum = spec.space[names.index("momentum")]
    assert momentum.when == {"optimizer": ("SGD", "RMSprop")}
    assert spec.space[names.index("width")].per_layer == "n_layers"
    assert spec.data.train.endswith("studies/data/regression_train.csv")


def test_round_trip_through_dict():
    spec = load_spec_file(STUDIES / "regression.yaml")
    assert parse_spec(spec.to_dict(), source="stored") == spec


def test_find_spec_by_name_and_unknown_name():
    assert find_spec_file("regression").name == "regression.yaml"
    with pytest.raises(SpecError, match="no study spec named 'nope'.*known: .*regression"):
        find_spec_file("nope")


def test_categorical_values_are_canonicalised():
    raw = regression_raw()
    raw["space"]["optimizer"] = {"choice": ["adam", "sgd", "rmsprop"]}
    spec = parse_spec(raw)
    assert [p for p in spec.space if p.name == "optimizer"][0].choices == ("Adam", "SGD", "RMSprop")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["space"].update(optimizer={"choice": ["Adam", "AdamW"]}),
         r"space.optimizer.choice\[1\]: got 'AdamW'; allowed: Adam, SGD, RMSprop"),
        (lambda r: r["fixed"].update(activation="swish"),
         r"fixed.activation: got 'swish'; allowed: relu, leaky_relu, selu, sigmoid, tanh"),
        (lambda r: r["space"].update(lr={"float": [0.01, 0.001], "log": True}),
         r"space.lr.float: got \[0.01, 0.001\]; allowed: low < high \(for a fixed value use fixed.lr\)"),
        (lambda r: r["space"].update(lr={"float": [0.01, 0.01]}), r"space.lr.float: got \[0.01, 0.01\]; allowed: low < high"),
        (lambda r: r["space"].update(weight_decay={"float": [0.0, 0.01], "log": True}),
         r"space.weight_decay.float: got \[0.0, 0.01\]; allowed: low > 0 with log: true"),
        (lambda r: r["space"].update(batch_size={"int": []}), r"space.batch_size.int: got \[\]; allowed: \[low, high\], each an integer in \[1, 1048576\] \(HPO_LIMITS=batch_size=N sets the upper bound\)"),
        (lambda r: r["space"].update(learning_rate={"float": [0.1, 0.2]}), r"space.learning_rate: unknown hyperparameter"),
        (lambda r: r["space"].update(filters={"int": [4, 8]}), r"'filters' does not apply to model 'mlp'"),
        (lambda r: r.update(direction="maximize"), r"direction: got 'maximize'; allowed: minimize \(val_mse improves by minimize\)"),
        (lambda r: r.update(metric="val_accuracy"), r"metric: got 'val_accuracy'; allowed: val_mse, val_mae, val_loss"),
        (lambda r: r["data"].update(source="parquet"), r"data.source: got 'parquet'; allowed: csv, fashion_mnist, mnist"),
        (lambda r: r["pruner"].update(kind="asha"), r"pruner.kind: got 'asha'; allowed: median, none, hyperband"),
        (lambda r: r["sampler"].update(kind="cmaes"), r"sampler.kind: got 'cmaes'; allowed: tpe, nsga2, random, grid"),
        (lambda r: r["budget"].update(n_trials=0), r"budget.n_trials: got 0; allowed: an integer >= 1, or null"),
        (lambda r: r["space"]["momentum"].update(when={"optim": ["SGD"]}), r"'optim' must be searched above 'momentum'"),
        (lambda r: r["space"]["momentum"].update(when={"optimizer": ["Adagrad"]}), r"'Adagrad' is not among optimizer's choices"),
        (lambda r: r["space"]["width"].update(per_layer="depth"), r"space.width.per_layer: got 'depth'; allowed: n_layers"),
        (lambda r: r.update(colour="blue"), r"colour: unknown key"),
        (lambda r: r["fixed"].update(lr=0.1), r"space.*|fixed.lr: is also in space"),
        (lambda r: r.update(name="my study"), r"name: got 'my study'; allowed: a name of 1 to 200 bytes \(UTF-8\), not '\.' or '\.\.', without spaces"),
        (lambda r: r["sampler"].update(multivariate="no"), r"sampler.multivariate: got 'no'; allowed: true or false"),
    ],
)
def test_bad_specs_name_field_value_and_allowed(mutate, message):
    raw = regression_raw()
    mutate(raw)
    with pytest.raises(SpecError, match=message) as err:
        parse_spec(raw, source="studies/x.yaml")
    assert str(err.value).startswith("studies/x.yaml: ")
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nspace:\n  lr: {float: [1, 2]\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_spec_file(path)


def test_grid_needs_enumerable_ranges():
    raw = regression_raw()
    raw["sampler"] = {"kind": "grid"}
    with pytest.raises(SpecError, match="space.lr: grid search needs choice or a range with step"):
        parse_spec(raw)
