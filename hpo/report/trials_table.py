"""The report's table of every trial: number, state, value(s), duration, worker and parameters,
sortable by any column, searchable and paged, in a few lines of plain JavaScript inside the one
offline HTML file (no library, no CDN).

The trials travel once, as compact JSON rows in a ``<script type="application/json">`` block; the
page draws only the rows of the current page, so 10,000 trials stay quick to sort, search and page.
A FAIL trial that was re-queued (stopped by a signal or a dead worker: its retry carries on) shows
as ``FAIL (interrupted, re-queued)``, as ``hpo status`` counts it.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from optuna.trial import FrozenTrial

from hpo.store.budget import retried_numbers

PAGE_ROWS = 50
INTERRUPTED = "FAIL (interrupted, re-queued)"

SCRIPT = """
(function () {
  const root = document.getElementById('trials-table');
  const data = JSON.parse(document.getElementById('trials-data').textContent);
  const cols = data.columns, rows = data.rows, pageRows = data.page_rows;
  const text = rows.map(r => r.map(v => v === null ? '' : String(v)).join(' ').toLowerCase());
  const show = v => v === null ? '' : (typeof v === 'number' && !Number.isInteger(v) ? v.toPrecision(6) : String(v));
  const state = {order: rows.map((_, i) => i), shown: rows.map((_, i) => i), sortCol: 0, desc: false, page: 0};
  const search = root.querySelector('input[type=search]');
  const table = root.querySelector('table'), info = root.querySelector('.trials-info');
  table.createTHead().innerHTML = '<tr>' + cols.map((c, i) =>
    '<th data-col="' + i + '" style="cursor:pointer" title="sort">' + c.replace(/&/g, '&amp;').replace(/</g, '&lt;') +
    '</th>').join('') + '</tr>';
  const body = table.createTBody();
  function compare(a, b) {  // empty cells last, numbers as numbers
    const x = rows[a][state.sortCol], y = rows[b][state.sortCol];
    if (x === null || y === null) return x === y ? a - b : (x === null ? 1 : -1);
    const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return (state.desc ? -c : c) || a - b;
  }
  function filter() {
    const words = search.value.toLowerCase().split(/\\s+/).filter(w => w);
    state.shown = state.order.filter(i => words.every(w => text[i].includes(w)));
    state.page = 0;
  }
  function draw() {
    const pages = Math.max(1, Math.ceil(state.shown.length / pageRows));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const first = state.page * pageRows, slice = state.shown.slice(first, first + pageRows);
    body.innerHTML = slice.map(i => '<tr>' + rows[i].map(v =>
      '<td>' + show(v).replace(/&/g, '&amp;').replace(/</g, '&lt;') + '</td>').join('') + '</tr>').join('');
    info.textContent = (slice.length ? (first + 1) + '–' + (first + slice.length) : '0') + ' of ' +
      state.shown.length.toLocaleString('en') + ' trials' +
      (state.shown.length < rows.length ? ' (filtered from ' + rows.length.toLocaleString('en') + ')' : '') +
      ', page ' + (state.page + 1) + ' of ' + pages;
    table.tHead.querySelectorAll('th').forEach(th => {
      const i = +th.dataset.col;
      th.textContent = cols[i] + (i === state.sortCol ? (state.desc ? ' ▼' : ' ▲') : '');
    });
  }
  table.tHead.addEventListener('click', e => {
    const th = e.target.closest('th');
    if (!th) return;
    const col = +th.dataset.col;
    state.desc = col === state.sortCol ? !state.desc : false;
    state.sortCol = col;
    state.order.sort(compare);
    filter();
    draw();
  });
  search.addEventListener('input', () => { filter(); draw(); });
  root.querySelectorAll('button[data-step]').forEach(b => b.addEventListener('click', () => {
    const step = b.dataset.step;
    state.page = step === 'first' ? 0 : step === 'last' ? Infinity : state.page + (+step);
    draw();
  }));
  root.hpoTable = {rows: rows, columns: cols, state: state, draw: draw};
  draw();
})();
"""


def _number(value: float | None) -> float | str | None:
    """A JSON-safe cell: NaN and infinities as text (JSON has no such numbers)."""
    if value is None:
        return None
    return value if math.isfinite(value) else str(value)


def trial_rows(trials: list[FrozenTrial]) -> dict[str, Any]:
    """The table's columns and one row per trial (in trial order): number, state, the value (one
    column per objective; cross-validated trials: then the folds' standard deviation), duration in seconds, worker, then every parameter any trial has (empty
    where a trial has not sampled it)."""
    retried = retried_numbers(trials)
    n_values = max((len(t.values) for t in trials if t.values), default=1)
    values = ["value"] if n_values == 1 else [f"value {i}" for i in range(n_values)]
    cv = any("cv_std" in t.user_attrs for t in trials)  # cross-validated trials: the folds' spread beside the mean
    values += ["± std (folds)"] if cv else []
    params = list(dict.fromkeys(name for t in trials for name in t.params))
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        state = INTERRUPTED if t.state.name == "FAIL" and t.number in retried else t.state.name
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        own = list(t.values) if t.values else [None] * n_values
        spread = [_number(t.user_attrs.get("cv_std"))] if cv else []
        rows.append([t.number, state, *(_number(v) for v in own + [None] * (n_values - len(own))), *spread,
                     None if duration is None else round(duration, 3), t.user_attrs.get("worker"),
                     *(t.params.get(p) if not isinstance(t.params.get(p), float) else _number(t.params[p])
                       for p in params)])
    return {"columns": ["number", "state", *values, "duration (s)", "worker", *params], "rows": rows,
            "page_rows": PAGE_ROWS}


def trials_table_html(trials: list[FrozenTrial]) -> str:
    """The table's HTML: a search box, paging buttons, the table, its data and its script."""
    data = json.dumps(trial_rows(trials), separators=(",", ":"), default=str).replace("</", "<\\/")
    buttons = "".join(f'<button type="button" data-step="{step}">{html.escape(label)}</button> '
                      for step, label in (("first", "« first"), ("-1", "‹ previous"), ("1", "next ›"),
                                          ("last", "last »")))
    return (f'<div id="trials-table"><p><input type="search" placeholder="search (e.g. COMPLETE Adam)" '
            f'aria-label="search the trials" size="32"> {buttons}<span class="trials-info"></span></p>'
            f'<div style="overflow-x:auto"><table class="trials"></table></div></div>'
            f'<script type="application/json" id="trials-data">{data}</script><script>{SCRIPT}</script>')


def trials_section(page, trials: list[FrozenTrial]) -> None:
    """The "All trials" section of ``page`` (a ``hpo.report.html.Page``)."""
    sec = page.section("trials", f"All trials ({len(trials):,})")
    sec.parts.append("<p>Click a column to sort by it (again to reverse); the search keeps the trials whose "
                     "cells contain every word.</p>")
    sec.parts.append(trials_table_html(trials))
