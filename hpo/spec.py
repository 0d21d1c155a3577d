"""Study specs: the YAML schema, parsed and validated once into frozen objects.

A spec travels inside the store as a plain dict (``StudySpec.to_dict``), so a worker on another
machine rebuilds exactly the same object with ``parse_spec`` and needs no copy of ``studies/``.
Every error names the file, the field, the value received and what is allowed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from hpo.errors import SpecError
from hpo.hyperparams import HYPERPARAMETERS, canonical_choice

DIRECTIONS = ("minimize", "maximize")
DATA_SOURCES = ("csv", "fashion_mnist", "mnist")
TASKS = ("regression", "classification")
FAMILIES = ("mlp", "cnn")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none", "hyperband")
SCHEDULES = ("free", "constant", "decreasing", "search")
PARAM_KINDS = ("int", "float", "choice")
# metric -> the direction that improves it
METRICS = {
    "regression": {"val_mse": "minimize", "val_mae": "minimize", "val_loss": "minimize"},
    "classification": {"val_accuracy": "maximize", "val_loss": "minimize"},
}


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
    # CSV files kept in the store (hpo.datastore), by reference: {"train": {name, size, rows, columns, sha256}, "test": ...}
    files: dict | None = None
    inline: dict | None = None  # CSV tables embedded in the spec by hpo before the store kept data; still read

    def to_dict(self) -> dict:
        d = {
            "source": self.source,
            "task": self.task,
            "val_fraction": self.val_fraction,
        }
        if self.source == "csv":
            d.update(train=self.train, test=self.test, features=list(self.features), target=self.target)
        for key in ("train_subset", "val_subset", "data_dir", "files", "inline"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass(frozen=True)
class PrunerSpec:
    kind: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    min_resource: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class BudgetSpec:
    n_trials: int | None = 100
    timeout: float | None = None


@dataclass(frozen=True)
class RetrainSpec:
    folds: int = 5
    epochs: int | None = None  # None: the trial's own epochs


@dataclass(frozen=True)
class StudySpec:
    name: str
    direction: str
    metric: str
    data: DataSpec
    model: str
    space: tuple[ParamSpec, ...]
    fixed: dict
    seed: int = 0
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    budget: BudgetSpec = BudgetSpec()
    retrain: RetrainSpec = RetrainSpec()
    report_every: int = 1
    description: str = ""

    @property
    def task(self) -> str:
        return self.data.task

    def with_data(self, data: DataSpec) -> "StudySpec":
        return replace(self, data=data)

    def to_dict(self) -> dict:
        """The canonical plain-dict form; ``parse_spec(spec.to_dict())`` gives back an equal spec."""
        return {
            "name": self.name,
            "description": self.description,
            "direction": self.direction,
            "metric": self.metric,
            "seed": self.seed,
            "data": self.data.to_dict(),
            "model": self.model,
            "space": {p.name: p.to_dict() for p in self.space},
            "fixed": dict(self.fixed),
            "sampler": vars(self.sampler).copy(),
            "pruner": vars(self.pruner).copy(),
            "budget": vars(self.budget).copy(),
            "retrain": vars(self.retrain).copy(),
            "report_every": self.report_every,
        }


class _Checker:
    """Builds one-line errors of the form ``<file>: <field>: <problem>``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: {where}: {message}")

    def mapping(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {value!r}")
        return value

    def unknown_keys(self, d: dict, allowed: tuple[str, ...], where: str) -> None:
        for key in d:
            if key not in allowed:
                raise self.fail(f"{where}{key}" if where else key,
                                f"unknown key; allowed: {', '.join(allowed)}")

    def one_of(self, value: Any, allowed: tuple, where: str) -> Any:
        if value not in allowed:
            raise self.fail(where, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value

    def integer(self, value: Any, where: str, *, minimum: int | None = None, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value}")
        return value

    def number(self, value: Any, where: str, *, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"expected a finite number, got {value!r}")
        return value


def _check_value(c: _Checker, name: str, value: Any, where: str) -> Any:
    """Check one value of a known hyperparameter (scalar, or a list for per-layer ones)."""
    hp = HYPERPARAMETERS[name]
    if isinstance(value, list):
        if not hp.per_layer:
            raise c.fail(where, f"{name} takes one value, not a list: {value!r}")
        return [_check_value(c, name, v, f"{where}[{i}]") for i, v in enumerate(value)]
    value = canonical_choice(name, value)
    if hp.choices is not None:
        return c.one_of(value, hp.choices, where)
    if hp.type is bool:
        if not isinstance(value, bool):
            raise c.fail(where, f"expected true or false, got {value!r}")
        return value
    if hp.type is int:
        return c.integer(value, where, minimum=0)
    c.number(value, where)
    if value < 0:
        raise c.fail(where, f"must be >= 0, got {value}")
    return float(value)


def _known_name(c: _Checker, name: str, family: str, where: str) -> None:
    hp = HYPERPARAMETERS.get(name)
    if hp is None:
        raise c.fail(where, f"unknown hyperparameter {name!r}; allowed: {', '.join(sorted(HYPERPARAMETERS))}")
    if hp.families is not None and family not in hp.families:
        raise c.fail(where, f"{name!r} does not apply to model {family!r} (only {', '.join(hp.families)})")


def _parse_param(c: _Checker, name: str, raw: Any, family: str) -> ParamSpec:
    where = f"space.{name}"
    _known_name(c, name, family, where)
    raw = c.mapping(raw, where)
    kinds = [k for k in PARAM_KINDS if k in raw]
    if len(kinds) != 1:
        raise c.fail(where, f"give exactly one of {', '.join(PARAM_KINDS)} (e.g. {{float: [1e-4, 1e-2], log: true}}), got {raw!r}")
    kind = kinds[0]
    c.unknown_keys(raw, (kind, "step", "log", "when", "per_layer", "schedule"), f"{where}.")
    hp = HYPERPARAMETERS[name]
    spec: dict[str, Any] = {"name": name, "kind": kind}
    if kind == "choice":
        choices = raw["choice"]
        if not isinstance(choices, list) or not choices:
            raise c.fail(f"{where}.choice", f"expected a non-empty list, got {choices!r}")
        spec["choices"] = tuple(_check_value(c, name, v, f"{where}.choice[{i}]") for i, v in enumerate(choices))
        if len(set(map(repr, spec["choices"]))) != len(spec["choices"]):
            raise c.fail(f"{where}.choice", f"values repeat: {choices!r}")
    else:
        bounds = raw[kind]
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise c.fail(f"{where}.{kind}", f"expected [low, high], got {bounds!r}")
        if hp.choices is not None or hp.type is bool:
            raise c.fail(where, f"{name} is categorical: use choice: [...] with values from {', '.join(map(str, hp.choices or (True, False)))}")
        if kind == "int":
            low, high = (c.integer(b, f"{where}.int") for b in bounds)
        else:
            if hp.type is int:
                raise c.fail(where, f"{name} is an integer: use int: [low, high]")
            low, high = (float(c.number(b, f"{where}.float")) for b in bounds)
        if not low < high:
            raise c.fail(f"{where}.{kind}", f"low must be < high, got [{bounds[0]}, {bounds[1]}] (for a fixed value use fixed.{name})")
        if low < 0:
            raise c.fail(f"{where}.{kind}", f"must be >= 0, got low={bounds[0]}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise c.fail(f"{where}.log", f"expected true or false, got {log!r}")
        if log and low <= 0:
            raise c.fail(f"{where}.{kind}", f"a log range needs low > 0, got {bounds[0]}")
        step = raw.get("step")
        if step is not None:
            step = c.integer(step, f"{where}.step", minimum=1) if kind == "int" else c.number(step, f"{where}.step")
            if step <= 0 or step > high - low:
                raise c.fail(f"{where}.step", f"must be > 0 and <= high - low ({high - low}), got {step}")
            if log:
                raise c.fail(f"{where}.step", "step and log cannot be combined (Optuna samples either)")
        spec.update(low=low, high=high, step=step, log=log)
    when = c.mapping(raw.get("when"), f"{where}.when")
    spec["when"] = {k: tuple(canonical_choice(k, x) for x in (v if isinstance(v, list) else [v]))
                    for k, v in when.items()}
    per_layer = raw.get("per_layer")
    if per_layer is not None:
        if not hp.per_layer:
            raise c.fail(f"{where}.per_layer", f"{name} is not a per-layer parameter")
        if not isinstance(per_layer, str):
            raise c.fail(f"{where}.per_layer", f"name the layer-count parameter (e.g. n_layers), got {per_layer!r}")
        spec["per_layer"] = per_layer
    schedule = raw.get("schedule", "free")
    c.one_of(schedule, SCHEDULES, f"{where}.schedule")
    if schedule != "free" and (per_layer is None or kind != "int"):
        raise c.fail(f"{where}.schedule", "a width schedule needs an int range and per_layer")
    spec["schedule"] = schedule
    return ParamSpec(**spec)


def _check_references(c: _Checker, space: tuple[ParamSpec, ...], fixed: dict) -> None:
    """Conditions and layer counts must refer to parameters defined earlier (or fixed)."""
    seen: dict[str, ParamSpec] = {}
    for p in space:
        for other, allowed in p.when.items():
            where = f"space.{p.name}.when.{other}"
            if other in seen:
                ref = seen[other]
                if ref.kind == "choice":
                    for v in allowed:
                        if v not in ref.choices:
                            raise c.fail(where, f"{v!r} is not among {other}'s choices {list(ref.choices)}")
            elif other not in fixed:
                raise c.fail(where, f"{other!r} must be searched above {p.name!r} or fixed")
        if p.per_layer:
            where = f"space.{p.name}.per_layer"
            ref = seen.get(p.per_layer)
            if ref is not None:
                if ref.kind != "int" and not (ref.kind == "choice" and all(isinstance(v, int) for v in ref.choices)):
                    raise c.fail(where, f"{p.per_layer!r} must be an integer parameter")
            elif not isinstance(fixed.get(p.per_layer), int):
                raise c.fail(where, f"{p.per_layer!r} must be searched above {p.name!r} or fixed to an integer")
        seen[p.name] = p


def parse_spec(raw: Any, *, source: str = "<spec>", base_dir: Path | None = None) -> StudySpec:
    """Validate a spec given as a plain dict (from YAML or from the store).

    Args:
        raw: the parsed YAML/JSON document.
        source: how to name it in errors (usually the file path).
        base_dir: folder that relative CSV paths are resolved against.

    Raises:
        SpecError: naming the file, the field, the bad value and what is allowed.
    """
    c = _Checker(source)
    if not isinstance(raw, dict):
        raise c.fail("top level", f"expected a mapping of spec fields (name, data, model, space, ...), got {raw!r}")
    c.unknown_keys(raw, ("name", "description", "direction", "metric", "seed", "data", "model", "space",
                         "fixed", "sampler", "pruner", "budget", "retrain", "report_every"), "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(ch in name for ch in "/\\ "):
        raise c.fail("name", f"expected a study name without spaces or slashes, got {name!r}")
    model = c.one_of(raw.get("model", "mlp"), FAMILIES, "model")

    data = _parse_data(c, c.mapping(raw.get("data"), "data"), base_dir)
    metric = c.one_of(raw.get("metric", "val_mse" if data.task == "regression" else "val_accuracy"),
                      tuple(METRICS[data.task]), "metric")
    direction = c.one_of(raw.get("direction", METRICS[data.task][metric]), DIRECTIONS, "direction")
    if direction != METRICS[data.task][metric]:
        raise c.fail("direction", f"{metric} improves by {METRICS[data.task][metric]}, got {direction!r}")

    fixed_raw = c.mapping(raw.get("fixed"), "fixed")
    fixed = {}
    for key, value in fixed_raw.items():
        _known_name(c, key, model, f"fixed.{key}")
        fixed[key] = _check_value(c, key, value, f"fixed.{key}")
    space_raw = c.mapping(raw.get("space"), "space")
    space = tuple(_parse_param(c, k, v, model) for k, v in space_raw.items())
    for p in space:
        if p.name in fixed:
            raise c.fail(f"fixed.{p.name}", "is also in space: keep one")
    _check_references(c, space, fixed)

    sampler_raw = c.mapping(raw.get("sampler"), "sampler")
    c.unknown_keys(sampler_raw, ("kind", "n_startup_trials", "multivariate"), "sampler.")
    sampler = SamplerSpec(
        kind=c.one_of(sampler_raw.get("kind", "tpe"), SAMPLERS, "sampler.kind"),
        n_startup_trials=c.integer(sampler_raw.get("n_startup_trials", 10), "sampler.n_startup_trials", minimum=0),
        multivariate=sampler_raw.get("multivariate", False),
    )
    if not isinstance(sampler.multivariate, bool):
        raise c.fail("sampler.multivariate", f"expected true or false, got {sampler.multivariate!r}")
    if sampler.kind == "grid":
        for p in space:
            if p.kind == "float" and p.step is None:
                raise c.fail(f"space.{p.name}", "grid search needs choice or a range with step")
    pruner_raw = c.mapping(raw.get("pruner"), "pruner")
    c.unknown_keys(pruner_raw, tuple(vars(PrunerSpec()).keys()), "pruner.")
    pruner = PrunerSpec(
        kind=c.one_of(pruner_raw.get("kind", "median"), PRUNERS, "pruner.kind"),
        **{k: c.integer(pruner_raw[k], f"pruner.{k}", minimum=0) for k in pruner_raw if k != "kind"},
    )
    budget_raw = c.mapping(raw.get("budget"), "budget")
    c.unknown_keys(budget_raw, ("n_trials", "timeout"), "budget.")
    budget = BudgetSpec(
        n_trials=c.integer(budget_raw.get("n_trials", 100), "budget.n_trials", minimum=1, optional=True),
        timeout=c.number(budget_raw.get("timeout"), "budget.timeout", optional=True),
    )
    retrain_raw = c.mapping(raw.get("retrain"), "retrain")
    c.unknown_keys(retrain_raw, ("folds", "epochs"), "retrain.")
    retrain = RetrainSpec(
        folds=c.integer(retrain_raw.get("folds", 5), "retrain.folds", minimum=2),
        epochs=c.integer(retrain_raw.get("epochs"), "retrain.epochs", minimum=1, optional=True),
    )
    return StudySpec(
        name=name,
        description=str(raw.get("description") or ""),
        direction=direction,
        metric=metric,
        seed=c.integer(raw.get("seed", 0), "seed", minimum=0),
        data=data,
        model=model,
        space=space,
        fixed=fixed,
        sampler=sampler,
        pruner=pruner,
        budget=budget,
        retrain=retrain,
        report_every=c.integer(raw.get("report_every", 1), "report_every", minimum=1),
    )


def _parse_data(c: _Checker, raw: dict, base_dir: Path | None) -> DataSpec:
    c.unknown_keys(raw, tuple(DataSpec.__dataclass_fields__), "data.")
    source = c.one_of(raw.get("source"), DATA_SOURCES, "data.source")
    task = c.one_of(raw.get("task", "regression" if source == "csv" else "classification"), TASKS, "data.task")
    if source != "csv" and task != "classification":
        raise c.fail("data.task", f"{source} is a classification data set, got {task!r}")
    val_fraction = c.number(raw.get("val_fraction", 0.2), "data.val_fraction")
    if not 0 < val_fraction < 1:
        raise c.fail("data.val_fraction", f"must be between 0 and 1, got {val_fraction}")
    kwargs: dict[str, Any] = {"source": source, "task": task, "val_fraction": float(val_fraction)}
    for key in ("train_subset", "val_subset"):
        kwargs[key] = c.integer(raw.get(key), f"data.{key}", minimum=1, optional=True)
    if raw.get("data_dir") is not None:
        kwargs["data_dir"] = _resolve(str(raw["data_dir"]), base_dir)
    if source == "csv":
        for key in ("train", "test"):
            if not isinstance(raw.get(key), str):
                raise c.fail(f"data.{key}", f"a csv study needs the path of its {key} CSV, got {raw.get(key)!r}")
            kwargs[key] = _resolve(raw[key], base_dir)
        features = raw.get("features", ["x"])
        if isinstance(features, str):
            features = [features]
        if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
            raise c.fail("data.features", f"expected a list of column names, got {features!r}")
        kwargs["features"] = tuple(features)
        if not isinstance(raw.get("target", "y"), str):
            raise c.fail("data.target", f"expected a column name, got {raw.get('target')!r}")
        kwargs["target"] = raw.get("target", "y")
        if raw.get("files") is not None:
            kwargs["files"] = _parse_files(c, raw["files"])
        if raw.get("inline") is not None:
            kwargs["inline"] = c.mapping(raw["inline"], "data.inline")
    return DataSpec(**kwargs)


def _parse_files(c: _Checker, raw: Any) -> dict:
    """References to data files in the store, as ``create-study`` writes them (hpo.tables)."""
    files = c.mapping(raw, "data.files")
    c.unknown_keys(files, ("train", "test"), "data.files.")
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
    """Read and validate one YAML spec file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise SpecError(f"{path}: {where}: malformed YAML: {getattr(e, 'problem', e)}") from e
    return parse_spec(raw, source=str(path), base_dir=path.resolve().parent)
