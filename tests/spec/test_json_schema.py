"""The spec's JSON Schema (for editors), generated from the table of domains: up to date in
studies/spec.schema.json, valid for every shipped spec, refusing every bad spec of the domain
tests; and the nearest key suggested for a typo."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import yaml
from conftest import STUDIES, run_hpo
from test_domains import SPEC_FIELDS, base_for, crossing, outside, regression_raw

from hpo.errors import SpecError
from hpo.spec.domains import DOMAINS, PRUNER_SETTINGS, SAMPLER_SETTINGS
from hpo.spec.hyperparams import HYPERPARAMETERS
from hpo.spec.json_schema import render, spec_schema
from hpo.spec.schema import load_spec_file, parse_spec

SCHEMA_FILE = STUDIES / "spec.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(spec_schema())


def schema_refuses(raw: dict) -> bool:
    return not VALIDATOR.is_valid(raw)


def finite(value) -> bool:
    # JSON has no NaN or infinity, so no JSON Schema can refuse them; hpo does (test_domains).
    return not (isinstance(value, float) and not math.isfinite(value))


def test_the_shipped_schema_file_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == render(spec_schema()), "run: hpo schema --builtin --out studies/spec.schema.json"
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_names_the_schema(path):
    load_spec_file(path)  # hpo takes it
    VALIDATOR.validate(yaml.safe_load(path.read_text()))
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=spec.schema.json"


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_the_schema_refuses_hyperparameter_values_the_domains_refuse(name):
    domain = DOMAINS[name]
    per_layer = HYPERPARAMETERS[name].per_layer
    cases = []
    for value in filter(finite, outside(domain)):
        if per_layer and isinstance(value, list):
            continue
        raw = base_for(name)
        raw["fixed"][name] = value
        cases.append(raw)
    if per_layer:
        raw = base_for(name)
        raw["fixed"][name] = [next(v for v in reversed(outside(domain)) if finite(v))]
        cases.append(raw)
    if domain.kind in ("int", "float"):
        for bounds in crossing(domain):
            raw = base_for(name)
            raw["space"][name] = {domain.kind: bounds}
            cases.append(raw)
    else:
        raw = base_for(name)
        raw["space"][name] = {"choice": [domain.choices[0] if domain.choices else True, "nope"]}
        cases.append(raw)
    for raw in cases:
        with pytest.raises(SpecError):
            parse_spec(raw)
        assert schema_refuses(raw), (name, raw.get("fixed", {}).get(name), raw.get("space", {}).get(name))
    assert not schema_refuses(base_for(name))  # what is left is valid: the refusals above are the value's


@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_the_schema_refuses_spec_field_values_the_domains_refuse(field):
    values = [v for v in outside(DOMAINS[field]) if finite(v) and not (field == "description" and v is None)]
    for value in values:
        raw = regression_raw()
        section, _, key = field.rpartition(".")
        if section in ("sampler", "pruner") and key != "kind":
            kinds = SAMPLER_SETTINGS if section == "sampler" else PRUNER_SETTINGS
            raw[section] = {"kind": next(k for k, settings in kinds.items() if key in settings), key: value}
        elif section:
            raw.setdefault(section, {})[key] = value
        else:
            raw[key] = value
        assert schema_refuses(raw), (field, value)


@pytest.mark.parametrize("change", [
    lambda r: r.update(colour="blue"),
    lambda r: r["space"].update(weight_decy=r["space"].pop("weight_decay")),
    lambda r: r["space"]["lr"].update(lgo=True),
    lambda r: r.update(pruner={"kind": "median", "min_resource": 2}),  # a setting of another pruner kind
    lambda r: r.update(sampler={"multivariate": True, "population_size": 10}),  # tpe (the default) takes no population
    lambda r: r["space"].update(n_layers={"float": [1, 3]}),  # an integer searched as float
    lambda r: r["space"].update(epochs={"int": [10.5, 20]}),
], ids=["unknown-top-key", "typo-hyperparameter", "typo-range-key", "other-pruner-setting",
        "other-sampler-setting", "float-range-of-an-int", "fraction-in-an-int-range"])
def test_the_schema_refuses_keys_hpo_refuses(change):
    raw = regression_raw()
    change(raw)
    with pytest.raises(SpecError):
        parse_spec(raw)
    assert schema_refuses(raw)


def test_the_schema_takes_choices_in_any_case_as_hpo_does():
    raw = regression_raw()
    raw["space"]["optimizer"] = {"choice": ["adam", "SGD", "rmsprop"]}
    raw["fixed"]["activation"] = "ReLU"
    assert parse_spec(raw).fixed["activation"] == "relu"
    assert not schema_refuses(raw)


def test_a_typo_gets_the_nearest_key_in_one_line():
    raw = regression_raw()
    raw["space"]["weight_decy"] = raw["space"].pop("weight_decay")
    with pytest.raises(SpecError) as err:
        parse_spec(raw, source="studies/r.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("studies/r.yaml: space.weight_decy: unknown hyperparameter 'weight_decy'; "
                              "did you mean weight_decay?; allowed: activation, ")
    for key, nearest, where in (("retrian", "retrain", ""), ("n_warmup_step", "n_warmup_steps", "pruner.")):
        raw = regression_raw()
        (raw[where[:-1]] if where else raw)[key] = 3
        with pytest.raises(SpecError, match=rf": {where}{key}: unknown key.*; did you mean {nearest}\?; allowed: "):
            parse_spec(raw)
    raw = regression_raw()
    raw["colour"] = "blue"
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert "did you mean" not in str(err.value)  # nothing near: no guess


def test_cli_prints_the_schema_of_what_is_installed(tmp_path):
    proc = run_hpo("schema", check=0)
    schema = json.loads(proc.stdout)
    assert {"mlp", "cnn"} <= set(schema["properties"]["model"]["anyOf"][0]["enum"])
    jsonschema.Draft202012Validator.check_schema(schema)
    model = jsonschema.Draft202012Validator({**schema, "required": []})
    assert model.is_valid({"model": {"choice": ["mlp", "cnn"]}}) and model.is_valid({"model": "cnn"})
    for bad in ({"choice": ["mlp"]}, {"choice": ["mlp", "mlp"]}, {"choice": ["mlp", "nope"]}, {"pick": ["mlp", "cnn"]}):
        assert not model.is_valid({"model": bad}), bad
    run_hpo("schema", "--builtin", "--out", str(tmp_path / "s.json"), check=0)
    assert (tmp_path / "s.json").read_text() == SCHEMA_FILE.read_text()
