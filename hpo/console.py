"""Plain-text formatting of what the commands print: trial lines and study statistics."""

from __future__ import annotations

import json

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.store.statistics import Summary


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _short(value: float) -> str:
    """A value for a trial line: counts (n_params) whole, others to 4 significant digits."""
    return f"{int(value)}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def trial_line(study: optuna.Study, trial: FrozenTrial, metric: str) -> str:
    """One progress line: number, state, value (or where it was pruned / why it failed), best so far.
    ``metric``: the metric's name, or the objectives' names joined by ``/`` (several objectives:
    the line shows each value and the size of the Pareto set)."""
    names = metric.split("/")
    if trial.state == TrialState.COMPLETE:
        value = ", ".join(f"{name}={_short(v)}" for name, v in zip(names, trial.values))
    elif trial.state == TrialState.PRUNED and trial.last_step is not None:
        value = f"{metric}={trial.intermediate_values[trial.last_step]:.4g} at epoch {trial.last_step}"
    else:
        value = str(trial.user_attrs.get("pruned_by") or trial.user_attrs.get("fail_reason", ""))[:60]
    if len(names) > 1:
        best = f"pareto set={len(study.best_trials)}"
    else:
        try:
            best_trial = study.best_trial
            best = f"best={best_trial.value:.4g} (#{best_trial.number})"
        except ValueError:
            best = "best=-"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    return f"trial {trial.number:4d}  {trial.state.name:8s} {value:42s} {best}  {seconds:.1f}s"


def sharing_text(counts: dict[str, int]) -> str:
    """Trials by how their GPU was shared, e.g. ``mps 12, time-slice 3``."""
    return ", ".join(f"{mode} {n}" for mode, n in counts.items())


def summary_text(s: Summary) -> str:
    """The seed-style statistics block."""
    lines = [
        f"Study statistics: {s.name} ({s.direction} {s.metric})",
        f"  Number of finished trials: {s.finished}",
        f"  Number of pruned trials:   {s.counts['PRUNED']}",
        f"  Number of complete trials: {s.counts['COMPLETE']}",
        f"  Number of failed trials:   {s.counts['FAIL']}",
    ]
    if s.counts["RUNNING"] or s.counts["WAITING"]:
        lines.append(f"  Running / waiting:         {s.counts['RUNNING']} / {s.counts['WAITING']}")
    if s.wall_seconds is not None:
        lines.append(f"  Wall time:                 {s.wall_seconds:.1f}s")
    if s.gpu_sharing:
        lines.append(f"  GPU sharing (trials):      {sharing_text(s.gpu_sharing)}")
    if s.infeasible:
        lines.append(f"  Infeasible trials:         {s.infeasible} (broke a constraint; never best)")
    if s.pareto is not None:
        names = s.metric.split("/")
        lines.append(f"  Pareto set: {len(s.pareto)} trial(s)" + ("" if s.pareto else ": none complete yet"))
        for member in s.pareto:
            values = ", ".join(f"{n}={_num(v)}" for n, v in zip(names, member["values"]))
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in member["params"].items())
            lines.append(f"    #{member['trial']}  {values}  ({params})")
    elif s.best_trial is None:
        lines.append("  Best trial: none complete yet")
    else:
        spread = ""
        if s.best_cv is not None and s.best_cv.get("std") is not None:
            spread = f" ± {_num(s.best_cv['std'])} (mean ± std of {s.best_cv['folds']} folds)"
        lines.append(f"  Best trial: #{s.best_trial}  value {_num(s.best_value)}{spread}")
        lines.append("  Best params:")
        lines += [f"    {k}: {v:.6g}" if isinstance(v, float) else f"    {k}: {v}" for k, v in s.best_params.items()]
    return "\n".join(lines)


def studies_table(rows: list[Summary]) -> str:
    if not rows:
        return "no studies in the store (create one with: hpo create-study NAME)"
    header = f"{'study':24s} {'complete':>8s} {'pruned':>7s} {'fail':>5s} {'running':>7s}  best"
    out = [header]
    for s in rows:
        if s.pareto is not None:
            best = f"pareto set of {len(s.pareto)} ({s.metric})"
        else:
            best = f"{s.metric}={_num(s.best_value)} (#{s.best_trial})" if s.best_trial is not None else "-"
        out.append(f"{s.name:24s} {s.counts['COMPLETE']:8d} {s.counts['PRUNED']:7d} {s.counts['FAIL']:5d} "
                   f"{s.counts['RUNNING']:7d}  {best}")
    return "\n".join(out)


def as_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
