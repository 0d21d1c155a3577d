"""The report's figures of a study's trials (Optuna's own plots), kept readable and quick at
10,000 trials.

The trials are read once (``hpo.store.trials.read_trials``) and each figure gets a :class:`Snapshot`
study of just the trials it draws. Past a threshold a figure
draws a stated subset (the best N complete trials, a random sample for the importances, the best
trials' learning curves) or switches to WebGL traces (plotly ``Scattergl``), and says which.
"""

from __future__ import annotations

import datetime
import html
import itertools
import math
import random
from collections.abc import Callable

import numpy as np
import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

WEBGL_POINTS = 1_000  # points in one figure above which its scatter traces are drawn with WebGL
MAX_PARALLEL_TRIALS = 500  # parallel coordinates: the best N complete trials
MAX_CONTOUR_TRIALS = 200  # contour: the best N complete trials (its grid is N x N cells)
MIN_IMPORTANCE_TRIALS = 20  # complete trials below which importances are said to be not yet meaningful
MAX_IMPORTANCE_TRIALS = 2_000  # importances: a seeded random sample of the complete trials past this
MAX_HISTORY_TRIALS = 150  # intermediate-value lines drawn; more only blur into one band
MIN_PAIR_TRIALS = 10  # complete trials a contour pair must share (all of them when fewer are complete)
STATE_COLOURS = {"COMPLETE": "blue", "FAIL": "red", "PRUNED": "orange", "RUNNING": "green", "WAITING": "gray"}


class Snapshot(optuna.Study):
    """A study that holds just ``trials``, for Optuna's figures: they read it through ``get_trials``,
    which hands the trials out uncopied (the figures only read them, and some would otherwise
    copy every trial once per parameter) and with their own numbers."""

    def __init__(self, direction: optuna.study.StudyDirection | list[optuna.study.StudyDirection],
                 trials: list[FrozenTrial]):
        storage = optuna.storages.InMemoryStorage()
        storage.create_new_study(direction if isinstance(direction, list) else [direction], "report")
        super().__init__(study_name="report", storage=storage)
        self._snapshot = trials

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [t for t in self._snapshot if states is None or t.state in states]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


def best_first(trials: list[FrozenTrial], direction: optuna.study.StudyDirection) -> list[FrozenTrial]:
    """Complete ``trials`` from the best value down (ties: lower trial number first)."""
    sign = -1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(trials, key=lambda t: (sign * t.value, t.number))


def best_of(trials: list[FrozenTrial], direction, n: int) -> tuple[list[FrozenTrial], str]:
    """At most ``n`` of the complete ``trials`` (the best ones), in trial order, and what they are in words."""
    if len(trials) <= n:
        return trials, f"all {len(trials)} complete trials"
    kept = sorted(best_first(trials, direction)[:n], key=lambda t: t.number)
    return kept, f"the best {n} of the {len(trials)} complete trials"


def webgl(fig: go.Figure, limit: int = WEBGL_POINTS) -> go.Figure:
    """The figure with its scatter traces drawn by WebGL when they hold more than ``limit`` points
    together (SVG slows the page down past a few thousand), said in its title."""
    scatters = [t for t in fig.data if t.type == "scatter"]
    points = sum(len(t.x) if t.x is not None else 0 for t in scatters)
    if points <= limit:
        return fig
    gl = go.Figure([go.Scattergl({k: v for k, v in t.to_plotly_json().items() if k != "type"})
                    if t.type == "scatter" else t for t in fig.data], layout=fig.layout)
    gl.update_layout(title=f"{fig.layout.title.text or ''} (WebGL: {points:,} points)")
    return gl


def timeline_title(trials: list[FrozenTrial]) -> str:
    """The timeline section's title, with the number of worker processes that ran the trials."""
    workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
    if not workers:
        return "Timeline"
    return f"Timeline ({len(workers)} worker{'s' if len(workers) != 1 else ''})"


def timeline_webgl(trials: list[FrozenTrial]) -> go.Figure:
    """Optuna's timeline (a bar per trial from its start to its end, by state) as WebGL line
    segments: 10,000 SVG bars take seconds to draw and megabytes of page."""
    def ms(moment: datetime.datetime) -> float:  # a date axis reads numbers as ms since 1970 UTC
        # Optuna 5 reads trial times as local times without a zone (it stores them in UTC).
        return moment.timestamp() * 1000

    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    latest = ms(max(ends) if ends else max(t.datetime_start for t in trials if t.datetime_start))
    fig = go.Figure()
    for state in sorted(TrialState, key=lambda s: s.name):
        chosen = [t for t in trials if t.state == state]
        if not chosen:
            continue
        start = np.array([ms(t.datetime_start) if t.datetime_start else latest for t in chosen])
        end = np.array([latest + 1000 if state == TrialState.RUNNING else
                        ms(t.datetime_complete) if t.datetime_complete else s + 1000 for t, s in zip(chosen, start)])
        gap = np.full(len(chosen), np.nan)
        number = np.array([t.number for t in chosen], dtype=float)
        seconds = (end - start) / 1000
        # Segments start -> end, NaN between them; numeric arrays travel as compact binary.
        fig.add_trace(go.Scattergl(
            x=np.column_stack([start, end, gap]).ravel(), y=np.column_stack([number, number, gap]).ravel(),
            customdata=np.column_stack([seconds, seconds, gap]).ravel(), mode="lines", name=state.name,
            hovertemplate="trial %{y}: %{customdata:.1f} s<extra>" + state.name + "</extra>",
            line=dict(color=STATE_COLOURS[state.name], width=2)))
    fig.update_layout(title=f"Timeline Plot (WebGL: one line per trial, {len(trials):,} trials)",
                      xaxis=dict(title="Datetime", type="date"), yaxis_title="Trial", showlegend=True)
    return fig


def integer_ticks(fig: go.Figure, trials: list[FrozenTrial], *, most: int = 6) -> go.Figure:
    """Optuna's parallel coordinates with whole-number ticks on the axes of integer parameters (it
    puts five evenly spaced ticks on every numeric axis: 1, 1.5, 2, 2.5, 3 for a layer count). Its
    ticks are annotations at the axis index, placed linearly between the axis' lowest and highest
    value; log-scaled and categorical axes keep theirs."""
    labels = list(fig.layout.xaxis.ticktext or [])
    ints: dict[str, list[int]] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            if isinstance(dist, optuna.distributions.IntDistribution) and not dist.log and name in t.params:
                ints.setdefault(name, []).append(int(t.params[name]))
    annotations = list(fig.layout.annotations or [])
    for name, values in ints.items():
        label = name if len(name) < 20 else f"{name[:17]}..."  # as Optuna truncates its axis labels
        lo, hi = min(values), max(values)
        if label not in labels or lo == hi:
            continue
        axis = labels.index(label)
        ticks = [a for a in annotations if a.x == axis and a.text != "None"]  # "None": trials without it
        if len(ticks) < 2:
            continue
        bottom, top = min(a.y for a in ticks), max(a.y for a in ticks)  # where lo and hi sit
        step = max(1, math.ceil((hi - lo) / (most - 1)))
        whole = list(range(lo, hi + 1, step))
        style = ticks[0].to_plotly_json()
        annotations = [a for a in annotations if a not in ticks] + [
            go.layout.Annotation({**style, "y": bottom + (v - lo) / (hi - lo) * (top - bottom), "text": str(v)})
            for v in whole]
    fig.layout.annotations = annotations
    return fig


def contour_pair(ranked: list[str], complete: list[FrozenTrial]) -> tuple[tuple[str, str] | None, int]:
    """The most important pair of parameters (by rank sum in ``ranked``, most important first) that
    is sampled together, with at least two values each, in ``MIN_PAIR_TRIALS`` complete trials (or
    in all of them when fewer are complete); and the number needed. In a conditional space the top
    two may never meet (``width`` and ``width_l0`` under a searched schedule)."""
    needed = min(MIN_PAIR_TRIALS, len(complete))
    pairs = sorted(itertools.combinations(range(len(ranked)), 2), key=lambda ij: (ij[0] + ij[1], ij[0]))
    for i, j in pairs:
        a, b = ranked[i], ranked[j]
        both = [t for t in complete if a in t.params and b in t.params]
        if len(both) >= max(needed, 2) and all(len({repr(t.params[p]) for t in both}) > 1 for p in (a, b)):
            return (a, b), needed
    return None, needed


def optuna_sections(page, name: str, direction: optuna.study.StudyDirection, trials: list[FrozenTrial]) -> None:
    """The sections of Optuna's figures: history, importances, contour, parallel coordinates,
    intermediate values, timeline. ``page`` is a ``hpo.report.html.Page``."""
    from optuna import visualization as vis

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    hint = f"run more trials: hpo worker --study {name}"
    note: Callable[[str], str] = lambda text: f"<p>{html.escape(text)}</p>"  # noqa: E731

    sec = page.section("history", "Optimization history")
    # Optuna's history indexes its values by trial number: it takes every trial.
    sec.parts.append(page.figure(lambda: webgl(vis.plot_optimization_history(Snapshot(direction, trials))),
                                 "optimization history"))

    sec = page.section("importances", "Parameter importances")
    ranked: list[str] = []
    if len(complete) < 2 or not any(t.params for t in complete):
        sec.parts.append(page.note(f"parameter importances need at least 2 complete trials with parameters; {hint}"))
    else:
        sample = complete
        if len(complete) < MIN_IMPORTANCE_TRIALS:
            sec.parts.append(page.note(
                f"only {len(complete)} complete trial{'s' if len(complete) != 1 else ''}: importances from fewer than "
                f"~{MIN_IMPORTANCE_TRIALS} are not yet meaningful (a few more trials can reorder them); {hint}"))
        if len(complete) > MAX_IMPORTANCE_TRIALS:
            sample = sorted(random.Random(0).sample(complete, MAX_IMPORTANCE_TRIALS), key=lambda t: t.number)
            sec.parts.append(note(f"From a random sample of {MAX_IMPORTANCE_TRIALS} of the {len(complete)} complete trials."))

        def importances() -> go.Figure:
            fig = vis.plot_param_importances(Snapshot(direction, sample))
            # The bars run from least to most important.
            ranked.extend(list(fig.data[0].y)[::-1] if fig.data else [])
            return fig

        sec.parts.append(page.figure(importances, "parameter importances"))

    sec = page.section("contour", "Contour of the most important pair")
    pair, needed = contour_pair(ranked, complete)
    if len(ranked) < 2:
        sec.parts.append(page.note(f"the contour needs two parameters ranked by importance; {hint}"))
    elif pair is None:
        sec.parts.append(page.note(f"no two parameters of the importance ranking were sampled together (with two "
                                   f"values or more each) in {needed} complete trials: the space is conditional; {hint}"))
    else:
        both = [t for t in complete if pair[0] in t.params and pair[1] in t.params]
        drawn, which = best_of(both, direction, MAX_CONTOUR_TRIALS)
        sec.parts.append(note(f"{pair[0]} × {pair[1]}, the most important pair sampled together: "
                              f"{which.replace('complete trials', 'complete trials that have both')}."))
        sec.parts.append(page.figure(lambda: vis.plot_contour(Snapshot(direction, drawn), params=list(pair)),
                                     "contour"))

    sec = page.section("parallel", "Parallel coordinates")
    if len(complete) < 2:
        sec.parts.append(page.note(f"parallel coordinates need at least 2 complete trials; {hint}"))
    else:
        drawn, which = best_of(complete, direction, MAX_PARALLEL_TRIALS)
        sec.parts.append(note(f"Drawn: {which}."))
        sec.parts.append(page.figure(lambda: integer_ticks(vis.plot_parallel_coordinate(Snapshot(direction, drawn)),
                                                           drawn),
                                     "parallel coordinates"))

    sec = page.section("intermediate", "Intermediate values (pruning)")
    reported = [t for t in trials if t.intermediate_values]
    if len(reported) > MAX_HISTORY_TRIALS:
        sign = -1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else 1.0

        def last(t: FrozenTrial) -> float:  # a nan (diverged) curve ranks last
            value = sign * t.intermediate_values[max(t.intermediate_values)]
            return float("inf") if value != value else value

        reported = sorted(sorted(reported, key=last)[:MAX_HISTORY_TRIALS], key=lambda t: t.number)
        sec.parts.append(note(f"The {MAX_HISTORY_TRIALS} trials with the best last reported value are drawn."))
    sec.parts.append(page.figure(lambda: vis.plot_intermediate_values(Snapshot(direction, reported)),
                                 "intermediate values"))

    sec = page.section("timeline", timeline_title(trials))
    if len(trials) > WEBGL_POINTS:
        sec.parts.append(page.figure(lambda: timeline_webgl(trials), "timeline"))
    else:
        sec.parts.append(page.figure(lambda: vis.plot_timeline(Snapshot(direction, trials)), "timeline"))
