"""The report's figures of a study of several objectives: Optuna's Pareto front (feasible and
infeasible trials apart, the retrained trials marked) and its hypervolume history."""

from __future__ import annotations

import html

import numpy as np
import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from hpo.report.study_figures import Snapshot, timeline_title


def reference_point(complete: list[FrozenTrial], directions: list[optuna.study.StudyDirection]) -> list[float]:
    """A point every complete trial dominates: each objective's worst value moved a tenth of its
    range (at least 1e-9) further, for the hypervolume."""
    values = np.asarray([t.values for t in complete], dtype=float)
    out = []
    for k, d in enumerate(directions):
        low, high = float(np.min(values[:, k])), float(np.max(values[:, k]))
        pad = max(0.1 * (high - low), 1e-9)
        out.append(high + pad if d == optuna.study.StudyDirection.MINIMIZE else low - pad)
    return out


def pareto_sections(page, name: str, directions: list[optuna.study.StudyDirection], metric_names: list[str],
                    trials: list[FrozenTrial], retrained: set[int] = frozenset()) -> None:
    """The Pareto front, the hypervolume history and the timeline. ``page`` is a ``hpo.report.html.Page``;
    ``retrained``: numbers of trials with a retrain, marked on the front."""
    from optuna import visualization as vis

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    hint = f"run more trials: hpo worker --study {name}"
    study = Snapshot(directions, trials)

    def front() -> go.Figure:
        fig = vis.plot_pareto_front(study, target_names=metric_names)
        marked = [t for t in complete if t.number in retrained]
        if marked and len(metric_names) == 2:
            fig.add_trace(go.Scatter(x=[t.values[0] for t in marked], y=[t.values[1] for t in marked],
                                     mode="markers", name="retrained",
                                     marker=dict(symbol="circle-open", size=16, color="black", line=dict(width=2))))
        return fig

    sec = page.section("pareto", "Pareto front")
    if not complete:
        sec.parts.append(page.note(f"no complete trial yet; {hint}"))
    else:
        sec.parts.append(f"<p>{html.escape(' × '.join(metric_names))}: every complete trial, the Pareto set "
                         f"(best trials) apart; infeasible trials (a broken constraint) in grey.</p>")
        sec.parts.append(page.figure(front, "Pareto front"))
    sec = page.section("hypervolume", "Hypervolume history")
    if len(complete) < 2:
        sec.parts.append(page.note(f"the hypervolume history needs at least 2 complete trials; {hint}"))
    else:
        ref = reference_point(complete, directions)
        sec.parts.append(f"<p>Reference point: {html.escape(', '.join(f'{n}={v:.4g}' for n, v in zip(metric_names, ref)))} "
                         f"(each objective's worst value, a tenth of its range further).</p>")
        sec.parts.append(page.figure(lambda: vis.plot_hypervolume_history(study, ref), "hypervolume history"))
    sec = page.section("timeline", timeline_title(trials))
    sec.parts.append(page.figure(lambda: vis.plot_timeline(Snapshot(directions, trials)), "timeline"))
