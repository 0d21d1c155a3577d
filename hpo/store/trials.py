"""A study's trials read whole with one query per table: for the report, and for every store hpo
opens (the reads Optuna's cache makes: a worker's first read of a large study, later increments).

Optuna's own read (``study.get_trials`` on an SQL store) goes through its ORM and builds every
distribution from its JSON anew: about 4 ms a trial on SQLite, 40 s for a 10,000-trial study.
Here the rows come as plain tuples and each distinct distribution is decoded once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection
from functools import lru_cache

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.trial import FrozenTrial

from hpo.store.optuna_private import (
    NON_FINITE_INTERMEDIATE_VALUES,
    STUDIES,
    TRIAL_INTERMEDIATE_VALUES,
    TRIAL_PARAMS,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIAL_VALUES,
    TRIALS,
    stored_time,
    trial_value,
)

FEW = 500  # trials read by their ids rather than by a join (each id a bound parameter)


@lru_cache(maxsize=4096)
def _distribution(text: str) -> BaseDistribution:
    return json_to_distribution(text)


def read_trials(storage: optuna.storages.RDBStorage, study_id: int, *, states=None,
                included_trial_ids: Collection[int] = (), trial_id_greater_than: int = -1) -> list[FrozenTrial]:
    """The study's trials as Optuna's ``RDBStorage._get_trials`` returns them (same fields, ordered
    by trial id): those with an id above ``trial_id_greater_than`` or in ``included_trial_ids``,
    in ``states`` (default: all). By default every trial, as ``study.get_trials()``.

    Raises:
        KeyError: no such study.
        sqlalchemy.exc.SQLAlchemyError: when the store cannot be read.
    """
    wanted = [TRIALS.c.study_id == study_id,
              sa.or_(TRIALS.c.trial_id > trial_id_greater_than, TRIALS.c.trial_id.in_(list(included_trial_ids)))
              if included_trial_ids else TRIALS.c.trial_id > trial_id_greater_than]
    if states is not None:
        wanted.append(TRIALS.c.state.in_(list(states)))

    ids: list[int] = []

    def of_study(table: sa.Table, *columns: sa.Column) -> sa.Select:
        # A few trials (a cache's incremental read): by their ids, on each table's trial_id index.
        # Many (a first read): joined with the trials, one scan of each table.
        if len(ids) <= FEW:
            return sa.select(table.c.trial_id, *columns).where(table.c.trial_id.in_(ids))
        return (sa.select(table.c.trial_id, *columns).join(TRIALS, TRIALS.c.trial_id == table.c.trial_id)
                .where(*wanted))

    params: dict[int, dict] = defaultdict(dict)
    distributions: dict[int, dict] = defaultdict(dict)
    values: dict[int, dict[int, float]] = defaultdict(dict)
    reports: dict[int, dict[int, float]] = defaultdict(dict)
    attrs: dict[str, dict[int, dict]] = {"user": defaultdict(dict), "system": defaultdict(dict)}
    with storage.engine.connect() as conn:
        trials = conn.execute(sa.select(TRIALS.c.trial_id, TRIALS.c.number, TRIALS.c.state, TRIALS.c.datetime_start,
                                        TRIALS.c.datetime_complete)
                              .where(*wanted).order_by(TRIALS.c.trial_id)).all()
        if not trials:
            if conn.execute(sa.select(STUDIES.c.study_id).where(STUDIES.c.study_id == study_id)).first() is None:
                raise KeyError(f"no study with id {study_id}")
            return []
        ids = [row.trial_id for row in trials]
        for trial_id, name, internal, text in conn.execute(of_study(
                TRIAL_PARAMS, TRIAL_PARAMS.c.param_name, TRIAL_PARAMS.c.param_value, TRIAL_PARAMS.c.distribution_json)
                .order_by(TRIAL_PARAMS.c.param_id)):
            distribution = _distribution(text)
            params[trial_id][name] = distribution.to_external_repr(internal)
            distributions[trial_id][name] = distribution
        for trial_id, objective, stored, kind in conn.execute(of_study(
                TRIAL_VALUES, TRIAL_VALUES.c.objective, TRIAL_VALUES.c.value, TRIAL_VALUES.c.value_type)):
            values[trial_id][objective] = trial_value(stored, kind)
        # Most rows of a large study (50 a trial): fetched by the driver's cursor at once, without
        # SQLAlchemy's row objects and enum conversion (three times faster); only integers are bound.
        special = NON_FINITE_INTERMEDIATE_VALUES
        query = of_study(TRIAL_INTERMEDIATE_VALUES, TRIAL_INTERMEDIATE_VALUES.c.step,
                         TRIAL_INTERMEDIATE_VALUES.c.intermediate_value,
                         TRIAL_INTERMEDIATE_VALUES.c.intermediate_value_type)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})))
            rows = cursor.fetchall()
        finally:
            cursor.close()
        for trial_id, step, stored, kind in rows:
            reports[trial_id][step] = special[kind] if kind in special else stored
        for kind, table in (("user", TRIAL_USER_ATTRS), ("system", TRIAL_SYSTEM_ATTRS)):
            for trial_id, key, text in conn.execute(of_study(table, table.c.key, table.c.value_json)):
                attrs[kind][trial_id][key] = json.loads(text)
    return [FrozenTrial(
        number=number, state=state, value=None,
        values=[values[trial_id][k] for k in sorted(values[trial_id])] if trial_id in values else None,
        datetime_start=stored_time(start), datetime_complete=stored_time(complete), params=params.get(trial_id, {}),
        distributions=distributions.get(trial_id, {}), user_attrs=attrs["user"].get(trial_id, {}),
        system_attrs=attrs["system"].get(trial_id, {}), intermediate_values=reports.get(trial_id, {}),
        trial_id=trial_id) for trial_id, number, state, start, complete in trials]
