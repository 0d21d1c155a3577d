"""The allowed values of every spec field and hyperparameter: one table, used both to check fixed
values and to check that a search range (``[low, high]``, or every value of a ``choice`` list)
lies inside the domain.

``DOMAINS`` is keyed by the field's path in the spec: a hyperparameter by its name (``epochs``:
the same domain under ``fixed.epochs`` and ``space.epochs``, and for each layer of a per-layer
one), every other field by its dotted path (``pruner.min_resource``). Settings that belong to one
pruner or sampler kind are listed in ``PRUNER_SETTINGS`` / ``SAMPLER_SETTINGS``.
Free of torch and optuna, so validating a spec stays instant.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from hpo.spec.hyperparams import ACTIVATIONS, INITS, OPTIMIZERS, POOLINGS, SCHEDULERS

DIRECTIONS = ("minimize", "maximize")
DATA_SOURCES = ("csv", "fashion_mnist", "mnist")
TASKS = ("regression", "classification")
FAMILIES = ("mlp", "cnn")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("median", "none", "hyperband", "pareto", "wilcoxon")
CV_SCORES = ("mean", "mean_best")  # the folds' final values; each fold's best value over epochs
CV_PATHS = ("auto", "stacked", "sequential")
SCHEDULES = ("free", "constant", "decreasing", "search")
# metric -> the direction that improves it
METRICS = {
    "regression": {"val_mse": "minimize", "val_mae": "minimize", "val_loss": "minimize"},
    "classification": {"val_accuracy": "maximize", "val_loss": "minimize"},
}
# Quantities of a trial's model that any task has, for `objectives` and `constraints` beside the
# val_* metrics (hpo.search.measures): metric -> the direction that improves it.
MODEL_METRICS = {"n_params": "minimize", "train_seconds": "minimize", "latency_ms": "minimize"}
# Those known once the model is built, before any training: a constraint on one is checked then.
KNOWN_BEFORE_TRAINING = ("n_params", "latency_ms")
# Study names become file names (storage/reports/NAME.html, storage/exports/NAME and the hidden
# temporary names written beside them, up to 19 bytes longer): Linux and macOS allow 255 bytes per
# path component, so names stay well under that.
NAME_MAX_BYTES = 200
SEED_MAX = 2**31 - 1  # numpy's and Optuna's samplers take seeds below 2**32; workers add their offsets
DESCRIPTION_MAX_BYTES = 10_000  # the description is stored in the study and shown in reports
# Upper bounds of sizes, counts and epochs: far above any study of the kind hpo runs, low enough
# that a typo (or a hostile spec) cannot hold a worker for hours or exhaust its memory. An owner
# with the hardware raises one with HPO_LIMITS (``limits``), wherever the study's workers run.
LIMITS = {
    "epochs": 100_000, "batch_size": 1 << 20, "n_layers": 128, "width": 65_536, "n_conv": 32,
    "filters": 4096, "kernel_size": 64, "padding": 64, "n_dense": 32, "dense_width": 65_536,
    "plateau_patience": 100_000, "plateau_cooldown": 100_000, "early_stopping": 100_000,
    "report_every": 100_000, "retrain.folds": 100, "retrain.epochs": 100_000,
}


@dataclass(frozen=True)
class Domain:
    """A set of allowed values.

    ``kind``: ``int``, ``float`` (ints accepted), ``bool``, ``choice`` (one of ``choices``,
    strings matched case-insensitively), ``text`` (a string; ``low=1``: non-empty), ``texts``
    (a non-empty list of non-empty strings) or ``name`` (a study name). ``low``/``high`` bound
    numbers, excluded when ``low_open``/``high_open``; ``optional``: null is allowed too.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    note: str = ""  # said after the allowed values (how to raise a limit)

    def canonical(self, value: Any) -> Any:
        """The canonical spelling of a choice (case-insensitive match), else the value itself."""
        if self.kind == "choice" and isinstance(value, str):
            for choice in self.choices:
                if isinstance(choice, str) and choice.lower() == value.lower():
                    return choice
        return value

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (already canonical) is allowed."""
        if value is None:
            return self.optional
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "text":
            return (isinstance(value, str) and len(value) >= (self.low or 0)
                    and (self.high is None or len(value.encode("utf-8", "replace")) <= self.high))
        if self.kind == "texts":
            return (isinstance(value, list) and bool(value)
                    and all(isinstance(v, str) and v for v in value))
        if self.kind == "name":
            return is_study_name(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def __str__(self) -> str:
        if self.kind == "choice":
            text = ", ".join(c if isinstance(c, str) else show(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "text":
            text = "a non-empty string" if self.low else "a string"
            if self.high is not None:
                text += f" of at most {self.high:,} bytes"
        elif self.kind == "texts":
            text = "a non-empty list of column names"
        elif self.kind == "name":
            text = (f"a name of 1 to {NAME_MAX_BYTES} bytes (UTF-8), not '.' or '..', without spaces, slashes "
                    f"or control characters (reports and exports are files named after it)")
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            low, high = show(self.low), show(self.high)
            if self.low is not None and self.high is not None:
                text = f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text = f"{noun} {'>' if self.low_open else '>='} {low}"
            elif self.high is not None:
                text = f"{noun} {'<' if self.high_open else '<='} {high}"
            else:
                text = "an integer" if self.kind == "int" else "a finite number"
        text = f"{text}, or null" if self.optional else text
        return f"{text} ({self.note})" if self.note else text


def integer(low: int | None = None, high: int | None = None, *, optional: bool = False) -> Domain:
    return Domain("int", low, high, optional=optional)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Domain:
    return Domain("float", low, high, low_open, high_open, optional=optional)


def one_of(choices: tuple) -> Domain:
    return Domain("choice", choices=tuple(choices))


BOOL = Domain("bool")
TEXT = Domain("text")
NON_EMPTY_TEXT = Domain("text", low=1)

# A fraction of a unit: dropout rates, momentum.
FRACTION = number(0, 1, high_open=True)

DOMAINS: dict[str, Domain] = {
    # hyperparameters (hpo/spec/hyperparams.py), under fixed.NAME and space.NAME
    "epochs": integer(1, LIMITS["epochs"]),
    "batch_size": integer(1, LIMITS["batch_size"]),
    "lr": number(0, low_open=True),
    "weight_decay": number(0),
    "optimizer": one_of(OPTIMIZERS),
    "momentum": FRACTION,
    "scheduler": one_of(SCHEDULERS),
    "plateau_factor": number(0, 1, low_open=True, high_open=True),
    "plateau_patience": integer(0, LIMITS["plateau_patience"]),
    "plateau_cooldown": integer(0, LIMITS["plateau_cooldown"]),
    "lr_decay": number(0, 1, low_open=True),
    "early_stopping": integer(0, LIMITS["early_stopping"]),
    "augment": BOOL,
    "activation": one_of(ACTIVATIONS),
    "init": one_of(INITS),
    "n_layers": integer(1, LIMITS["n_layers"]),
    "width": integer(1, LIMITS["width"]),
    "dropout": FRACTION,
    "n_conv": integer(1, LIMITS["n_conv"]),
    "filters": integer(1, LIMITS["filters"]),
    "kernel_size": integer(1, LIMITS["kernel_size"]),
    "padding": integer(0, LIMITS["padding"]),
    "batch_norm": BOOL,
    "pooling": one_of(POOLINGS),
    "conv_dropout": FRACTION,
    "n_dense": integer(0, LIMITS["n_dense"]),  # no hidden dense layer: the conv stack feeds the output layer
    "dense_width": integer(1, LIMITS["dense_width"]),
    # the spec's own fields
    "name": Domain("name"),
    "description": Domain("text", high=DESCRIPTION_MAX_BYTES),
    "direction": one_of(DIRECTIONS),
    "metric": one_of(tuple(dict.fromkeys(m for task in METRICS.values() for m in task))),
    "seed": integer(0, SEED_MAX),
    "model": one_of(FAMILIES),
    "report_every": integer(1, LIMITS["report_every"]),
    "data.source": one_of(DATA_SOURCES),
    "data.task": one_of(TASKS),
    "data.train": NON_EMPTY_TEXT,
    "data.test": NON_EMPTY_TEXT,
    "data.features": Domain("texts"),
    "data.target": NON_EMPTY_TEXT,
    "data.val_fraction": number(0, 1, low_open=True, high_open=True),
    "data.train_subset": integer(1, optional=True),
    "data.val_subset": integer(1, optional=True),
    "data.data_dir": Domain("text", low=1, optional=True),
    "sampler.kind": one_of(SAMPLERS),
    "sampler.n_startup_trials": integer(0),
    "sampler.multivariate": BOOL,
    "sampler.population_size": integer(2),
    "pruner.kind": one_of(PRUNERS),
    "pruner.n_startup_trials": integer(0),
    "pruner.n_warmup_steps": integer(0),
    "pruner.interval_steps": integer(1),
    "pruner.min_resource": integer(1),
    "pruner.reduction_factor": integer(2),
    "pruner.p_threshold": number(0, 1, low_open=True, high_open=True),
    "pruner.n_startup_steps": integer(0),
    "cv.folds": integer(2),
    "cv.score": one_of(CV_SCORES),
    "cv.path": one_of(CV_PATHS),
    "budget.n_trials": integer(1, optional=True),  # null: no limit (stop workers with --n-trials or a signal)
    "budget.timeout": number(0, low_open=True, optional=True),  # seconds
    "budget.max_minutes": number(0, low_open=True, optional=True),
    "budget.patience": integer(1, optional=True),
    "budget.target": number(optional=True),
    "constraints.min": number(),
    "constraints.max": number(),
    "retrain.folds": integer(2, LIMITS["retrain.folds"]),
    "retrain.epochs": integer(1, LIMITS["retrain.epochs"], optional=True),  # null: each fold model trains the trial's epochs
    # seconds of training between a running trial's (or retrain's) checkpoints; 0: every epoch
    "checkpoint.every_seconds": number(0),
    # keys of a search range in space.NAME
    "space.log": BOOL,
    "space.schedule": one_of(SCHEDULES),
}

# Which settings each pruner / sampler kind takes (Optuna's constructor arguments of that name).
PRUNER_SETTINGS = {"median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
                   "hyperband": ("min_resource", "reduction_factor"), "none": (),
                   "pareto": ("n_startup_trials", "n_warmup_steps"),
                   "wilcoxon": ("p_threshold", "n_startup_steps")}
SAMPLER_SETTINGS = {"tpe": ("n_startup_trials", "multivariate"), "nsga2": ("population_size",), "random": (),
                    "grid": ()}
# Pruners a study of several objectives takes (Optuna's own refuse them: optuna/optuna#3450).
MULTI_OBJECTIVE_PRUNERS = ("pareto", "none")

def limits() -> dict[str, int]:
    """``LIMITS`` with the owner's overrides from ``HPO_LIMITS`` (``NAME=N,NAME=N``, e.g.
    ``n_layers=512,epochs=1000000``).

    Raises:
        SpecError: an unknown name or a value that is not a whole number >= 1.
    """
    from hpo.errors import SpecError

    out = dict(LIMITS)
    raw = os.environ.get("HPO_LIMITS", "").strip()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in LIMITS:
            raise SpecError(f"HPO_LIMITS: {show(key)} has no limit; names: {', '.join(LIMITS)}")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = 0
        if out[key] < 1:
            raise SpecError(f"HPO_LIMITS: {key}={show(value.strip())}; allowed: a whole number >= 1")
    return out


def domain_of(key: str, domain: Domain | None = None) -> Domain:
    """``domain`` (default ``DOMAINS[key]``) with the upper bound of ``LIMITS`` that ``HPO_LIMITS``
    raises or lowers, when it has that bound (a model plugin's own bounds stay as they are)."""
    domain = DOMAINS[key] if domain is None else domain
    if key not in LIMITS or domain.high != LIMITS[key]:
        return domain
    return replace(domain, high=limits()[key], note=f"HPO_LIMITS={key}=N sets the upper bound")


class _Full(Exception):
    pass


def show(value: Any, *, limit: int = 200) -> str:
    """A value as the spec would spell it (true, null, 'text', [1, 2]); long strings cut short, and
    the whole cut at about ``limit`` characters, however large the value (it is never rendered whole)."""
    out: list[str] = []
    left = [limit]

    def put(text: str) -> None:
        if left[0] <= 0:
            raise _Full
        out.append(text)
        left[0] -= len(text)

    def walk(v: Any) -> None:
        if v is None:
            put("null")
        elif isinstance(v, bool):
            put("true" if v else "false")
        elif isinstance(v, str) and len(v) > 40:
            put(f"{v[:20]!r}... ({len(v.encode('utf-8', 'replace'))} bytes)")
        elif isinstance(v, int) and v.bit_length() > 128:
            put(f"an integer of about {int(v.bit_length() * 0.30103)} digits")
        elif isinstance(v, (list, tuple, dict)):
            put("[" if not isinstance(v, dict) else "{")
            for i, item in enumerate(v.items() if isinstance(v, dict) else v):
                if i:
                    put(", ")
                if isinstance(v, dict):
                    put(item[0]) if isinstance(item[0], str) and len(item[0]) <= 40 else walk(item[0])
                    put(": ")
                    walk(item[1])
                else:
                    walk(item)
            put("]" if not isinstance(v, dict) else "}")
        else:
            put(repr(v))

    try:
        walk(value)
    except _Full:
        return "".join(out)[:limit] + " ..."
    return "".join(out)


def is_study_name(name: Any) -> bool:
    """Whether ``name`` can name a study: a non-blank string of at most ``NAME_MAX_BYTES`` bytes
    (UTF-8), not ``.`` or ``..``, without spaces, slashes, backslashes or control characters."""
    if not isinstance(name, str) or not name.strip() or name in (".", ".."):
        return False
    if any(ch in "/\\ " or ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return False
    try:
        return len(name.encode("utf-8")) <= NAME_MAX_BYTES
    except UnicodeEncodeError:  # a lone surrogate (undecodable bytes on the command line): no file name
        return False
