"""A study's trials read whole with one query per table, for the report.

Optuna's own read (``study.get_trials`` on an SQL store) goes through its ORM and builds every
distribution from its JSON anew: about 4 ms a trial on SQLite, 40 s for a 10,000-trial study.
Here the rows come as plain tuples and each distinct distribution is decoded once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.trial import FrozenTrial

from hpo.optuna_private import (TRIAL_INTERMEDIATE_VALUES, TRIAL_PARAMS, TRIAL_SYSTEM_ATTRS, TRIAL_USER_ATTRS,
                                TRIAL_VALUES, TRIALS, intermediate_value, trial_value)


@lru_cache(maxsize=4096)
def _distribution(text: str) -> BaseDistribution:
    return json_to_distribution(text)


def read_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[FrozenTrial]:
    """Every trial of the study, as ``study.get_trials()`` returns them (same fields, same order).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the store cannot be read.
    """
    def of_study(table: sa.Table, *columns: sa.Column) -> sa.Select:
        return (sa.select(table.c.trial_id, *columns).join(TRIALS, TRIALS.c.trial_id == table.c.trial_id)
                .where(TRIALS.c.study_id == study_id))

    params: dict[int, dict] = defaultdict(dict)
    distributions: dict[int, dict] = defaultdict(dict)
    values: dict[int, dict[int, float]] = defaultdict(dict)
    reports: dict[int, dict[int, float]] = defaultdict(dict)
    attrs: dict[str, dict[int, dict]] = {"user": defaultdict(dict), "system": defaultdict(dict)}
    with storage.engine.connect() as conn:
        trials = conn.execute(sa.select(TRIALS.c.trial_id, TRIALS.c.number, TRIALS.c.state, TRIALS.c.datetime_start,
                                        TRIALS.c.datetime_complete)
                              .where(TRIALS.c.study_id == study_id).order_by(TRIALS.c.trial_id)).all()
        for trial_id, name, internal, text in conn.execute(of_study(
                TRIAL_PARAMS, TRIAL_PARAMS.c.param_name, TRIAL_PARAMS.c.param_value, TRIAL_PARAMS.c.distribution_json)
                .order_by(TRIAL_PARAMS.c.param_id)):
            distribution = _distribution(text)
            params[trial_id][name] = distribution.to_external_repr(internal)
            distributions[trial_id][name] = distribution
        for trial_id, objective, stored, kind in conn.execute(of_study(
                TRIAL_VALUES, TRIAL_VALUES.c.objective, TRIAL_VALUES.c.value, TRIAL_VALUES.c.value_type)):
            values[trial_id][objective] = trial_value(stored, kind)
        for trial_id, step, stored, kind in conn.execute(of_study(
                TRIAL_INTERMEDIATE_VALUES, TRIAL_INTERMEDIATE_VALUES.c.step, TRIAL_INTERMEDIATE_VALUES.c.intermediate_value,
                TRIAL_INTERMEDIATE_VALUES.c.intermediate_value_type)):
            reports[trial_id][step] = intermediate_value(stored, kind)
        for kind, table in (("user", TRIAL_USER_ATTRS), ("system", TRIAL_SYSTEM_ATTRS)):
            for trial_id, key, text in conn.execute(of_study(table, table.c.key, table.c.value_json)):
                attrs[kind][trial_id][key] = json.loads(text)
    return [FrozenTrial(
        number=number, state=state, value=None,
        values=[values[trial_id][k] for k in sorted(values[trial_id])] if trial_id in values else None,
        datetime_start=start, datetime_complete=complete, params=params.get(trial_id, {}),
        distributions=distributions.get(trial_id, {}), user_attrs=attrs["user"].get(trial_id, {}),
        system_attrs=attrs["system"].get(trial_id, {}), intermediate_values=reports.get(trial_id, {}),
        trial_id=trial_id) for trial_id, number, state, start, complete in trials]
