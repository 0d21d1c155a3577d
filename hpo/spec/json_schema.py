"""The spec as a JSON Schema (draft 2020-12), generated from the one table of domains
(``hpo.spec.domains``), so that an editor's YAML extension completes and checks specs.

``studies/spec.schema.json`` is this schema for hpo's own families and data sources (a test keeps it
up to date); ``hpo schema`` prints it for the families and sources installed here. A spec names it
in its first line: ``# yaml-language-server: $schema=spec.schema.json``.

The schema refuses what the domains refuse; what needs several fields at once (low < high, a
condition on a parameter searched above, a list per layer) is still checked by ``hpo create-study``.
Two corners it cannot express: JSON has no NaN or infinity, and a name's limit is in bytes, so
names of more than 50 characters must be ASCII here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hpo.spec.domains import (
    DATA_SOURCES,
    DIRECTIONS,
    DOMAINS,
    FAMILIES,
    METRICS,
    MODEL_METRICS,
    NAME_MAX_BYTES,
    PRUNER_SETTINGS,
    PRUNERS,
    SAMPLER_SETTINGS,
    SAMPLERS,
    Domain,
)
from hpo.spec.hyperparams import HYPERPARAMETERS

SCHEMA_ID = "https://hpo.invalid/spec.schema.json"
PARAM_KINDS = ("int", "float", "choice")
RANGE_KEYS = ("step", "log", "when", "per_layer", "schedule")


def _any_case(text: str) -> str:
    """A regex for ``text`` in any letter case (JSON Schema's regexes take no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


def domain_schema(domain: Domain) -> dict[str, Any]:
    """The JSON Schema of the values ``domain`` allows."""
    if domain.kind == "choice":
        words = [c for c in domain.choices if isinstance(c, str)]
        schema: dict[str, Any] = {"enum": list(domain.choices)}
        if words:  # hpo takes a choice in any case (adam for Adam); editors complete the enum
            schema = {"anyOf": [schema, {"type": "string",
                                         "pattern": "^(?:" + "|".join(_any_case(w) for w in words) + ")$"}]}
    elif domain.kind == "bool":
        schema = {"type": "boolean"}
    elif domain.kind == "text":
        schema = {"type": "string", **({"minLength": int(domain.low)} if domain.low else {})}
    elif domain.kind == "texts":
        schema = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
    elif domain.kind == "name":
        allowed = r"^(?!\.{1,2}$)[^/\\ \x00-\x1f\x7f]+$"
        # The limit is in UTF-8 bytes: any name of <= 1/4 as many characters fits, longer ones if ASCII.
        schema = {"type": "string", "pattern": allowed, "anyOf": [
            {"maxLength": NAME_MAX_BYTES // 4}, {"pattern": f"^[\\x20-\\x7e]{{1,{NAME_MAX_BYTES}}}$"}]}
    else:
        schema = {"type": "integer" if domain.kind == "int" else "number"}
        for bound, is_open, word in ((domain.low, domain.low_open, "Minimum"), (domain.high, domain.high_open, "Maximum")):
            if bound is not None:
                key = f"exclusive{word}" if is_open else word.lower()
                schema[key] = int(bound) if domain.kind == "int" else bound
    if domain.optional:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return {"description": str(domain), **schema}


def _closed(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


def _hyperparameter(name: str, domain: Domain, per_layer: bool) -> tuple[dict, dict]:
    """(the schema of ``fixed.NAME``, the schema of ``space.NAME``)."""
    value = domain_schema(domain)
    fixed = value if not per_layer else {"anyOf": [value, {"type": "array", "minItems": 1, "items": value}],
                                        "description": f"{domain}, or a list of one per layer"}
    common = {"step": {"type": "number", "exclusiveMinimum": 0}, "log": domain_schema(DOMAINS["space.log"]),
              "when": {"type": "object", "description": "searched only when these parameters take these values"},
              "per_layer": {"type": "string", "description": "one value per layer of this count parameter"},
              "schedule": domain_schema(DOMAINS["space.schedule"])}
    shapes = [_closed({"choice": {"type": "array", "minItems": 1, "items": fixed}, **common}, required=["choice"])]
    for kind in ("int", "float") if domain.kind in ("int", "float") else ():
        if kind == "float" and domain.kind == "int":
            continue
        inside = Domain(kind, domain.low, domain.high, domain.low_open, domain.high_open)  # int ranges of a float too
        bounds = {"type": "array", "minItems": 2, "maxItems": 2, "items": domain_schema(inside)}
        shapes.append(_closed({kind: bounds, **common}, required=[kind]))
    kinds = " or ".join(f"{k}: [low, high]" for k in ("int", "float")[:len(shapes) - 1]) or ""
    space = {"description": f"{name}: {kinds + ' or ' if kinds else ''}choice: [...], each {domain}", "oneOf": shapes}
    return fixed, space


def _section(prefix: str, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: domain_schema(DOMAINS[f"{prefix}.{k}"]) for k in keys}


def _kinds(section: str, kinds: tuple[str, ...], settings: Mapping[str, tuple[str, ...]], default: str) -> dict:
    """A sampler or pruner: ``kind`` and the settings of that kind only."""
    every = tuple(dict.fromkeys(s for k in kinds for s in settings[k]))
    rules = [{"if": {"properties": {"kind": {"const": k}}, "required": ["kind"]},
              "then": {"propertyNames": {"enum": ["kind", *settings[k]]}}} for k in kinds]
    rules.append({"if": {"not": {"required": ["kind"]}},
                  "then": {"propertyNames": {"enum": ["kind", *settings[default]]}}})
    return _closed(_section(section, ("kind", *every)), allOf=rules)


def spec_schema(*, families: tuple[str, ...] = FAMILIES, sources: tuple[str, ...] = DATA_SOURCES,
                hyperparameters: Mapping[str, tuple[Domain, bool]] | None = None) -> dict[str, Any]:
    """The JSON Schema of a spec file.

    Args:
        families: the model families a spec may name (default: hpo's own).
        sources: the data sources a spec may name (default: hpo's own).
        hyperparameters: name -> (domain, whether it may be given per layer), for every family
            (default: hpo's own vocabulary, ``hpo.spec.hyperparams``).
    """
    if hyperparameters is None:
        hyperparameters = {n: (DOMAINS[n], hp.per_layer) for n, hp in HYPERPARAMETERS.items()}
    fixed, space = {}, {}
    for name, (domain, per_layer) in sorted(hyperparameters.items()):
        fixed[name], space[name] = _hyperparameter(name, domain, per_layer)
    every_metric = list(dict.fromkeys(m for task in METRICS.values() for m in task))
    data = _closed({
        "source": {"enum": list(sources), "description": ", ".join(sources)},
        **_section("data", ("task", "train", "test")),
        "features": {"anyOf": [domain_schema(DOMAINS["data.target"]), domain_schema(DOMAINS["data.features"])]},
        **_section("data", ("target", "val_fraction", "train_subset", "val_subset", "data_dir")),
        # written by hpo into the specs it stores, never by hand
        "files": {"type": "object"}, "inline": {"type": "object"}, "as_written": {"type": "object"},
    }, required=["source"])
    bounds = _closed({"min": domain_schema(DOMAINS["constraints.min"]), "max": domain_schema(DOMAINS["constraints.max"])},
                     minProperties=1)
    objective = _closed({"metric": {"enum": every_metric + list(MODEL_METRICS)}, "direction": {"enum": list(DIRECTIONS)}},
                        required=["metric"])
    top = {
        "name": domain_schema(DOMAINS["name"]),
        "description": domain_schema(DOMAINS["description"]),
        "direction": domain_schema(DOMAINS["direction"]),
        "metric": domain_schema(DOMAINS["metric"]),
        "objectives": {"type": "array", "minItems": 1, "items": objective},
        "constraints": {"type": "object", "propertyNames": {"enum": every_metric + list(MODEL_METRICS)},
                        "additionalProperties": bounds},
        "seed": domain_schema(DOMAINS["seed"]),
        "data": data,
        "model": {"anyOf": [{"enum": list(families)},
                            _closed({"choice": {"type": "array", "minItems": 2, "uniqueItems": True,
                                                "items": {"enum": list(families)}}}, required=["choice"])],
                  "description": f"one of {', '.join(families)}, or {{choice: [...]}} to search the family"},
        "space": _closed(space),
        "fixed": _closed(fixed),
        "sampler": _kinds("sampler", SAMPLERS, SAMPLER_SETTINGS, "tpe"),
        "pruner": _kinds("pruner", PRUNERS, PRUNER_SETTINGS, "median"),
        "budget": _closed(_section("budget", ("n_trials", "timeout", "max_minutes", "patience", "target"))),
        "retrain": _closed(_section("retrain", ("folds", "epochs"))),
        "cv": _closed(_section("cv", ("folds", "score", "path")), required=["folds"]),
        "checkpoint": {"anyOf": [{"type": "boolean"}, _closed(_section("checkpoint", ("every_seconds",)))]},
        "report_every": domain_schema(DOMAINS["report_every"]),
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "hpo study spec", "description": "A study spec of hpo (studies/NAME.yaml); see README.md.",
            **_closed(top, required=["name", "data"])}


def installed_schema() -> dict[str, Any]:
    """``spec_schema`` for the model families and data sources installed here (plugins too)."""
    from hpo.data import registry as sources
    from hpo.nn import registry as families

    usable = [n for n, e in families.installed().items() if e is not None and e.obj is not None]
    hyperparameters: dict[str, tuple[Domain, bool]] = {}
    for name in usable:
        for hp, param in families.vocabulary(name).items():
            hyperparameters.setdefault(hp, (param.domain, param.per_layer is not None))
    return spec_schema(families=tuple(usable), sources=sources.names(), hyperparameters=hyperparameters)


def render(schema: dict[str, Any]) -> str:
    """The schema as the text of a ``.json`` file (sorted keys: a stable file for version control)."""
    import json

    return json.dumps(schema, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
