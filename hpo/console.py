"""Plain-text formatting of what the commands print: trial lines, study statistics, retrain results."""

from __future__ import annotations

from statistics import fmean, pstdev

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


def params_line(trial: FrozenTrial) -> str:
    """A finished trial's parameters on one short line, as Optuna's own log gives them
    (``  params: lr=0.00123, optimizer=Adam``; floats to 4 significant digits)."""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"           params: {text or '-'}"


def retry_line(trial: FrozenTrial) -> str | None:
    """For a re-queued retry, where it came from and where it started:
    ``trial 14: retry of #9, resumed from epoch 147`` (None for a trial that is no retry)."""
    origin = trial.user_attrs.get("retry_of")
    if origin is None:
        return None
    epoch = trial.user_attrs.get("resumed_from_epoch")
    start = f"resumed from epoch {epoch}" if epoch else "started over (no checkpoint to resume)"
    return f"trial {trial.number}: retry of #{origin}, {start}"


def duration_text(seconds: float) -> str:
    """``42s``, ``4m 12s``, ``3h 05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def budget_line(s: Summary, *, budget: int | None, per_minute: float | None) -> str:
    """The study's progress against its budget, with an estimate of the time left from the rate at
    which trials finished (``per_minute``; None: not known yet):
    ``study: 12 of 300 trials finished (4%), 3 running; about 1h 39m left at 2.9 trials/min``."""
    text = f"study: {s.finished} of {budget} trials finished ({s.finished / budget:.0%})" if budget else \
        f"study: {s.finished} trials finished (no trial budget)"
    text += f", {s.counts['RUNNING']} running"
    if budget and s.finished < budget and per_minute:
        text += f"; about {duration_text((budget - s.finished) / per_minute * 60)} left at {per_minute:.3g} trials/min"
    return text


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
        f"  Number of failed trials:   {s.failed}",
    ]
    if s.interrupted:
        lines.append(f"  Interrupted (re-queued):   {s.interrupted}")
    if s.counts["RUNNING"] or s.counts["WAITING"]:
        lines.append(f"  Running / waiting:         {s.counts['RUNNING']} / {s.counts['WAITING']}")
    if s.wall_seconds is not None:
        lines.append(f"  Wall time:                 {s.wall_seconds:.1f}s")
    if s.gpu_sharing:
        lines.append(f"  GPU sharing (trials):      {sharing_text(s.gpu_sharing)}")
    if s.latency_devices and len(s.latency_devices) > 1:
        lines.append(f"  warning: latency_ms was timed on {len(s.latency_devices)} different devices "
                     f"({sharing_text(s.latency_devices)}): latencies compare only within one device")
    if s.stopped:
        lines.append(f"  Stopped:                   {s.stopped['rule']}: {s.stopped['reason']}")
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
    header = f"{'study':24s} {'complete':>8s} {'pruned':>7s} {'failed':>6s} {'interrupted':>11s} {'running':>7s}  best"
    out = [header]
    for s in rows:
        if s.pareto is not None:
            best = f"pareto set of {len(s.pareto)} ({s.metric})"
        else:
            best = f"{s.metric}={_num(s.best_value)} (#{s.best_trial})" if s.best_trial is not None else "-"
        out.append(f"{s.name:24s} {s.counts['COMPLETE']:8d} {s.counts['PRUNED']:7d} {s.failed:6d} "
                   f"{s.interrupted:11d} {s.counts['RUNNING']:7d}  {best}")
    return "\n".join(out)


def as_json(obj) -> str:
    from hpo.export.json_text import strict_dumps

    return strict_dumps(obj, sort_keys=True, default=str)


ENSEMBLE_LABELS = {"mean": "ensemble mean", "majority_vote": "majority vote", "soft_vote": "soft vote"}


def _sig(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept (0.8900, 0.01234, 1235)."""
    if value is None:
        return "-"
    text = f"{value:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text


def retrain_table(metrics: dict) -> str:
    """Per-fold and ensemble test results of one retrain (its ``metrics.json`` object,
    ``hpo.retrain.results.RetrainMetrics.to_dict``) as a text table.

    Rows: each fold model (the best on validation starred), the folds' mean ± std, then each
    ensemble's own score (the ensemble-mean model for regression; the votes for classifiers).
    A loss column that repeats the metric's (the MSE loss of a regression) is left out; every
    number has 4 significant digits.
    """
    name, folds = metrics["metric"], metrics["per_fold"]
    ensembles = metrics["ensemble"]
    columns = [("val_loss", "val_loss"), (f"val_{name}", "val_metric"),
               ("test_loss", "test_loss"), (f"test_{name}", "test_metric")]

    def repeats(loss: str, metric: str) -> bool:
        rows = [*folds, *ensembles.values()]
        return all(r.get(loss) is None or r.get(loss) == r.get(metric) for r in rows)

    columns = [(h, k) for h, k in columns
               if not (k.endswith("_loss") and repeats(k, k.replace("_loss", "_metric")))]
    rows = [["model", "epochs", *(h for h, _ in columns)]]
    for f in folds:
        mark = " *" if f["fold"] == metrics["best_fold"] else ""
        rows.append([f"fold {f['fold']}{mark}", str(f["epochs_run"]), *(_sig(f[k]) for _, k in columns)])
    if len(folds) > 1:
        spread = [f"{_sig(fmean(v))} ± {_sig(pstdev(v))}"
                  for v in ([f[k] for f in folds] for _, k in columns)]
        rows.append(["folds: mean ± std", "", *spread])
    for ens, e in ensembles.items():
        rows.append([ENSEMBLE_LABELS.get(ens, ens), "", *("" if k.startswith("val_") else _sig(e.get(k)) for _, k in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    tie_note = " (breaks majority-vote ties)" if "majority_vote" in ensembles else ""
    lines.append(f"* best fold on validation{tie_note}")
    return "\n".join(lines)


def trained_line(metrics: dict) -> str:
    """How many models trained, how, how long, and at how many model-epochs per second (3 significant
    digits: a slow CPU retrain's 0.0333 is not 0.0)."""
    if "--reuse-cv" in metrics.get("path_reason", ""):
        return (f"reused the {metrics['folds']} fold models of trial #{metrics['trial_number']} (trained "
                f"{metrics['path']} during the search; --reuse-cv)")
    rate = metrics["model_epochs_per_s"]
    return (f"trained {metrics['folds']} models ({metrics['path']}) in {metrics['train_seconds']:.1f}s"
            + (f", {_sig(rate, 3)} model-epochs/s" if rate else ""))
