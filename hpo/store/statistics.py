"""Study statistics from aggregate queries on the store: counts by state, the finished count, the best
trial and its parameters, the wall time. A few small queries per study, whatever its number of
trials: no trial is loaded whole, so ``hpo studies`` and ``hpo status`` cost the same at 10 or
10,000 trials.

The answers are those of the trials read in full through Optuna: ``best_*`` is Optuna's
``study.best_trial`` (ties go to the lowest trial number; in a constrained study among the feasible
trials only), ``pareto`` is ``study.best_trials`` of a study of several objectives (the feasible
COMPLETE trials no other dominates), ``finished`` counts COMPLETE, PRUNED and the FAILs that were not
re-queued (:func:`hpo.store.budget.retried_numbers`). Of Optuna's FAIL state, ``interrupted`` counts
the trials stopped by a signal or a dead worker (preemption) and re-queued, whose retry carries on
their work, and ``failed`` the real failures: the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import json_to_distribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo.errors import StoreError
from hpo.search.pareto import minimizing, non_dominated
from hpo.search.study import SPEC_ATTR
from hpo.store import optuna_private
from hpo.store.budget import RETRY_HISTORY_ATTR
from hpo.store.control import STOP_ATTR
from hpo.store.optuna_private import (
    STUDIES,
    STUDY_DIRECTIONS,
    STUDY_SYSTEM_ATTRS,
    STUDY_USER_ATTRS,
    TRIAL_PARAMS,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIAL_VALUES,
    TRIALS,
    stored_trial_value,
    trial_value,
)
from hpo.store.queries import retried

IN_CHUNK = 500  # trial numbers per IN (...) list
CV_ATTRS = ("cv_fold_values", "cv_std")  # trial user attrs of a cross-validated trial (hpo.search.cv)
GPU_SHARING_ATTR = "gpu_sharing"  # trial user attr set by the objective (hpo.running.devices.gpu_sharing)
LATENCY_DEVICE_ATTR = "latency_device"  # trial user attr: where latency_ms was timed (hpo.search.objectives)
FEASIBLE_ATTR = "feasible"  # trial user attr of a constrained study (hpo.search.objectives)


@dataclass(frozen=True)
class Summary:
    """One study's statistics, as ``hpo status`` prints them (``hpo.console.summary_text``) and a
    worker returns them: trial counts by state, the best trial and its parameters (or the Pareto
    set for several objectives), the study's wall time in seconds, and how trials shared GPUs.
    Read with aggregate queries (:func:`summarize`), never by loading every trial."""

    name: str
    direction: str  # minimize | maximize (objectives joined by "/" in a multi-objective study)
    metric: str  # what the value measures (the spec's metric)
    counts: dict[str, int]  # by TrialState name (Optuna's FAIL holds both of the next two)
    finished: int
    failed: int  # real failures: FAIL trials that were not re-queued
    interrupted: int  # FAIL trials stopped by a signal or a dead worker and re-queued
    best_value: float | None
    best_trial: int | None
    best_params: dict[str, Any]
    wall_seconds: float | None
    gpu_sharing: dict[str, int]  # trials by their gpu_sharing user attr (mps, time-slice, exclusive)
    # Several objectives: the Pareto set, [{"trial": n, "values": [...], "params": {...}}] by trial
    # number (None for a study of one objective); metric is then the objectives' names joined by "/".
    pareto: list[dict[str, Any]] | None = None
    infeasible: int = 0  # trials that broke a constraint (user attr feasible: false)
    # A cross-validated best trial's folds (hpo.search.cv): {"folds": K, "std": ..., "values": [...]}
    best_cv: dict[str, Any] | None = None
    latency_devices: dict[str, int] | None = None  # trials by the device their latency_ms was timed on
    stopped: dict[str, Any] | None = None  # the study's stop ({"rule", "reason", "now", "at"}), hpo.store.control


def _spec_field(dialect: str, key: str) -> sa.ColumnElement:
    """``value_json[key]`` of a study user attr, extracted by the database: a spec may hold whole data
    sets, and only one field of it is wanted. PostgreSQL keeps the column as text (cast it);
    SQLite and MariaDB read JSON from text as it is (and MariaDB has no CAST AS JSON)."""
    column = STUDY_USER_ATTRS.c.value_json
    document = sa.cast(column, sa.JSON) if dialect == "postgresql" else sa.type_coerce(column, sa.JSON)
    return document[key].as_string()


def _best_order(direction: StudyDirection) -> list[sa.ColumnElement]:
    """ORDER BY of Optuna's best-trial query (values stored as number + kind: -inf, finite, inf),
    with the lowest trial number first among equal values."""
    rank = sa.case((TRIAL_VALUES.c.value_type == stored_trial_value(-float("inf"))[1], -1),
                   (TRIAL_VALUES.c.value_type == stored_trial_value(0.0)[1], 0), else_=1)
    if direction == StudyDirection.MAXIMIZE:
        return [rank.desc(), TRIAL_VALUES.c.value.desc(), TRIALS.c.number]
    return [rank, TRIAL_VALUES.c.value, TRIALS.c.number]


def _feasible() -> sa.ColumnElement:
    """The trial has no ``feasible: false`` user attr (unconstrained trials are all feasible)."""
    return ~sa.exists().where(TRIAL_USER_ATTRS.c.trial_id == TRIALS.c.trial_id,
                              TRIAL_USER_ATTRS.c.key == FEASIBLE_ATTR, TRIAL_USER_ATTRS.c.value_json == "false")


def _params(conn: sa.Connection, trial_id: int) -> dict[str, Any]:
    params = {}
    for name, internal, distribution in conn.execute(
            sa.select(TRIAL_PARAMS.c.param_name, TRIAL_PARAMS.c.param_value, TRIAL_PARAMS.c.distribution_json)
            .where(TRIAL_PARAMS.c.trial_id == trial_id).order_by(TRIAL_PARAMS.c.param_id)):
        params[name] = json_to_distribution(distribution).to_external_repr(internal)
    return params


def _best(conn: sa.Connection, study_id: int,
          direction: StudyDirection) -> tuple[float, int, dict[str, Any], dict[str, Any] | None] | None:
    """(value, number, params, its folds when cross-validated) of the best feasible COMPLETE trial,
    or None when there is none."""
    row = conn.execute(
        sa.select(TRIALS.c.trial_id, TRIALS.c.number, TRIAL_VALUES.c.value, TRIAL_VALUES.c.value_type)
        .join(TRIAL_VALUES, TRIAL_VALUES.c.trial_id == TRIALS.c.trial_id)
        .where(TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.COMPLETE, TRIAL_VALUES.c.objective == 0,
               _feasible())
        .order_by(*_best_order(direction)).limit(1)).first()
    if row is None:
        return None
    return trial_value(row.value, row.value_type), row.number, _params(conn, row.trial_id), _folds(conn, row.trial_id)


def _folds(conn: sa.Connection, trial_id: int) -> dict[str, Any] | None:
    """A cross-validated trial's folds: {"folds": K, "std": ..., "values": [...]}, else None."""
    attrs = {key: json.loads(value) for key, value in conn.execute(
        sa.select(TRIAL_USER_ATTRS.c.key, TRIAL_USER_ATTRS.c.value_json)
        .where(TRIAL_USER_ATTRS.c.trial_id == trial_id, TRIAL_USER_ATTRS.c.key.in_(CV_ATTRS)))}
    if "cv_fold_values" not in attrs:
        return None
    return {"folds": len(attrs["cv_fold_values"]), "std": attrs.get("cv_std"), "values": attrs["cv_fold_values"]}


def _pareto(conn: sa.Connection, study_id: int, directions: list[StudyDirection]) -> list[dict[str, Any]]:
    """The feasible COMPLETE trials no other dominates, by trial number: one read of the values
    (a row per trial and objective), then the parameters of the set's members."""
    values: dict[tuple[int, int], dict[int, float]] = {}
    for trial_id, number, objective, stored, kind in conn.execute(
            sa.select(TRIALS.c.trial_id, TRIALS.c.number, TRIAL_VALUES.c.objective, TRIAL_VALUES.c.value,
                      TRIAL_VALUES.c.value_type)
            .join(TRIAL_VALUES, TRIAL_VALUES.c.trial_id == TRIALS.c.trial_id)
            .where(TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.COMPLETE, _feasible())):
        values.setdefault((number, trial_id), {})[objective] = trial_value(stored, kind)
    trials = sorted(values)
    rows = [[values[t][k] for k in range(len(directions))] for t in trials]
    names = [d.name.lower() for d in directions]
    keep = non_dominated([minimizing(r, names) for r in rows])
    return [{"trial": trials[i][0], "values": rows[i], "params": _params(conn, trials[i][1])} for i in keep]


def _objective_names(conn: sa.Connection, study_ids: list[int]) -> dict[int, str]:
    """The objectives' names joined by "/" of studies of several objectives (their specs are small:
    such studies keep data by reference)."""
    out = {}
    for sid, text in conn.execute(sa.select(STUDY_USER_ATTRS.c.study_id, STUDY_USER_ATTRS.c.value_json).where(
            STUDY_USER_ATTRS.c.study_id.in_(study_ids), STUDY_USER_ATTRS.c.key == SPEC_ATTR)):
        objectives = json.loads(text).get("objectives") or []
        out[sid] = "/".join(o["metric"] for o in objectives) or "value"
    return out


def _infeasible(conn: sa.Connection, study_ids: list[int]) -> dict[int, int]:
    return dict(conn.execute(
        sa.select(TRIALS.c.study_id, sa.func.count())
        .join(TRIALS, TRIALS.c.trial_id == TRIAL_USER_ATTRS.c.trial_id)
        .where(TRIALS.c.study_id.in_(study_ids), TRIAL_USER_ATTRS.c.key == FEASIBLE_ATTR,
               TRIAL_USER_ATTRS.c.value_json == "false")
        .group_by(TRIALS.c.study_id)).all())


def _retried_fails(conn: sa.Connection, study_id: int) -> int:
    """FAIL trials that were re-queued. Only the retries' histories are read (a few rows, however
    many trials), then the states of the trials they name."""
    histories = conn.execute(
        sa.select(TRIAL_SYSTEM_ATTRS.c.value_json)
        .join(TRIALS, TRIALS.c.trial_id == TRIAL_SYSTEM_ATTRS.c.trial_id)
        .where(TRIALS.c.study_id == study_id, TRIAL_SYSTEM_ATTRS.c.key == RETRY_HISTORY_ATTR)).scalars()
    retried = sorted({int(n) for text in histories for n in json.loads(text)})
    n = 0
    for i in range(0, len(retried), IN_CHUNK):
        n += conn.execute(sa.select(sa.func.count()).select_from(TRIALS).where(
            TRIALS.c.study_id == study_id, TRIALS.c.state == TrialState.FAIL,
            TRIALS.c.number.in_(retried[i:i + IN_CHUNK]))).scalar_one()
    return n


def summaries(storage: optuna.storages.RDBStorage, study_ids: list[int] | None = None) -> list[Summary]:
    """Statistics of the studies ``study_ids`` (default: every study in the store), by study name;
    read again from the start after a dropped connection, within the store's retry window.

    Cost: five queries for all the studies (names, directions, metrics, counts by state, trials by
    GPU sharing), then
    per study at most three for the best trial, its parameters and its folds, and two for the re-queued trials:
    the trials' own rows are only counted.
    """
    return retried(storage, _summaries, storage, study_ids)


def _summaries(storage: optuna.storages.RDBStorage, study_ids: list[int] | None) -> list[Summary]:
    selected = (lambda column: column.in_(study_ids)) if study_ids is not None else (lambda column: sa.true())
    with storage.engine.connect() as conn:
        studies = {sid: name for sid, name in conn.execute(
            sa.select(STUDIES.c.study_id, STUDIES.c.study_name).where(selected(STUDIES.c.study_id)))}
        directions: dict[int, list[StudyDirection]] = {sid: [] for sid in studies}
        for sid, direction in conn.execute(
                sa.select(STUDY_DIRECTIONS.c.study_id, STUDY_DIRECTIONS.c.direction)
                .where(selected(STUDY_DIRECTIONS.c.study_id)).order_by(STUDY_DIRECTIONS.c.objective)):
            directions[sid].append(direction)
        metrics = dict(conn.execute(
            sa.select(STUDY_USER_ATTRS.c.study_id, _spec_field(conn.dialect.name, "metric"))
            .where(selected(STUDY_USER_ATTRS.c.study_id), STUDY_USER_ATTRS.c.key == SPEC_ATTR)).all())
        counts = {sid: {state.name: 0 for state in TrialState} for sid in studies}
        starts: dict[int, list[datetime]] = {sid: [] for sid in studies}
        ends: dict[int, list[datetime]] = {sid: [] for sid in studies}
        for sid, state, n, first_start, last_end in conn.execute(
                sa.select(TRIALS.c.study_id, TRIALS.c.state, sa.func.count(), sa.func.min(TRIALS.c.datetime_start),
                          sa.func.max(TRIALS.c.datetime_complete))
                .where(selected(TRIALS.c.study_id)).group_by(TRIALS.c.study_id, TRIALS.c.state)):
            counts[sid][state.name] = n
            starts[sid] += [first_start] if first_start else []
            ends[sid] += [last_end] if last_end else []
        sharing: dict[int, dict[str, int]] = {sid: {} for sid in studies}
        latency: dict[int, dict[str, int]] = {sid: {} for sid in studies}
        for sid, key, value, n in conn.execute(
                sa.select(TRIALS.c.study_id, TRIAL_USER_ATTRS.c.key, TRIAL_USER_ATTRS.c.value_json, sa.func.count())
                .join(TRIALS, TRIALS.c.trial_id == TRIAL_USER_ATTRS.c.trial_id)
                .where(selected(TRIALS.c.study_id), TRIAL_USER_ATTRS.c.key.in_([GPU_SHARING_ATTR, LATENCY_DEVICE_ATTR]))
                .group_by(TRIALS.c.study_id, TRIAL_USER_ATTRS.c.key, TRIAL_USER_ATTRS.c.value_json)):
            (sharing if key == GPU_SHARING_ATTR else latency)[sid][str(json.loads(value))] = n
        several = [sid for sid in studies if len(directions[sid]) > 1]
        metrics.update(_objective_names(conn, several) if several else {})
        infeasible = _infeasible(conn, list(studies)) if studies else {}
        stops = {sid: json.loads(text) for sid, text in conn.execute(
            sa.select(STUDY_SYSTEM_ATTRS.c.study_id, STUDY_SYSTEM_ATTRS.c.value_json)
            .where(selected(STUDY_SYSTEM_ATTRS.c.study_id), STUDY_SYSTEM_ATTRS.c.key == STOP_ATTR))}
        out = []
        for sid, name in studies.items():
            c = counts[sid]
            single = len(directions[sid]) == 1
            best = _best(conn, sid, directions[sid][0]) if single and c["COMPLETE"] else None
            pareto = None if single else _pareto(conn, sid, directions[sid]) if c["COMPLETE"] else []
            retried = _retried_fails(conn, sid) if c["FAIL"] else 0
            out.append(Summary(
                name=name,
                direction="/".join(d.name.lower() for d in directions[sid]),
                metric=metrics.get(sid) or "value",
                counts=c,
                finished=c["COMPLETE"] + c["PRUNED"] + c["FAIL"] - retried,
                failed=c["FAIL"] - retried,
                interrupted=retried,
                best_value=best[0] if best else None,
                best_trial=best[1] if best else None,
                best_params=best[2] if best else {},
                wall_seconds=(max(ends[sid]) - min(starts[sid])).total_seconds() if starts[sid] and ends[sid] else None,
                gpu_sharing=dict(sorted(sharing[sid].items())),
                pareto=pareto,
                best_cv=best[3] if best else None,
                infeasible=infeasible.get(sid, 0),
                stopped=stops.get(sid) or None,
                latency_devices=dict(sorted(latency[sid].items())) or None,
            ))
    return sorted(out, key=lambda s: s.name)


def summary(storage: optuna.storages.RDBStorage, study_id: int) -> Summary:
    """Statistics of one study (see :func:`summaries`)."""
    return summaries(storage, [study_id])[0]


def summarize(study: optuna.Study) -> Summary:
    """Statistics of ``study``, a study in an SQL store.

    Raises:
        StoreError: when the study is not kept in an SQL store (an in-memory study, say).
    """
    storage = optuna_private.rdb_storage(study)
    if storage is None:
        raise StoreError(f"study {study.study_name!r} is not in an SQL store; its statistics come from SQL queries")
    return summary(storage, optuna_private.study_id(study))
