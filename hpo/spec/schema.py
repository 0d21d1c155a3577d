"""Study specs: the YAML schema, parsed and validated once into frozen objects.

A spec travels inside the store as a plain dict (``StudySpec.to_dict``), so a worker on another
machine rebuilds exactly the same object with ``parse_spec`` and needs no copy of ``studies/``.
Every error names the file, the field, the value received and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpo.errors import HpoError, SpecError
from hpo.nn import registry
from hpo.spec.checks import (
    Checker,
    check_layer_lists,
    check_references,
    check_value,
    known_name,
    search_range,
)
from hpo.spec.domains import (
    DATA_SOURCES,
    KNOWN_BEFORE_TRAINING,
    METRICS,
    MODEL_METRICS,
    MULTI_OBJECTIVE_PRUNERS,
    PRUNER_SETTINGS,
    SAMPLER_SETTINGS,
    Domain,
    show,
)

PARAM_KINDS = ("int", "float", "choice")
FAMILY = "model"  # the Optuna parameter of a searched model family (``model: {choice: [mlp, cnn]}``)


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter. ``per_layer`` names the count parameter (e.g. ``n_layers``)."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    when: dict = field(default_factory=dict)  # {other_param: (allowed values, ...)}
    per_layer: str | None = None
    schedule: str = "free"

    def to_dict(self) -> dict:
        d: dict[str, Any] = {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}
        if self.step is not None:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when.items()}
        if self.per_layer:
            d["per_layer"] = self.per_layer
        if self.schedule != "free":
            d["schedule"] = self.schedule
        return d


@dataclass(frozen=True)
class DataSpec:
    source: str
    task: str
    train: str | None = None
    test: str | None = None
    features: tuple[str, ...] = ("x",)
    target: str = "y"
    val_fraction: float = 0.2
    train_subset: int | None = None
    val_subset: int | None = None
    data_dir: str | None = None
    # CSV files kept in the store (hpo.store.data_tables), by reference: {"train": {name, size, rows, columns, sha256}, "test": ...}
    files: dict | None = None
    inline: dict | None = None  # CSV tables embedded in the spec by hpo before the store kept data; still read
    # The paths as the spec's author wrote them ({"train": "data/x.csv"}), where they differ from the
    # resolved ones above (relative to the spec file): what reports show.
    as_written: dict | None = None

    def to_dict(self) -> dict:
        d = {
            "source": self.source,
            "task": self.task,
            "val_fraction": self.val_fraction,
        }
        if self.source == "csv":
            d.update(train=self.train, test=self.test, features=list(self.features), target=self.target)
        elif self.source not in DATA_SOURCES:  # a registry source (hpo.data.registry)
            d.update({k: getattr(self, k) for k in ("train", "test") if getattr(self, k) is not None})
        for key in ("train_subset", "val_subset", "data_dir", "files", "inline", "as_written"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = False
    population_size: int = 50  # nsga2

    def to_dict(self) -> dict:
        """The kind and the settings that kind takes."""
        return {"kind": self.kind, **{k: getattr(self, k) for k in SAMPLER_SETTINGS[self.kind]}}


@dataclass(frozen=True)
class PrunerSpec:
    kind: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    min_resource: int = 1
    reduction_factor: int = 3
    p_threshold: float = 0.1
    n_startup_steps: int = 2

    def to_dict(self) -> dict:
        """The kind and the settings that kind takes."""
        return {"kind": self.kind, **{k: getattr(self, k) for k in PRUNER_SETTINGS[self.kind]}}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of the study: a metric of the trial (``val_*``, or one of ``MODEL_METRICS``)."""

    metric: str
    direction: str

    def to_dict(self) -> dict:
        return {"metric": self.metric, "direction": self.direction}


@dataclass(frozen=True)
class ConstraintSpec:
    """Bounds a feasible trial's ``metric`` keeps (``min`` ≤ value ≤ ``max``; either may be absent)."""

    metric: str
    min: float | None = None
    max: float | None = None

    @property
    def before_training(self) -> bool:
        """Whether the metric is known once the model is built (checked before any epoch)."""
        return self.metric in KNOWN_BEFORE_TRAINING

    def violations(self, value: float) -> dict[str, float]:
        """Optuna's constraint values (feasible when ≤ 0), one per bound: ``{"n_params.max": v - max}``."""
        out = {}
        if self.min is not None:
            out[f"{self.metric}.min"] = float(self.min - value)
        if self.max is not None:
            out[f"{self.metric}.max"] = float(value - self.max)
        return out

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("min", "max") if getattr(self, k) is not None}


@dataclass(frozen=True)
class BudgetSpec:
    n_trials: int | None = 100
    timeout: float | None = None  # seconds: each worker's own limit
    # Stopping rules, decided in the store for every worker (hpo.store.control): the study's wall
    # time since its first trial, complete trials in a row without improvement, a best value to reach.
    max_minutes: float | None = None
    patience: int | None = None
    target: float | None = None

    def to_dict(self) -> dict:
        """The trial count and timeout, and the stopping rules given."""
        d = {"n_trials": self.n_trials, "timeout": self.timeout}
        d.update({k: getattr(self, k) for k in ("max_minutes", "patience", "target") if getattr(self, k) is not None})
        return d


@dataclass(frozen=True)
class RetrainSpec:
    folds: int = 5
    epochs: int | None = None  # None: the trial's own epochs


@dataclass(frozen=True)
class CvSpec:
    """Cross-validated trials (``hpo.search.cv``): every trial trains ``folds`` models of its
    configuration on seeded folds of the training pool and is scored by their mean (``score``:
    ``mean`` of the folds' final values, ``mean_best`` of each fold's best value over epochs);
    ``path``: the K models trained together (``stacked``), one after another, or ``auto``."""

    folds: int
    score: str = "mean"
    path: str = "auto"

    def to_dict(self) -> dict:
        return {"folds": self.folds, "score": self.score, "path": self.path}


@dataclass(frozen=True)
class CheckpointSpec:
    """Trial and retrain checkpoints (``hpo.training.checkpoint``): ``checkpoint: false`` turns them off."""

    enabled: bool = True
    every_seconds: float = 60.0  # of training, at an epoch boundary; 0: at every epoch

    def to_dict(self) -> dict | bool:
        return {"every_seconds": self.every_seconds} if self.enabled else False


@dataclass(frozen=True)
class StudySpec:
    """A study as its YAML spec describes it, parsed and checked once (:func:`parse_spec`) and
    frozen: its name, what it optimises (``metric`` and ``direction``, or ``objectives``), the data
    (``data``), the model family (``model``; ``families``: one, or the candidates of a searched
    family) with its search ``space`` and ``fixed`` hyperparameters, the sampler, pruner, budget,
    retrain and checkpoint settings, and ``seed``
    (every seed hpo uses derives from it: ``hpo.training.seeds``). The store keeps it as JSON
    (``to_dict``) in the study's user attrs: workers read it from there, not from the file.
    """

    name: str
    direction: str
    metric: str
    data: DataSpec
    families: tuple[str, ...]  # the model family; several: the family is searched, a trial's is hp["model"]
    space: tuple[ParamSpec, ...]
    fixed: dict
    seed: int = 0
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    budget: BudgetSpec = BudgetSpec()
    retrain: RetrainSpec = RetrainSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    report_every: int = 1
    description: str = ""
    cv: CvSpec | None = None
    # Several objectives (``objectives:`` in the spec); empty: the one objective ``metric``/``direction``.
    # With several, ``metric``/``direction`` are the learning metric: the first val_* objective, which
    # training reports each step and pruning judges.
    objectives: tuple[ObjectiveSpec, ...] = ()
    constraints: tuple[ConstraintSpec, ...] = ()

    @property
    def task(self) -> str:
        return self.data.task

    @property
    def model(self) -> str:
        """The model family's name; for a searched family the candidates joined by ``|`` (to show,
        not to build: a trial's own family is :meth:`family_of` its hyperparameters)."""
        return "|".join(self.families)

    @property
    def searches_family(self) -> bool:
        return len(self.families) > 1

    def family_of(self, hp: dict) -> str:
        """The family that a trial's resolved hyperparameters ``hp`` build."""
        return hp[FAMILY] if self.searches_family else self.families[0]

    def for_family(self, name: str) -> StudySpec:
        """This spec as a study of family ``name`` alone: the searched parameters active for it
        (their ``when: {model: ...}`` dropped) and the fixed settings it knows.

        Raises:
            SpecError: ``name`` is not one of the spec's families (or not installed).
        """
        if name not in self.families:
            raise SpecError(f"study {self.name!r} searches model {self.model}, not {name!r}")
        if not self.searches_family:
            return self
        vocab = registry.vocabulary(name)
        space = tuple(replace(p, when={k: v for k, v in p.when.items() if k != FAMILY})
                      for p in self.space if name in p.when.get(FAMILY, (name,)))
        return replace(self, families=(name,), space=space, fixed={k: v for k, v in self.fixed.items() if k in vocab})

    @property
    def targets(self) -> tuple[ObjectiveSpec, ...]:
        """The study's objectives in order (one for a single-objective study)."""
        return self.objectives or (ObjectiveSpec(self.metric, self.direction),)

    @property
    def multi_objective(self) -> bool:
        return len(self.targets) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.targets]

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.targets]

    def with_data(self, data: DataSpec) -> StudySpec:
        return replace(self, data=data)

    def to_dict(self) -> dict:
        """The canonical plain-dict form; ``parse_spec(spec.to_dict())`` gives back an equal spec."""
        data = self.data.to_dict()
        if self.cv is not None:
            del data["val_fraction"]  # the folds split the pool: no single validation split
        d = {
            "name": self.name,
            "description": self.description,
            **({"objectives": [o.to_dict() for o in self.objectives]} if self.objectives else
               {"direction": self.direction, "metric": self.metric}),
            "seed": self.seed,
            "data": data,
            "model": self.families[0] if not self.searches_family else {"choice": list(self.families)},
            "space": {p.name: p.to_dict() for p in self.space},
            "fixed": dict(self.fixed),
            "sampler": self.sampler.to_dict(),
            "pruner": self.pruner.to_dict(),
            "budget": self.budget.to_dict(),
            "retrain": vars(self.retrain).copy(),
            "checkpoint": self.checkpoint.to_dict(),
            "report_every": self.report_every,
        }
        if self.cv is not None:
            d["cv"] = self.cv.to_dict()
        if self.constraints:
            d["constraints"] = {c.metric: c.to_dict() for c in self.constraints}
        return d


def _parse_param(c: Checker, vocab: dict, name: str, raw: Any, family: str) -> ParamSpec:
    where = f"space.{name}"
    known_name(c, vocab, name, family, where)
    raw = c.mapping(raw, where)
    kinds = [k for k in PARAM_KINDS if k in raw]
    if len(kinds) != 1:
        raise c.refuse(where, raw, f"exactly one of {', '.join(PARAM_KINDS)} (e.g. {{float: [1e-4, 1e-2], log: true}})")
    kind = kinds[0]
    c.unknown_keys(raw, (kind, "step", "log", "when", "per_layer", "schedule"), f"{where}.")
    hp = vocab[name]
    spec: dict[str, Any] = {"name": name, "kind": kind}
    if kind == "choice":
        choices = raw["choice"]
        if not isinstance(choices, list) or not choices:
            raise c.refuse(f"{where}.choice", choices, f"a non-empty list of {hp.domain}")
        spec["choices"] = tuple(check_value(c, vocab, name, v, f"{where}.choice[{i}]") for i, v in enumerate(choices))
        if len(set(map(repr, spec["choices"]))) != len(spec["choices"]):
            raise c.refuse(f"{where}.choice", choices, "values that do not repeat")
    else:
        spec.update(search_range(c, hp.domain, name, kind, raw, where))
    when = c.mapping(raw.get("when"), f"{where}.when")
    spec["when"] = {k: tuple(vocab[k].domain.canonical(x) if k in vocab else x for x in (v if isinstance(v, list) else [v]))
                    for k, v in when.items()}
    per_layer = raw.get("per_layer")
    if per_layer is not None:
        count = hp.per_layer
        if count is None:
            raise c.refuse(f"{where}.per_layer", per_layer, f"nothing: {name} is not a per-layer parameter of model {family!r}")
        if per_layer != count:
            raise c.refuse(f"{where}.per_layer", per_layer, f"{count} (the count of the layers {name} belongs to)")
        spec["per_layer"] = per_layer
    schedule = c.value("space.schedule", raw.get("schedule", "free"), f"{where}.schedule")
    if schedule != "free" and (per_layer is None or kind != "int"):
        raise c.refuse(f"{where}.schedule", schedule, "free, unless the range is int and per_layer (a width schedule)")
    spec["schedule"] = schedule
    return ParamSpec(**spec)


def parse_spec(raw: Any, *, source: str = "<spec>", base_dir: Path | None = None) -> StudySpec:
    """Validate a spec given as a plain dict (from YAML or from the store).

    Every field is checked against its domain in ``hpo.spec.domains`` (search ranges too).

    Args:
        raw: the parsed YAML/JSON document.
        source: how to name it in errors (usually the file path).
        base_dir: folder that relative CSV paths are resolved against.

    Raises:
        SpecError: one line ``<source>: <field>: got <value>; allowed: <what>``.
    """
    c = Checker(source)
    if not isinstance(raw, dict):
        raise c.refuse("top level", raw, "a mapping of spec fields (name, data, model, space, ...)")
    c.unknown_keys(raw, ("name", "description", "direction", "metric", "objectives", "constraints", "seed", "data",
                         "model", "space", "fixed", "sampler", "pruner", "budget", "retrain", "checkpoint",
                         "report_every", "cv"), "")
    name = c.value("name", raw.get("name"))
    families = _parse_model(c, raw.get("model", "mlp"))
    if len(families) > 1:
        return _parse_family_choice(c, raw, families, source=source, base_dir=base_dir)
    model = families[0]
    vocab = registry.vocabulary(model)

    data = _parse_data(c, c.mapping(raw.get("data"), "data"), base_dir)
    metrics = METRICS[data.task]
    objectives: tuple[ObjectiveSpec, ...] = ()
    if raw.get("objectives") is not None:
        for key in ("metric", "direction"):
            if key in raw:
                raise c.fail(key, "given with objectives: give either metric/direction or objectives, not both")
        objectives = _parse_objectives(c, raw["objectives"], metrics)
        learning = next(o for o in objectives if o.metric in metrics)
        metric, direction = learning.metric, learning.direction
        if len(objectives) == 1:
            objectives = ()  # one objective: the same study as metric/direction
    else:
        metric = c.value(Domain("choice", choices=tuple(metrics)), raw.get("metric", next(iter(metrics))), "metric")
        direction = c.value("direction", raw.get("direction", metrics[metric]))
        if direction != metrics[metric]:
            raise c.refuse("direction", direction, f"{metrics[metric]} ({metric} improves by {metrics[metric]})")
    constraints = _parse_constraints(c, raw.get("constraints"), metrics)

    fixed_raw = c.mapping(raw.get("fixed"), "fixed")
    fixed = {}
    for key, value in fixed_raw.items():
        known_name(c, vocab, key, model, f"fixed.{key}")
        fixed[key] = check_value(c, vocab, key, value, f"fixed.{key}")
    space_raw = c.mapping(raw.get("space"), "space")
    space = tuple(_parse_param(c, vocab, k, v, model) for k, v in space_raw.items())
    for p in space:
        if p.name in fixed:
            raise c.fail(f"fixed.{p.name}", "is also in space: keep one")
    check_references(c, space, fixed)
    check_layer_lists(c, vocab, space, fixed)

    sampler_raw = c.mapping(raw.get("sampler"), "sampler")
    kind = c.value("sampler.kind", sampler_raw.get("kind", "tpe"))
    c.unknown_keys(sampler_raw, ("kind", *SAMPLER_SETTINGS[kind]), "sampler.", f" for sampler kind {kind!r}")
    sampler = SamplerSpec(kind=kind, **{k: c.value(f"sampler.{k}", v) for k, v in sampler_raw.items() if k != "kind"})
    if sampler.kind == "grid":
        for p in space:
            if p.kind == "float" and p.step is None:
                raise c.fail(f"space.{p.name}", "grid search needs choice or a range with step")
    pruner_raw = c.mapping(raw.get("pruner"), "pruner")
    kind = c.value("pruner.kind", pruner_raw.get("kind", "pareto" if len(objectives) > 1 else "median"))
    if len(objectives) > 1 and kind not in MULTI_OBJECTIVE_PRUNERS:
        raise c.refuse("pruner.kind", kind, f"{' or '.join(MULTI_OBJECTIVE_PRUNERS)} (a study of several objectives)")
    c.unknown_keys(pruner_raw, ("kind", *PRUNER_SETTINGS[kind]), "pruner.", f" for pruner kind {kind!r}")
    pruner = PrunerSpec(kind=kind, **{k: c.value(f"pruner.{k}", v) for k, v in pruner_raw.items() if k != "kind"})
    budget_raw = c.mapping(raw.get("budget"), "budget")
    rules = ("max_minutes", "patience", "target")
    c.unknown_keys(budget_raw, ("n_trials", "timeout", *rules), "budget.")
    budget = BudgetSpec(n_trials=c.value("budget.n_trials", budget_raw.get("n_trials", 100)),
                        timeout=c.value("budget.timeout", budget_raw.get("timeout")),
                        **{k: c.value(f"budget.{k}", budget_raw.get(k)) for k in rules})
    if budget.target is not None and len(objectives) > 1:
        raise c.refuse("budget.target", budget.target, "null with several objectives (a target is one best value; "
                       "use patience or max_minutes)")
    retrain_raw = c.mapping(raw.get("retrain"), "retrain")
    c.unknown_keys(retrain_raw, ("folds", "epochs"), "retrain.")
    retrain = RetrainSpec(folds=c.value("retrain.folds", retrain_raw.get("folds", 5)),
                          epochs=c.value("retrain.epochs", retrain_raw.get("epochs")))
    cv = _parse_cv(c, raw, pruner, several=len(objectives) > 1 or bool(constraints))
    description = raw.get("description")
    return StudySpec(
        name=name,
        description="" if description is None else c.value("description", description),
        direction=direction,
        metric=metric,
        seed=c.value("seed", raw.get("seed", 0)),
        data=data,
        families=families,
        space=space,
        fixed=fixed,
        sampler=sampler,
        pruner=pruner,
        budget=budget,
        retrain=retrain,
        checkpoint=_parse_checkpoint(c, raw.get("checkpoint", True)),
        report_every=c.value("report_every", raw.get("report_every", 1)),
        objectives=objectives,
        constraints=constraints,
        cv=cv,
    )


def _parse_cv(c: Checker, raw: dict, pruner: PrunerSpec, *, several: bool) -> CvSpec | None:
    """``cv: {folds: K, score: mean|mean_best, path: auto|stacked|sequential}``, or None. The folds
    replace the single validation split, so a split field beside it is refused; the Wilcoxon
    pruner compares trials fold by fold, so it needs ``cv`` and a threshold it can reach.
    ``several``: the study has several objectives or constraints, which CV trials do not score yet."""
    if raw.get("cv") is None:
        if pruner.kind == "wilcoxon":
            raise c.refuse("pruner.kind", "wilcoxon", "median, hyperband or none without cv (the Wilcoxon "
                           "pruner compares trials fold by fold: add cv: {folds: K})")
        return None
    cv_raw = c.mapping(raw["cv"], "cv")
    if several:
        raise c.refuse("cv", cv_raw, "nothing in a study with several objectives or constraints (a CV trial "
                       "is scored by one metric, the folds' mean)")
    c.unknown_keys(cv_raw, ("folds", "score", "path"), "cv.")
    score, path = c.value("cv.score", cv_raw.get("score", "mean")), c.value("cv.path", cv_raw.get("path", "auto"))
    if "folds" not in cv_raw:
        raise c.refuse("cv.folds", None, "an integer >= 2 (how many fold models score each trial)")
    cv = CvSpec(folds=c.value("cv.folds", cv_raw["folds"]), score=score, path=path)
    data_raw = raw.get("data") or {}
    for key in ("val_fraction", "val_subset"):
        if data_raw.get(key) is not None:
            raise c.refuse(f"data.{key}", data_raw[key], f"nothing with cv (its {cv.folds} folds are the "
                           f"validation sets; leave data.{key} out)")
    if pruner.kind == "wilcoxon":
        if cv.path == "stacked":
            raise c.refuse("cv.path", "stacked", "auto or sequential with the wilcoxon pruner (it prunes "
                           "between folds, so the folds train one after another)")
        # After n folds the one-sided signed-rank test's smallest p is 2**-n: to prune before the
        # last fold it must beat the threshold after K - 1 folds.
        smallest = 2.0 ** -(cv.folds - 1)
        if pruner.p_threshold <= smallest:
            raise c.refuse("pruner.p_threshold", pruner.p_threshold,
                           f"a number in ({show(smallest)}, 1) with cv.folds {cv.folds} (after {cv.folds - 1} "
                           f"folds the Wilcoxon test's smallest p is {show(smallest)}: it could never prune)")
    return cv


def _parse_model(c: Checker, raw: Any) -> tuple[str, ...]:
    """The installed, usable model families (``hpo.nn.registry``) ``model`` names: one name, or
    ``{choice: [name, name, ...]}`` (at least two, none repeated) for a searched family."""
    domain = Domain("choice", choices=registry.names())
    if isinstance(raw, dict):
        c.unknown_keys(raw, ("choice",), "model.")
        names, where = raw.get("choice"), "model.choice"
        if not isinstance(names, list) or len(names) < 2 or len(set(map(repr, names))) != len(names):
            raise c.refuse(where, names, f"a list of at least two different families among {domain}")
    else:
        names, where = [raw], "model"
    families = []
    for i, name in enumerate(names):
        at = f"{where}[{i}]" if where == "model.choice" else where
        model = domain.canonical(name)
        if not domain.contains(model):
            raise c.refuse(at, model, f"{domain} (the installed model families: a package's family needs "
                                      f"that package installed; hpo families lists them)")
        try:
            registry.entry(model)
        except SpecError as e:
            raise c.fail(at, str(e)) from None
        families.append(model)
    return tuple(families)


def _parse_family_choice(c: Checker, raw: dict, families: tuple[str, ...], *, source: str,
                         base_dir: Path | None) -> StudySpec:
    """A spec whose family is searched (``model: {choice: [...]}``): a trial draws its family
    first, as the Optuna parameter ``model``. A parameter some of the families lack must say which
    families it is for (``when: {model: [...]}``); a fixed setting applies to the families that know
    it. The spec restricted to each family is checked as a one-family spec (every field, every
    range); the errors name the family."""
    vocabs = {f: registry.vocabulary(f) for f in families}
    if c.value("sampler.kind", c.mapping(raw.get("sampler"), "sampler").get("kind", "tpe")) == "grid":
        raise c.refuse("sampler.kind", "grid", "tpe or random with a searched model family (a grid would run "
                       "every point of each family's parameters for the other family too)")
    space_raw, fixed_raw = c.mapping(raw.get("space"), "space"), c.mapping(raw.get("fixed"), "fixed")
    union = {n: p for f in families for n, p in vocabs[f].items()}
    for key in fixed_raw:
        if key == FAMILY:
            raise c.fail(f"fixed.{FAMILY}", "is the searched family: give model a single name instead")
        known_name(c, union, key, " or ".join(families), f"fixed.{key}")
    active: dict[str, tuple[str, ...]] = {}
    for key, param in space_raw.items():
        where = f"space.{key}"
        if key == FAMILY:
            raise c.fail(where, "is searched by model: {choice: [...]}; leave it out of space")
        known_name(c, union, key, " or ".join(families), where)
        have = tuple(f for f in families if key in vocabs[f])
        when = c.mapping(param, where).get("when") or {}
        named = c.mapping(when, f"{where}.when").get(FAMILY)
        if named is None:
            if len(have) < len(families):
                raise c.fail(where, f"is a parameter of model {' and '.join(have)} only: add "
                                    f"when: {{model: [{', '.join(have)}]}}")
            active[key] = families
            continue
        named = [Domain("choice", choices=families).canonical(v) for v in (named if isinstance(named, list) else [named])]
        for i, f in enumerate(named):
            if f not in have:
                raise c.refuse(f"{where}.when.{FAMILY}[{i}]", f, f"{', '.join(have)} (the searched families "
                                                                 f"that have {key})")
        active[key] = tuple(f for f in families if f in named)
    parsed = {}
    for f in families:
        space = {}
        for key, param in space_raw.items():
            if f in active[key]:
                param = dict(param)
                when = {k: v for k, v in (param.get("when") or {}).items() if k != FAMILY}
                param.pop("when", None)
                space[key] = {**param, **({"when": when} if when else {})}
        one = {**raw, "model": f, "space": space, "fixed": {k: v for k, v in fixed_raw.items() if k in vocabs[f]}}
        try:
            parsed[f] = parse_spec(one, source=source, base_dir=base_dir)
        except SpecError as e:
            raise SpecError(f"{e} (in the trials of model {f})") from None
    first = parsed[families[0]]
    space = []
    for key in space_raw:
        p = next(q for q in parsed[active[key][0]].space if q.name == key)  # as the first family that has it parsed it
        restricted = active[key] != families
        space.append(replace(p, when={**({FAMILY: active[key]} if restricted else {}), **p.when}))
    fixed = {k: v for f in families for k, v in parsed[f].fixed.items()}
    return replace(first, families=families, space=tuple(space), fixed={k: fixed[k] for k in fixed_raw})


def _parse_objectives(c: Checker, raw: Any, metrics: dict[str, str]) -> tuple[ObjectiveSpec, ...]:
    """``objectives: [{metric, direction}, ...]``: the task's val_* metrics (in the direction that
    improves them) and the model's own (``MODEL_METRICS``, either direction), at least one val_*."""
    allowed = {**metrics, **MODEL_METRICS}
    if not isinstance(raw, list) or not raw:
        raise c.refuse("objectives", raw, "a non-empty list of {metric: M, direction: minimize|maximize}")
    out = []
    for i, item in enumerate(raw):
        where = f"objectives[{i}]"
        item = c.mapping(item, where)
        c.unknown_keys(item, ("metric", "direction"), f"{where}.")
        metric = c.value(Domain("choice", choices=tuple(allowed)), item.get("metric"), f"{where}.metric")
        if any(o.metric == metric for o in out):
            raise c.refuse(f"{where}.metric", metric, "a metric not already an objective")
        direction = c.value("direction", item.get("direction", allowed[metric]), f"{where}.direction")
        if metric in metrics and direction != metrics[metric]:
            raise c.refuse(f"{where}.direction", direction, f"{metrics[metric]} ({metric} improves by {metrics[metric]})")
        out.append(ObjectiveSpec(metric, direction))
    if not any(o.metric in metrics for o in out):
        raise c.refuse("objectives", [o.metric for o in out],
                       f"a list with at least one of {', '.join(metrics)} (the metric training reports and pruning judges)")
    return tuple(out)


def _parse_constraints(c: Checker, raw: Any, metrics: dict[str, str]) -> tuple[ConstraintSpec, ...]:
    """``constraints: {n_params: {max: 100000}, val_accuracy: {min: 0.85}}``."""
    allowed = (*metrics, *MODEL_METRICS)
    out = []
    for metric, bounds in c.mapping(raw, "constraints").items():
        where = f"constraints.{metric}"
        if metric not in allowed:
            raise c.fail(where, f"unknown metric {metric!r}; allowed: {', '.join(allowed)}")
        bounds = c.mapping(bounds, where)
        c.unknown_keys(bounds, ("min", "max"), f"{where}.")
        if not bounds:
            raise c.refuse(where, bounds, "{min: A}, {max: B} or both")
        low = c.value("constraints.min", bounds["min"], f"{where}.min") if "min" in bounds else None
        high = c.value("constraints.max", bounds["max"], f"{where}.max") if "max" in bounds else None
        if low is not None and high is not None and low > high:
            raise c.refuse(f"{where}.max", high, f"a number >= min ({low})")
        out.append(ConstraintSpec(metric, low, high))
    return tuple(out)


def _parse_checkpoint(c: Checker, raw: Any) -> CheckpointSpec:
    """``checkpoint: false`` (off), ``true`` (the defaults) or ``{every_seconds: S}``."""
    if isinstance(raw, bool):
        return CheckpointSpec(enabled=raw)
    if not isinstance(raw, dict):
        raise c.refuse("checkpoint", raw, "false, true or a mapping {every_seconds: S}")
    c.unknown_keys(raw, ("every_seconds",), "checkpoint.")
    return CheckpointSpec(every_seconds=c.value("checkpoint.every_seconds", raw.get("every_seconds", 60.0)))


def _parse_data(c: Checker, raw: dict, base_dir: Path | None) -> DataSpec:
    c.unknown_keys(raw, tuple(DataSpec.__dataclass_fields__), "data.")
    source, tasks, wanted = _parse_source(c, raw)
    task = c.value("data.task", raw.get("task", "regression" if source == "csv" else "classification"))
    if task not in tasks:
        raise c.refuse("data.task", task, f"{', '.join(tasks)} (what data.source {source} serves)")
    kwargs: dict[str, Any] = {"source": source, "task": task,
                              "val_fraction": c.value("data.val_fraction", raw.get("val_fraction", 0.2))}
    for key in ("train_subset", "val_subset"):
        kwargs[key] = c.value(f"data.{key}", raw.get(key))
    as_written = dict(c.mapping(raw.get("as_written"), "data.as_written"))
    paths = ["data_dir"] + (["train", "test"] if source == "csv" else [k for k in ("train", "test") if k in raw])
    for key in wanted:
        if raw.get(key) is None and not raw.get("files"):
            raise c.refuse(f"data.{key}", None, f"a path (data.source {source} reads data.train and data.test)")
    for key in paths:
        written = c.value(f"data.{key}", raw.get(key))
        if written is not None:
            kwargs[key] = _resolve(written, base_dir)
            if kwargs[key] != written:
                as_written[key] = written
    if source == "csv":
        features = raw.get("features", ["x"])
        kwargs["features"] = tuple(c.value("data.features", [features] if isinstance(features, str) else features))
        kwargs["target"] = c.value("data.target", raw.get("target", "y"))
        if raw.get("files") is not None:
            kwargs["files"] = _parse_files(c, raw["files"])
        if raw.get("inline") is not None:
            kwargs["inline"] = c.mapping(raw["inline"], "data.inline")
    elif source not in DATA_SOURCES and raw.get("files") is not None:
        kwargs["files"] = _parse_files(c, raw["files"], ("arrays",))
    kwargs["as_written"] = {k: v for k, v in as_written.items() if k in paths} or None
    return DataSpec(**kwargs)


def _parse_source(c: Checker, raw: dict) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``data.source``: a legacy source or an installed registry one (``hpo.data.registry``); a stored
    spec whose data are in the store (``files.arrays``) needs no source installed. Returns the source,
    the tasks it serves and the paths it needs."""
    from hpo.data import registry as sources

    source = raw.get("source")
    if source in DATA_SOURCES:
        return c.value("data.source", source), ("regression", "classification") if source == "csv" else (
            "classification",), ()
    domain = Domain("choice", choices=sources.names())
    if isinstance(raw.get("files"), dict) and "arrays" in raw["files"] and isinstance(source, str):
        return source, ("regression", "classification"), ()
    source = c.value(domain, domain.canonical(source), "data.source")
    try:
        src = sources.source(source)
    except HpoError as e:
        raise c.fail("data.source", str(e)) from None
    return source, src.tasks, src.paths


def _parse_files(c: Checker, raw: Any, parts: tuple[str, ...] = ("train", "test")) -> dict:
    """References to data files in the store, as ``create-study`` writes them (hpo.data.tables)."""
    files = c.mapping(raw, "data.files")
    c.unknown_keys(files, parts, "data.files.")
    for part, ref in files.items():
        sha = c.mapping(ref, f"data.files.{part}").get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
            raise c.fail(f"data.files.{part}.sha256", f"expected 64 lowercase hex digits, got {sha!r}")
    return files


def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def studies_dirs() -> list[Path]:
    """Where ``hpo create-study NAME`` looks for ``NAME.yaml``, in order."""
    dirs = []
    if os.environ.get("HPO_STUDIES_DIR"):
        dirs.append(Path(os.environ["HPO_STUDIES_DIR"]))
    dirs.append(Path.cwd() / "studies")
    dirs.append(Path(__file__).resolve().parent.parent / "studies")
    return dirs


def find_spec_file(name_or_path: str) -> Path:
    """Resolve a study name (``regression``) or a path to a YAML file.

    Raises:
        SpecError: when neither exists, listing where it looked and the known names.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if p.is_file():
            return p
        raise SpecError(f"spec file {name_or_path!r} does not exist")
    looked = []
    for d in studies_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = d / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
        looked.append(str(d))
    known = sorted({f.stem for d in studies_dirs() if d.is_dir() for f in d.glob("*.y*ml")})
    raise SpecError(f"no study spec named {name_or_path!r} (looked in {', '.join(dict.fromkeys(looked))}); "
                    f"known: {', '.join(known) or 'none'}")


def load_spec_file(path: Path) -> StudySpec:
    """Read and validate one YAML spec file (within the limits of ``hpo.spec.yaml_file``)."""
    from hpo.spec.yaml_file import read_yaml

    return parse_spec(read_yaml(path), source=str(path), base_dir=path.resolve().parent)
