"""Study control decided in the store, so that every worker on every machine agrees: a stop (by
``hpo stop`` or by a stopping rule of ``budget``), lifted by ``hpo resume``; and ``hpo extend``,
which raises the trial budget kept in the stored spec.

The stop is a study system attr ``hpo:stop``: ``{"rule", "reason", "now"}``, or null when lifted.
Workers read it before each trial (and, with ``now``, at epoch boundaries: the running trial is
checkpointed and re-queued). The rules, checked by each worker after each trial from the study's
COMPLETE trials (the first worker to see one fire records it):

- ``max_minutes``: the wall time since the study's first trial started passes it;
- ``patience``: that many COMPLETE trials in a row have not improved the best value (several
  objectives: have not improved the hypervolume, i.e. each was weakly dominated by an earlier
  COMPLETE trial: a point adds hypervolume exactly when no earlier point is as good everywhere);
- ``target``: the best value reaches it (one objective).
"""

from __future__ import annotations

import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError

STOP_ATTR = "hpo:stop"


def stop_of(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, Any] | None:
    """The study's stop (``{"rule", "reason", "now"}``), or ``None`` when it may run."""
    return storage.get_study_system_attrs(study_id).get(STOP_ATTR) or None


def stop(storage: optuna.storages.BaseStorage, study_id: int, *, rule: str, reason: str, now: bool = False) -> None:
    """Stop the study: workers take no new trial (``now``: they also stop their running trial at
    the next epoch, checkpoint and re-queue it)."""
    storage.set_study_system_attr(study_id, STOP_ATTR, {"rule": rule, "reason": reason, "now": now,
                                                        "at": datetime.datetime.now().isoformat(timespec="seconds")})


def resume(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, Any] | None:
    """Lift the study's stop; returns the stop lifted (``None``: it was not stopped)."""
    before = stop_of(storage, study_id)
    if before is not None:
        storage.set_study_system_attr(study_id, STOP_ATTR, None)
    return before


def _improvements(complete: list[FrozenTrial], directions: list[str]) -> list[bool]:
    """For each COMPLETE trial in order of completion: whether it improved the study when it finished."""
    from hpo.search.pareto import minimizing

    seen: list[tuple[float, ...]] = []
    out = []
    for t in complete:
        point = minimizing(t.values, directions)
        out.append(not any(all(a <= b for a, b in zip(p, point)) for p in seen))
        seen.append(point)
    return out


def rule_fired(trials: list[FrozenTrial], directions: list[str], *, max_minutes: float | None,
               patience: int | None, target: float | None) -> tuple[str, str] | None:
    """(rule, reason) of the first stopping rule the study's trials meet, or ``None``. Infeasible
    trials (user attr ``feasible: false``) never improve the study."""
    started = [t.datetime_start for t in trials if t.datetime_start is not None]
    if max_minutes is not None and started:
        minutes = (datetime.datetime.now() - min(started)).total_seconds() / 60
        if minutes >= max_minutes:
            return "max_minutes", f"{minutes:.1f} minutes since the first trial started (max_minutes {max_minutes:g})"
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)),
                      key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))
    if target is not None and complete:
        sign = -1.0 if directions[0] == "maximize" else 1.0
        best = min(complete, key=lambda t: sign * t.values[0])
        if sign * best.values[0] <= sign * target:
            return "target", f"trial {best.number} reached {best.values[0]:.6g} (target {target:g})"
    if patience is not None and complete:
        improved = _improvements(complete, directions)
        last = max(i for i, up in enumerate(improved) if up)
        if len(complete) - 1 - last >= patience:
            what = "the best value" if len(directions) == 1 else "the hypervolume"
            return "patience", (f"{len(complete) - 1 - last} complete trials since trial {complete[last].number} "
                                f"have not improved {what} (patience {patience})")
    return None


def check_n_trials(current: int | None, n_trials: int) -> None:
    """``hpo extend``'s new budget must be above the current one.

    Raises:
        HpoError: one line naming ``--n-trials``.
    """
    if current is not None and n_trials <= current:
        raise HpoError(f"--n-trials: got {n_trials}; allowed: more than the study's budget of {current} trials")


N_TRIALS_ATTR = "hpo:n_trials"  # study system attr: the trial budget as raised by hpo extend
NOW_POLL_EVERY = 1.0  # seconds between a running trial's reads of the stop (hpo stop --now)


def extend(storage: optuna.storages.BaseStorage, study_id: int, n_trials: int, *, current: int | None) -> None:
    """Raise the study's trial budget to ``n_trials`` (kept beside the spec, which stays as written:
    checkpoints name the spec they were written for).

    Raises:
        HpoError: ``n_trials`` is not above ``current``.
    """
    check_n_trials(current, n_trials)
    storage.set_study_system_attr(study_id, N_TRIALS_ATTR, n_trials)


def n_trials_of(storage: optuna.storages.BaseStorage, study_id: int, spec_n_trials: int | None) -> int | None:
    """The study's trial budget: as raised by ``hpo extend``, else the spec's."""
    raised = storage.get_study_system_attrs(study_id).get(N_TRIALS_ATTR)
    return spec_n_trials if raised is None else int(raised)


class Gate:
    """A worker's reading of the study's control: whether it may start another trial (a stop,
    or a stopping rule that fires now), and whether its running trial must stop (``--now``)."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, study_id: int, *,
                 directions: list[str], max_minutes: float | None, patience: int | None, target: float | None):
        self.study, self.storage, self.study_id, self.directions = study, storage, study_id, directions
        self.rules = {"max_minutes": max_minutes, "patience": patience, "target": target}
        self._polled, self._now = -float("inf"), False

    def closed(self) -> str | None:
        """The line a worker ends with when the study takes no new trial (recording the rule that
        fired, if one did), else ``None``."""
        import time

        halted = stop_of(self.storage, self.study_id)
        if halted is None and any(v is not None for v in self.rules.values()):
            fired = rule_fired(self.study.get_trials(deepcopy=False), self.directions, **self.rules)
            if fired is not None:
                stop(self.storage, self.study_id, rule=fired[0], reason=fired[1])
                halted = {"rule": fired[0], "reason": fired[1]}
        self._polled, self._now = time.monotonic(), bool(halted and halted.get("now"))
        if halted is None:
            return None
        return (f"study {self.study.study_name!r} is stopped ({halted['rule']}: {halted['reason']}); "
                f"hpo resume --study {self.study.study_name} lifts it")

    def stop_now(self) -> bool:
        """Whether ``hpo stop --now`` asks the running trial to stop (read at most once a second)."""
        import time

        if time.monotonic() - self._polled >= NOW_POLL_EVERY:
            halted = stop_of(self.storage, self.study_id)
            self._polled, self._now = time.monotonic(), bool(halted and halted.get("now"))
        return self._now


def open_control(study_name: str, storage_url: str | None) -> tuple[optuna.storages.RDBStorage, int]:
    """The store at ``storage_url`` and the id of study ``name`` in it.

    Raises:
        StoreError: the store cannot be opened or has no such study.
    """
    from hpo.search.study import study_id
    from hpo.store.storage import open_storage

    storage = open_storage(storage_url, heartbeat=False)
    return storage, study_id(storage, study_name)


def running_trials(storage: optuna.storages.BaseStorage, study_id: int) -> int:
    return len(storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)))


def delete_study(study_name: str, *, storage_url: str | None = None, artifacts: str | None = None,
                 force: bool = False) -> None:
    """``hpo delete``: the study, its trials, its data in the store (unless another study shares
    them) and its checkpoint folder.

    Raises:
        StoreError: no such study. HpoError: workers hold running trials and ``force`` is false.
    """
    import shutil

    from hpo.search.study import delete
    from hpo.training.checkpoint import CheckpointStore

    storage, sid = open_control(study_name, storage_url)
    running = running_trials(storage, sid)
    if running and not force:
        raise HpoError(f"--force: study {study_name!r} has {running} running trial(s) held by workers; stop them "
                       f"first (hpo stop --study {study_name} --now) or pass --force")
    delete(study_name, storage)
    shutil.rmtree(CheckpointStore.for_study(study_name, storage_url=storage_url, artifacts=artifacts).folder,
                  ignore_errors=True)
