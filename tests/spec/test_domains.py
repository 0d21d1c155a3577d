"""The table of domains: every spec field and hyperparameter has one, every value outside it (and
every search range crossing it) is refused with one line naming the field, and the CLI refuses
such specs with exit code 2 before it creates anything."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import STUDIES, run_hpo

from hpo.errors import SpecError
from hpo.search.study import check_buildable
from hpo.spec.domains import (
    DOMAINS,
    NAME_MAX_BYTES,
    PRUNER_SETTINGS,
    SAMPLER_SETTINGS,
    Domain,
)
from hpo.spec.hyperparams import HYPERPARAMETERS
from hpo.spec.schema import (
    BudgetSpec,
    CheckpointSpec,
    CvSpec,
    DataSpec,
    PrunerSpec,
    RetrainSpec,
    SamplerSpec,
    StudySpec,
    parse_spec,
)
from hpo.store import optuna_private

SOURCE = "studies/walk.yaml"
# constraints.min/max are the bounds under constraints.METRIC, not fields of their own
SPEC_FIELDS = [k for k in DOMAINS if k not in HYPERPARAMETERS and not k.startswith(("space.", "constraints."))]


def regression_raw() -> dict:
    raw = yaml.safe_load((STUDIES / "regression.yaml").read_text())
    raw["data"]["train"] = str(STUDIES / "data" / "regression_train.csv")
    raw["data"]["test"] = str(STUDIES / "data" / "regression_test.csv")
    return raw


def cnn_raw() -> dict:
    return {"name": "img", "model": "cnn", "data": {"source": "fashion_mnist"}, "fixed": {"filters": 4}}


def outside(domain: Domain) -> list:
    """Values outside ``domain``: the wrong type, just past each bound, null where not allowed."""
    values: list = [] if domain.optional else [None]
    if domain.kind in ("int", "float"):
        values += ["ten", True, [1]]
        if domain.kind == "int":
            values.append(1.5)
        else:
            values += [math.nan, math.inf]
        for bound, is_open, step in ((domain.low, domain.low_open, -1), (domain.high, domain.high_open, 1)):
            if bound is not None:
                values.append(bound + step)
                if is_open:
                    values.append(bound)
    elif domain.kind == "choice":
        values += ["nope", 3, True]
    elif domain.kind == "bool":
        values += ["yes", 1]
    elif domain.kind == "text":
        values += [5, ["a"]] + ([""] if domain.low else [])
    elif domain.kind == "texts":
        values += [[], [1], 5]
    elif domain.kind == "name":
        values += ["", "a b", "a/b", "tab\there", 5, "x" * (NAME_MAX_BYTES + 1), "é" * (NAME_MAX_BYTES // 2 + 1)]
    return values


def crossing(domain: Domain) -> list[list]:
    """Search ranges ``[low, high]`` that cross a bound of a numeric domain."""
    ranges = []
    if domain.low is not None:
        ranges.append([domain.low - 1, domain.low + 1])
    if domain.high is not None:
        ranges.append([domain.high - 1 if domain.kind == "int" else domain.high / 2, domain.high + 1])
    return ranges


def refused(raw: dict, field: str) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, source=SOURCE)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: {field}: got "), message
    assert "; allowed: " in message, message
    return message


def base_for(name: str) -> dict:
    """A valid spec of a family that takes hyperparameter ``name``, without ``name`` in it."""
    families = HYPERPARAMETERS[name].families
    raw = regression_raw() if families is None or "mlp" in families else cnn_raw()
    raw.setdefault("space", {}).pop(name, None)
    raw.setdefault("fixed", {}).pop(name, None)
    return raw


def test_every_field_has_a_domain():
    assert set(HYPERPARAMETERS) <= set(DOMAINS)
    sections = {"sampler": SamplerSpec, "pruner": PrunerSpec, "budget": BudgetSpec, "retrain": RetrainSpec,
                "data": DataSpec, "checkpoint": CheckpointSpec, "cv": CvSpec}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            # written by hpo itself, not by the spec's author (checkpoint.enabled: `checkpoint: false`)
            if f.name not in ("inline", "as_written", "files", "enabled"):
                assert f"{section}.{f.name}" in DOMAINS, f"{section}.{f.name}"
    for f in dataclasses.fields(StudySpec):
        # objectives and constraints: lists checked item by item (their metrics against the task's
        # and MODEL_METRICS, directions against "direction", bounds against constraints.min/max);
        # families: the spec's `model`, a name or a choice of names, each checked against "model"
        if f.name not in (*sections, "space", "fixed", "objectives", "constraints", "families"):
            assert f.name in DOMAINS, f.name
    assert "model" in DOMAINS
    for kind, settings in {**PRUNER_SETTINGS, **SAMPLER_SETTINGS}.items():
        section = "pruner" if kind in PRUNER_SETTINGS else "sampler"
        assert all(f"{section}.{s}" in DOMAINS for s in settings)


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_hyperparameter_values_outside_the_domain_are_refused(name):
    domain = DOMAINS[name]
    per_layer = HYPERPARAMETERS[name].per_layer
    for value in outside(domain):
        if per_layer and isinstance(value, list):
            continue  # a list is one value per layer: below
        raw = base_for(name)
        raw["fixed"][name] = value
        refused(raw, f"fixed.{name}")
    if per_layer:
        raw = base_for(name)
        raw["fixed"][name] = [outside(domain)[-1]]
        refused(raw, f"fixed.{name}[0]")
    if domain.kind in ("int", "float"):
        for bounds in crossing(domain):
            raw = base_for(name)
            raw["space"][name] = {domain.kind: bounds}
            refused(raw, f"space.{name}.{domain.kind}")
    else:
        raw = base_for(name)
        raw["space"][name] = {"choice": [domain.choices[0] if domain.choices else True, "nope"]}
        refused(raw, f"space.{name}.choice[1]")


@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_spec_field_values_outside_the_domain_are_refused(field):
    values = outside(DOMAINS[field])
    if field == "description":
        values.remove(None)  # an empty description is the default
    assert values
    for value in values:
        raw = regression_raw()
        section, _, key = field.rpartition(".")
        if section in ("sampler", "pruner") and key != "kind":
            kinds = SAMPLER_SETTINGS if section == "sampler" else PRUNER_SETTINGS
            raw[section] = {"kind": next(k for k, settings in kinds.items() if key in settings), key: value}
        elif section == "constraints":  # a bound of one metric's constraint
            raw["constraints"] = {"n_params": {key: value}}
            refused(raw, f"constraints.n_params.{key}")
            continue
        elif section:
            raw.setdefault(section, {})[key] = value
        else:
            raw[key] = value
        refused(raw, field)


def test_search_range_keys():
    raw = regression_raw()
    raw["space"]["lr"]["log"] = "yes"
    refused(raw, "space.lr.log")
    raw = regression_raw()
    raw["space"]["width"]["schedule"] = "shrinking"
    refused(raw, "space.width.schedule")
    raw = regression_raw()
    raw["space"]["epochs"]["step"] = 0
    assert "allowed: an integer in [1, 900]" in refused(raw, "space.epochs.step")


def test_values_on_the_bounds_are_accepted():
    raw = regression_raw()
    raw["space"].pop("momentum")
    raw["fixed"].update(dropout=0.0, momentum=0.0, lr_decay=1.0, early_stopping=0, plateau_patience=0)
    raw["space"]["weight_decay"] = {"float": [0.0, 0.1]}
    raw["pruner"] = {"kind": "hyperband", "min_resource": 1, "reduction_factor": 2}
    raw["retrain"] = {"folds": 2, "epochs": 1}
    raw["budget"] = {"n_trials": None, "timeout": 0.5}
    raw["checkpoint"] = {"every_seconds": 0}
    spec = parse_spec(raw)
    assert spec.checkpoint == CheckpointSpec(every_seconds=0.0)
    assert spec.pruner.to_dict() == {"kind": "hyperband", "min_resource": 1, "reduction_factor": 2}
    cnn = parse_spec({**cnn_raw(), "fixed": {"n_dense": 0, "padding": 0, "conv_dropout": 0.0}})
    assert cnn.fixed["n_dense"] == 0


def test_checkpoint_is_false_true_or_a_mapping():
    raw = regression_raw()
    assert parse_spec(raw).checkpoint.to_dict() == {"every_seconds": 60.0}
    raw["checkpoint"] = False
    assert parse_spec(raw).checkpoint.to_dict() is False
    assert parse_spec(parse_spec(raw).to_dict()).checkpoint == CheckpointSpec(enabled=False)
    raw["checkpoint"] = True
    assert parse_spec(raw).checkpoint == CheckpointSpec()
    raw["checkpoint"] = "yes"
    assert "allowed: false, true or a mapping {every_seconds: S}" in refused(raw, "checkpoint")
    raw["checkpoint"] = {"every": 5}
    with pytest.raises(SpecError, match=r"checkpoint.every: unknown key; allowed: every_seconds"):
        parse_spec(raw)


def test_settings_of_another_pruner_or_sampler_kind_are_refused():
    raw = regression_raw()
    raw["pruner"] = {"kind": "median", "min_resource": 3}
    with pytest.raises(SpecError, match=r"pruner.min_resource: unknown key for pruner kind 'median'; "
                                        r"allowed: kind, n_startup_trials, n_warmup_steps, interval_steps"):
        parse_spec(raw)
    raw["pruner"] = {"kind": "none"}
    raw["sampler"] = {"kind": "random", "n_startup_trials": 3}
    with pytest.raises(SpecError, match=r"sampler.n_startup_trials: unknown key for sampler kind 'random'; allowed: kind"):
        parse_spec(raw)


def test_per_layer_lists_must_fit_every_layer_count():
    raw = {**cnn_raw(), "fixed": {"n_conv": 3}}  # the default filters [6, 16] has 2 values
    with pytest.raises(SpecError, match=r"fixed.n_conv: got 3; allowed: 2, the length of the default filters \[6, 16\]"):
        parse_spec(raw)
    raw = {**cnn_raw(), "fixed": {"filters": [4, 8]}, "space": {"n_conv": {"int": [2, 3]}}}
    with pytest.raises(SpecError, match=r"fixed.filters: got \[4, 8\]; allowed: one value for every layer, or one "
                                        r"per layer \(n_conv can be 3\)"):
        parse_spec(raw)
    raw = regression_raw()
    raw["space"]["width"]["per_layer"] = "batch_size"
    with pytest.raises(SpecError, match=r"space.width.per_layer: got 'batch_size'; allowed: n_layers"):
        parse_spec(raw)


def test_what_optunas_constructors_refuse_becomes_one_line_naming_the_field():
    spec = parse_spec(regression_raw())
    check_buildable(spec, source=SOURCE)
    bad = replace(spec, pruner=PrunerSpec(kind="median", interval_steps=0))  # past the table, as a stored spec could be
    with pytest.raises(SpecError) as err:
        check_buildable(bad, source=SOURCE)
    assert str(err.value) == (f"{SOURCE}: pruner.interval_steps: got 0; allowed: what Optuna's pruner 'median' accepts "
                              f"(Pruning interval steps must be at least 1, but got interval_steps=0.)")


def test_names_longer_than_the_store_holds_are_refused(monkeypatch):
    spec = parse_spec({**regression_raw(), "name": "n" * 40})
    monkeypatch.setattr(optuna_private.STUDIES.c.study_name.type, "length", 32)
    with pytest.raises(SpecError, match=r"name: got a name of 40 characters; allowed: at most 32 \(the store's "
                                        r"study_name column\)"):
        check_buildable(spec, source=SOURCE)


@pytest.mark.parametrize("edit, field", [
    (lambda raw: raw["fixed"].update(batch_size=0), "fixed.batch_size"),
    (lambda raw: raw["space"].update(batch_size={"int": [0, 4]}), "space.batch_size.int"),
    (lambda raw: raw["fixed"].update(epochs=0), "fixed.epochs"),
    (lambda raw: raw.update(pruner={"kind": "hyperband", "min_resource": 0}), "pruner.min_resource"),
    (lambda raw: raw.update(pruner={"kind": "median", "interval_steps": 0}), "pruner.interval_steps"),
    (lambda raw: raw.update(name="s" * 300), "name"),
])
def test_cli_refuses_with_exit_2_one_line_and_creates_nothing(tmp_path, cli_env, edit, field):
    raw = regression_raw()
    for key in ("batch_size", "epochs"):
        raw["space"].pop(key, None)
    edit(raw)
    path = tmp_path / "walk.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_hpo("create-study", str(path), env=cli_env, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpo: error: {path}: {field}: got "), proc.stderr
    assert "; allowed: " in lines[0]
    assert not Path(cli_env["HPO_STORAGE"].removeprefix("sqlite:///")).exists()  # not even the store file
