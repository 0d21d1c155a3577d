"""Large studies made fast: trials written straight into Optuna's tables with a few multi-row
inserts (SQLAlchemy Core, the tables from hpo.store.optuna_private) instead of one ``add_trial`` (a dozen
statements) per trial. Used by ``bench_scale.py`` and by the tests of large reports.

The trials look like an hpo study's: parameters of the spec's space (sampled at random), an
intermediate value per epoch (``steps`` for a complete trial, fewer for a pruned one), user attrs
as a worker writes them, several workers' trials overlapping in time; ``complete`` of them
COMPLETE, a few FAIL (one of them re-queued and run again), a few RUNNING, the rest PRUNED.
"""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import optuna
import sqlalchemy as sa
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from hpo.search.space import suggest
from hpo.spec.schema import StudySpec
from hpo.store.budget import RETRY_HISTORY_ATTR
from hpo.store.optuna_private import (
    TRIAL_INTERMEDIATE_VALUES,
    TRIAL_PARAMS,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIAL_VALUES,
    TRIALS,
    stored_intermediate_value,
    stored_trial_value,
)

CHUNK = 20_000  # rows per executemany


def make_trials(spec: StudySpec, n_trials: int, *, steps: int = 50, complete: float = 0.1, failed: float = 0.03,
                running: int = 4, workers: int = 8, seed: int = 0) -> list[FrozenTrial]:
    """``n_trials`` finished-looking trials of ``spec``'s space, numbered 0..n-1 (see the module doc).

    Values fall with the epoch as learning curves do; some reports are inf, -inf or nan, as a
    diverging trial's are. A re-queued FAIL and its retry are among the trials.
    """
    rng = np.random.default_rng(seed)
    sign = 1.0 if spec.direction == "minimize" else -1.0
    clock = [datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=i) for i in range(workers)]
    trials = []
    for number in range(n_trials):
        if number % 200 == 0:  # a fresh scratch study now and then: asking costs more as a study grows
            sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + number))
        trial = sampler.ask()
        suggest(trial, spec)
        sampler.tell(trial, state=TrialState.FAIL)  # only its parameters are kept
        draw = rng.random()
        state = (TrialState.RUNNING if number >= n_trials - running else TrialState.COMPLETE if draw < complete
                 else TrialState.FAIL if draw < complete + failed else TrialState.PRUNED)
        last = steps if state == TrialState.COMPLETE else int(rng.integers(steps // 2, steps + 1))
        floor = rng.uniform(0.1, 1.0)
        curve = {step: float(sign * (floor + np.exp(-step / 10) + rng.normal(0, 0.02))) for step in range(1, last + 1)}
        if state != TrialState.COMPLETE and rng.random() < 0.02:  # a diverging trial
            curve[last] = float(rng.choice([math.inf, -math.inf, math.nan]))
        worker = number % workers
        start = clock[worker]
        seconds = float(rng.uniform(0.5, 30.0)) * last / steps
        clock[worker] = start + datetime.timedelta(seconds=seconds + 0.05)
        done = state != TrialState.RUNNING
        # Optuna keeps a pruned trial's last report as its value.
        value = curve[last] if state in (TrialState.COMPLETE, TrialState.PRUNED) and not math.isnan(curve[last]) else None
        user_attrs = {"worker": f"bench:{worker}", "device": "cpu"}
        user_attrs |= {"epochs_run": last} if done else {}
        user_attrs |= {"fail_reason": "RuntimeError: loss is nan"} if state == TrialState.FAIL else {}
        trials.append(FrozenTrial(
            number=number, state=state, value=value, values=None, datetime_start=start,
            datetime_complete=clock[worker] if done else None, params=trial.params,
            distributions=trial.distributions, user_attrs=user_attrs, system_attrs={},
            intermediate_values=curve, trial_id=number))
    # A FAIL re-queued (a dead worker's trial): its retry ran with the same parameters.
    failed_ones = [t for t in trials if t.state == TrialState.FAIL]
    if failed_ones and n_trials > running + 1:
        original, retry = failed_ones[0], trials[-running - 1]
        retry.params, retry.distributions = original.params, original.distributions
        retry.system_attrs = {"failed_trial": original.number, RETRY_HISTORY_ATTR: [original.number]}
    return trials


def insert_trials(storage: optuna.storages.RDBStorage, study_id: int, trials: list[FrozenTrial]) -> None:
    """Append ``trials`` to the study in one transaction, numbered after its existing trials."""
    with storage.engine.begin() as conn:
        first = conn.execute(sa.select(sa.func.count()).select_from(TRIALS)
                             .where(TRIALS.c.study_id == study_id)).scalar_one()
        conn.execute(sa.insert(TRIALS), [
            {"number": first + i, "study_id": study_id, "state": t.state, "datetime_start": t.datetime_start,
             "datetime_complete": t.datetime_complete} for i, t in enumerate(trials)])
        ids = dict(conn.execute(sa.select(TRIALS.c.number, TRIALS.c.trial_id).where(
            TRIALS.c.study_id == study_id, TRIALS.c.number >= first)).all())
        rows: dict[sa.Table, list[dict]] = {table: [] for table in (
            TRIAL_PARAMS, TRIAL_VALUES, TRIAL_INTERMEDIATE_VALUES, TRIAL_USER_ATTRS, TRIAL_SYSTEM_ATTRS)}
        for i, t in enumerate(trials):
            trial_id = ids[first + i]
            rows[TRIAL_PARAMS] += [{"trial_id": trial_id, "param_name": name,
                                    "param_value": t.distributions[name].to_internal_repr(value),
                                    "distribution_json": distribution_to_json(t.distributions[name])}
                                   for name, value in t.params.items()]
            for objective, value in enumerate(t.values or []):
                stored, kind = stored_trial_value(value)
                rows[TRIAL_VALUES].append({"trial_id": trial_id, "objective": objective, "value": stored,
                                           "value_type": kind})
            for step, value in t.intermediate_values.items():
                stored, kind = stored_intermediate_value(value)
                rows[TRIAL_INTERMEDIATE_VALUES].append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                                                        "intermediate_value_type": kind})
            for table, attrs in ((TRIAL_USER_ATTRS, t.user_attrs), (TRIAL_SYSTEM_ATTRS, t.system_attrs)):
                rows[table] += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
        for table, table_rows in rows.items():
            for i in range(0, len(table_rows), CHUNK):
                conn.execute(sa.insert(table), table_rows[i:i + CHUNK])
