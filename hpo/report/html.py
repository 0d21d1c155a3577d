"""One self-contained HTML report per study: statistics, Optuna's figures, the latest retrain and a
look inside its models.

plotly.js is embedded once in the page head, so the file opens offline. Every section is built
under a guard: a section whose data are missing says what to run to get them, and a figure that
cannot be drawn says why, instead of the whole report failing.
"""

from __future__ import annotations

import html
import importlib.metadata
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import optuna
import plotly.graph_objects as go
import torch
import yaml
from optuna.trial import TrialState

import hpo
from hpo.console import sharing_text
from hpo.errors import HpoError
from hpo.report.figures import retrain_sections
from hpo.report.pareto_figures import pareto_sections
from hpo.report.study_figures import optuna_sections
from hpo.report.trials_table import trials_section
from hpo.search.study import SPEC_TEXT_ATTR, open_study
from hpo.spec.schema import FAMILY, StudySpec
from hpo.store import optuna_private
from hpo.store.artifacts import open_artifact_store
from hpo.store.config import STORAGE_ROOT
from hpo.store.paths import name_in
from hpo.store.statistics import Summary, summarize
from hpo.store.storage import open_storage
from hpo.store.trials import read_trials

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
nav{position:fixed;top:0;left:0;width:210px;height:100vh;overflow:auto;background:#f0f2f5;
    border-right:1px solid #ddd;padding:12px;box-sizing:border-box;font-size:14px}
nav a{display:block;color:#245;text-decoration:none;padding:3px 0}nav a:hover{text-decoration:underline}
main{margin-left:230px;max-width:1200px;padding:8px 24px 60px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px 18px 16px;margin:18px 0}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #eee;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ddd;padding:3px 10px;text-align:left}
th{background:#f5f5f5}pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:400px}
p.missing{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px}
code{background:#f1f1f1;padding:1px 4px;border-radius:3px}
@media (max-width:900px){nav{position:static;width:auto;height:auto}main{margin-left:0}}
"""


@dataclass
class Section:
    id: str
    title: str
    parts: list[str] = field(default_factory=list)


class Page:
    """Collects sections; turns figures into divs (without plotly.js, which the page holds once)."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.n_figures = 0

    def section(self, id: str, title: str) -> Section:
        s = Section(id, title)
        self.sections.append(s)
        return s

    def note(self, text: str) -> str:
        return missing(text)

    def table(self, rows: list[tuple[str, object]]) -> str:
        return table(rows)

    def figure(self, build: Callable[[], go.Figure], what: str) -> str:
        try:
            with warnings.catch_warnings():
                # Optuna warns about thin data (few trials per regime): the figure still says enough.
                warnings.simplefilter("ignore")
                fig = build()
        except Exception as e:  # one figure that cannot be drawn must not cost the whole report
            return missing(f"{what}: not drawn ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if not fig.data:
            return missing(f"{what}: nothing to draw yet")
        self.n_figures += 1
        fig.update_layout(template="plotly_white", margin=fig.layout.margin or dict(l=60, r=30, t=70, b=50))
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n_figures}",
                           default_width="100%", config={"displaylogo": False, "responsive": True})


def missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices(trials: list[optuna.trial.FrozenTrial]) -> str:
    seen: dict[str, int] = {}
    for t in trials:
        device = t.user_attrs.get("device") or t.system_attrs.get("device")
        if device:
            seen[str(device)] = seen.get(str(device), 0) + 1
    if not seen:
        return "not recorded by the workers"
    return ", ".join(f"{d} ({n} trials)" for d, n in sorted(seen.items()))


def spec_text(spec: StudySpec) -> str:
    """The spec as YAML, data paths as its author wrote them (not as resolved where it was created),
    the sampler's and pruner's settings of their kind only, embedded tables as a row count."""
    raw = spec.to_dict()
    data = raw.get("data", {})
    data.update(data.pop("as_written", None) or {})
    if data.get("inline"):
        data["inline"] = {part: f"{len(t['rows'])} rows embedded" for part, t in data["inline"].items()}
    return yaml.safe_dump(raw, sort_keys=False)


def _spread(s: Summary) -> str:
    """`` ± std (mean ± std of K folds: v1, v2, ...)`` for a cross-validated best trial, else ""."""
    cv = s.best_cv
    if not cv or cv.get("std") is None:
        return ""
    return f" ± {_num(cv['std'])} (mean ± std of {cv['folds']} folds: {', '.join(_num(v) for v in cv['values'])})"


def families_table(spec: StudySpec, trials: list[optuna.trial.FrozenTrial]) -> str:
    """One row per searched model family: its trials, its best value and trial, and the parameter
    counts (``n_params``) of that trial and of the family's median trial."""
    maximize = spec.direction == "maximize"
    head = "".join(f"<th>{h}</th>" for h in ("family", "complete / pruned / failed", "best value", "best trial",
                                               "n_params of the best", "median n_params"))
    body = []
    for family in spec.families:
        own = [t for t in trials if t.params.get(FAMILY) == family]
        done = [t for t in own if t.state == TrialState.COMPLETE and t.values]
        best = (max if maximize else min)(done, key=lambda t: t.values[0]) if done else None
        sizes = sorted(t.user_attrs["n_params"] for t in own if "n_params" in t.user_attrs)
        counts = " / ".join(str(sum(t.state == st for t in own))
                            for st in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        cells = (family, counts, _num(best.values[0]) if best else "-", f"#{best.number}" if best else "-",
                 f"{best.user_attrs['n_params']:,}" if best and "n_params" in best.user_attrs else "-",
                 f"{sizes[len(sizes) // 2]:,}" if sizes else "-")
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f'<table class="families"><tr>{head}</tr>{"".join(body)}</table>'


def statistics_section(page: Page, s: Summary, spec: StudySpec, trials: list[optuna.trial.FrozenTrial], *,
                       spec_written: str | None = None) -> None:
    sec = page.section("statistics", "Study statistics")
    rows = [("study", s.name), ("description", spec.description or "-"),
            ("objective", f"{s.direction} {s.metric}"), ("model family", spec.model),
            ("finished trials", s.finished), ("pruned trials", s.counts["PRUNED"]),
            ("complete trials", s.counts["COMPLETE"]), ("failed trials", s.failed),
            ("interrupted (re-queued)", s.interrupted),
            ("running / waiting", f"{s.counts['RUNNING']} / {s.counts['WAITING']}"),
            ("best value", f"{_num(s.best_value)}{_spread(s)}" + (f" (trial #{s.best_trial})" if s.best_trial is not None else "")
             if s.pareto is None else f"a Pareto set of {len(s.pareto)} trials (below)"),
            *([("constraints", ", ".join(f"{c.metric} {c.to_dict()}" for c in spec.constraints)
                + f"; infeasible trials: {s.infeasible} (never best)")] if spec.constraints else []),
            ("wall time", "-" if s.wall_seconds is None else f"{s.wall_seconds:.1f} s"),
            ("device", _devices(trials)),
            ("GPU sharing (trials)", sharing_text(s.gpu_sharing) if s.gpu_sharing else "not recorded (CPU trials, "
                                     "or workers not started by hpo fleet)"),
            ("versions", f"hpo {hpo.__version__}, torch {torch.__version__}, optuna {optuna.__version__}, "
                         f"plotly {_version('plotly')}, python {platform.python_version()}")]
    sec.parts.append(table(rows))
    if spec.searches_family:
        sec.parts.append("<h3>Model families</h3>")
        sec.parts.append(families_table(spec, trials))
    if s.pareto:
        sec.parts.append("<h3>Pareto set</h3>")
        names = s.metric.split("/")
        sec.parts.append(table([(f"trial #{m['trial']}", ", ".join(f"{n}={_num(v)}" for n, v in zip(names, m["values"]))
                                 + " · " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in m["params"].items())) for m in s.pareto]))
    elif s.best_params:
        sec.parts.append("<h3>Best parameters</h3>")
        sec.parts.append(table([(k, f"{v:.6g}" if isinstance(v, float) else v) for k, v in s.best_params.items()]))
    else:
        sec.parts.append(missing(f"no complete trial yet; run: hpo worker --study {s.name}"))
    if spec_written is not None:
        sec.parts.append(f"<h3>Spec</h3><p>As written in its file at create-study.</p>"
                         f"<pre>{html.escape(spec_written)}</pre>")
    else:  # a study made through the API, or before the file's text was kept
        sec.parts.append(f"<h3>Spec</h3><pre>{html.escape(spec_text(spec))}</pre>")


def study_page(summary: Summary, spec: StudySpec, direction: optuna.study.StudyDirection | list,
               trials: list[optuna.trial.FrozenTrial], retrained: set[int] = frozenset(), *,
               spec_written: str | None = None) -> Page:
    """The page's statistics and Optuna's figures, from the study's summary and its trials (a study
    of several objectives, ``direction`` a list: the Pareto front and hypervolume history)."""
    page = Page()
    statistics_section(page, summary, spec, trials, spec_written=spec_written)
    if isinstance(direction, list):
        pareto_sections(page, summary.name, direction, spec.metric_names, trials, retrained)
    else:
        optuna_sections(page, summary.name, direction, trials)
    trials_section(page, trials)
    return page


def render(page: Page, *, title: str, subtitle: str) -> str:
    from plotly.offline import get_plotlyjs

    toc = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in page.sections)
    body = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{"".join(s.parts)}</section>'
                   for s in page.sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f"<nav><strong>Contents</strong>{toc}</nav><main><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p>{body}</main></body></html>")


def default_out(study_name: str) -> Path:
    """``storage/reports/<study>.html``.

    Raises:
        HpoError: a study name that would leave that folder (``hpo.store.paths``).
    """
    return name_in(STORAGE_ROOT / "reports", study_name, what="study name", suffix=".html")


def report_path(study_name: str, out: str | Path | None) -> Path:
    """The file ``hpo report`` writes: ``out``; ``out/<study>.html`` when ``out`` is a folder or ends
    with a slash; ``default_out`` when ``out`` is None."""
    if out is None:
        return default_out(study_name)
    text = str(out)
    try:
        folder = text.endswith(("/", os.sep)) or Path(text).is_dir()
    except OSError:  # e.g. a name too long: writing it says so in one line
        folder = False
    if folder:
        return name_in(Path(text), study_name, what="study name", suffix=".html")
    return Path(text)


def _check_replaceable(path: Path) -> None:
    """A report replaces an earlier report, never another file (``--out README.md``)."""
    try:
        if not path.exists():
            return
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise HpoError(f"--out: cannot write the report to {path}: {e.strerror or e}") from e
    if b"<title>hpo report: " not in head:
        raise HpoError(f"--out: {path} exists and is not an hpo report; a report replaces only an earlier "
                       f"report: remove it yourself or choose another --out")


def write_report(study_name: str, *, storage_url: str | None = None, artifacts: str | None = None,
                 out: str | Path | None = None) -> Path:
    """Write the study's HTML report and return its path.

    Args:
        artifacts: artifact folder of the retrain files (default: beside the store, see ``hpo.store``).
        out: file to write (default ``storage/reports/<study>.html``; a folder, or a path ending
            with a slash: ``out/<study>.html``); written whole or not at all, replacing an earlier
            report there but no other file.

    Raises:
        StoreError: when the store cannot be opened or has no such study.
        HpoError: when the study has no trials yet.
    """
    start = time.perf_counter()
    path = report_path(study_name, out)
    _check_replaceable(path)
    storage = open_storage(storage_url, heartbeat=False)
    study, spec = open_study(study_name, storage)
    trials = read_trials(storage, optuna_private.study_id(study))  # the one read of the trials
    if not trials:
        raise HpoError(f"study {study_name!r} has no trials yet; run: hpo worker --study {study_name}")
    written = study.user_attrs.get(SPEC_TEXT_ATTR)
    if spec.multi_objective:
        from hpo.retrain.results import list_retrains

        page = study_page(summarize(study), spec, list(study.directions), trials,
                          {r.trial_number for r in list_retrains(study)}, spec_written=written)
    else:
        page = study_page(summarize(study), spec, study.direction, trials, spec_written=written)
    retrain_sections(page, study, spec, artifact_store=lambda: open_artifact_store(storage_url, artifacts),
                     storage=storage)
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = render(page, title=f"hpo report: {study_name}",
                  subtitle=f"generated {created} in {time.perf_counter() - start:.1f} s")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        raise HpoError(f"--out: cannot write the report to {path}: {e.strerror}") from e
    return path
