"""Studies in the store: create one from a spec, load one (with its spec) by name; sampler and pruner.

The spec lives in the study's user attrs under ``hpo_spec``; sampler and pruner are rebuilt from it
by every worker, since Optuna does not persist them.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import optuna

from hpo import optuna_private
from hpo.errors import SpecError, StoreError
from hpo.spec import StudySpec, parse_spec

SPEC_ATTR = "hpo_spec"
RETRY_HISTORY_ATTR = "retry_history"  # trial system attr of a re-queued retry: the numbers it was re-queued from


def build_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = spec.seed + seed_offset
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler.kind == "grid":
        from hpo.space import grid_space

        return optuna.samplers.GridSampler(grid_space(spec), seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
        multivariate=spec.sampler.multivariate, constant_liar=True)


class _RecentTrials:
    """``study`` whose trial list is read from the store at most every ``max_age`` seconds."""

    def __init__(self, study: optuna.Study, max_age: float):
        self._study, self._max_age = study, max_age
        self._trials: list[optuna.trial.FrozenTrial] = []
        self._read_at = -float("inf")
        self._trial_number: int | None = None  # the trial of the last check

    def checking(self, trial_number: int) -> "_RecentTrials":
        """This view for a check of trial ``trial_number``; a trial's first check reads afresh."""
        if trial_number != self._trial_number:
            self._trial_number, self._read_at = trial_number, -float("inf")
        return self

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        now = time.monotonic()
        if now - self._read_at > self._max_age:
            self._trials, self._read_at = self._study.get_trials(deepcopy=False), now
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class MedianPruner(optuna.pruners.MedianPruner):
    """Optuna's median pruner, comparing against the study's trials as read at a trial's first
    check and at most ``max_age`` seconds ago after that. Each check otherwise re-reads every
    running trial of the study from the store: with short epochs that is most of a worker's
    store traffic, for medians that barely move."""

    def __init__(self, *args, max_age: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_age = max_age
        self._recent: dict[int, _RecentTrials] = {}

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        recent = self._recent.get(optuna_private.study_id(study))
        if recent is None or recent._study is not study:
            recent = self._recent[optuna_private.study_id(study)] = _RecentTrials(study, self._max_age)
        # A trial's first check reads afresh: a lone worker then prunes exactly as Optuna would,
        # whatever the machine's speed, so its runs stay reproducible.
        return super().prune(recent.checking(trial.number), trial)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                        interval_steps=p.interval_steps)


def study_id(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The id of study ``name``.

    Raises:
        StoreError: when there is no such study (listing the ones there are).
    """
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise StoreError(f"no study named {name!r} in the store; studies there: {', '.join(names) or 'none'} "
                         f"(create one with: hpo create-study NAME)") from None


def _exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def create(spec: StudySpec, storage: optuna.storages.BaseStorage, *, force: bool = False) -> optuna.Study:
    """Create the study with its spec stored inside it.

    Raises:
        StoreError: when a study of that name exists and ``force`` is false.
    """
    if _exists(storage, spec.name):
        if not force:
            raise StoreError(f"study {spec.name!r} already exists; pass --force to delete it and start over")
        optuna.delete_study(study_name=spec.name, storage=storage)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction,
                                sampler=build_sampler(spec), pruner=build_pruner(spec))
    try:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    except BaseException:
        # A study without its spec is unusable: never leave one half-created.
        optuna.delete_study(study_name=spec.name, storage=storage)
        raise
    return study


def load(name: str, storage: optuna.storages.BaseStorage, *, seed_offset: int = 0) -> tuple[optuna.Study, StudySpec]:
    """Load a study and its spec from the store.

    Raises:
        StoreError: when there is no such study (listing the ones there are).
        SpecError: when the study was not created by hpo.
    """
    raw = storage.get_study_user_attrs(study_id(storage, name)).get(SPEC_ATTR)
    if raw is None:
        raise SpecError(f"study {name!r} has no hpo spec (it was not created by hpo create-study)")
    spec = parse_spec(raw, source=f"study {name!r} (stored spec)")
    study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec, seed_offset=seed_offset),
                              pruner=build_pruner(spec))
    return study, spec


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that were re-queued (their FAIL does not use up budget)."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY_ATTR, ())}
