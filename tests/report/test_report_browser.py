"""The report of a real study and retrain, opened offline in headless Chromium through chromedriver's
HTTP API (no extra package): no JS errors, every figure drawn, a screenshot kept in test-artifacts/."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, run_hpo
from test_report import tiny_spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"),
]

# Collects uncaught errors and console.error calls from the first script of the page on.
ERROR_TRAP = """
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('uncaught: ' + e.message));
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + e.reason));
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push('console.error: ' + a.join(' ')); __consoleError(...a); };
"""

FIGURE_STATE = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
  id: d.id,
  drawn: d.querySelectorAll('.trace, .hm image, canvas').length,
  height: d.getBoundingClientRect().height}));
"""


# What each figure shows, for the checks of single figures: title, trace types, the lowest y of
# a "± std" band (from plotly's decoded copy of the data), and whether plotly.js told the reader
# that WebGL is missing.
FIGURE_DATA = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
  title: (d.layout && d.layout.title && d.layout.title.text) || '',
  types: (d._fullData || []).map(t => t.type),
  band_min: Math.min(...(d._fullData || []).filter(t => (t.name || '').endsWith('± std')).flatMap(t => Array.from(t.y))),
  no_webgl: d.innerText.includes('WebGL is not supported')}));
"""


class WebDriver:
    """The few W3C WebDriver calls the test needs, over chromedriver's HTTP API."""

    def __init__(self, port: int, profile: Path):
        self.base = f"http://127.0.0.1:{port}"
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1440,900",
                f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def s(self, method: str, path: str, body: dict | None = None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def cdp(self, cmd: str, params: dict | None = None):
        return self.s("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params or {}})

    def script(self, source: str):
        return self.s("POST", "/execute/sync", {"script": source, "args": []})

    def quit(self) -> None:
        self.s("DELETE", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path: Path):
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        web = WebDriver(port, tmp_path / "chromium-profile")
        try:
            yield web
        finally:
            web.quit()
    finally:
        driver.terminate()
        driver.wait(timeout=20)


def open_report(browser: WebDriver, path: Path, shot: str) -> tuple[list[dict], list[dict]]:
    """Load the report offline, wait until every figure is drawn, keep a screenshot; returns each
    figure's state and data (see FIGURE_STATE, FIGURE_DATA) after checking the page logged no error."""
    browser.cdp("Network.enable")
    browser.cdp("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                     "uploadThroughput": -1})
    browser.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_TRAP})
    browser.s("POST", "/url", {"url": path.as_uri()})
    deadline = time.monotonic() + 60
    while True:
        figures = browser.script(FIGURE_STATE)
        if figures and all(f["drawn"] for f in figures) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    ARTIFACTS.mkdir(exist_ok=True)
    metrics = browser.cdp("Page.getLayoutMetrics")["cssContentSize"]
    png = browser.cdp("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": metrics["width"], "height": min(metrics["height"], 16000), "scale": 1}})
    (ARTIFACTS / f"{shot}.png").write_bytes(base64.b64decode(png["data"]))

    errors = browser.script("return window.__errors;")
    logs = browser.s("POST", "/se/log", {"type": "browser"})
    severe = [entry["message"] for entry in logs if entry["level"] == "SEVERE"]
    assert errors == [] and severe == [], (errors, severe)
    assert all(f["drawn"] > 0 and f["height"] > 100 for f in figures), figures
    assert (ARTIFACTS / f"{shot}.png").stat().st_size > 50_000
    return figures, browser.script(FIGURE_DATA)


def by_title(data: list[dict], start: str) -> dict:
    (figure,) = [f for f in data if f["title"].startswith(start)]
    return figure


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_study_report_renders_in_chromium(tmp_path, cli_env, browser):
    spec = tiny_spec(tmp_path, "browse")
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    run_hpo("worker", "--study", "browse", env=cli_env, check=0)
    run_hpo("retrain", "--study", "browse", "--folds", "3", env=cli_env, check=0)
    out = tmp_path / "browse.html"
    run_hpo("report", "--study", "browse", "--out", str(out), env=cli_env, check=0)
    text = out.read_text()
    for section in ("statistics", "history", "importances", "contour", "parallel", "intermediate", "timeline",
                    "retrain", "curves", "fit", "insight"):
        assert f'<section id="{section}">' in text
    assert "run: hpo retrain" not in text and "not drawn" not in text
    (ARTIFACTS / "report-regression.html").parent.mkdir(exist_ok=True)
    (ARTIFACTS / "report-regression.html").write_text(text)

    figures, data = open_report(browser, out, "report-regression")
    assert len(figures) == text.count('class="plotly-graph-div"') == 11
    # The learning-curve band stays above zero on its log axis.
    assert by_title(data, "Learning curves")["band_min"] > 0
    # Activation profiles: a heatmap (inputs x units) per hidden layer, no lines across unit indices.
    profiles = by_title(data, "Activation profiles")
    assert profiles["types"] and set(profiles["types"]) == {"heatmap"}
    # The contour's pair was sampled together: its figure holds the points of trials with both.
    pair = re.search(r"<p>(\w+) × (\w+), the most important pair sampled together", text).groups()
    import optuna

    complete = optuna.load_study(study_name="browse", storage=cli_env["HPO_STORAGE"]).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert sum(set(pair) <= set(t.params) for t in complete) >= 2
    assert "contour" in by_title(data, "Contour Plot")["types"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_large_study_report_renders_in_chromium(tmp_path, store_url, browser):
    """2,000 trials made by bulk insert: WebGL history and timeline, the best trials elsewhere."""
    from test_study_figures import bulk_study

    from hpo.report.html import write_report

    name = bulk_study(store_url, 2_000, tmp_path, complete=0.6)
    out = write_report(name, storage_url=store_url, out=tmp_path / "large.html")
    text = out.read_text()
    assert "not drawn" not in text
    figures, data = open_report(browser, out, "report-large")
    assert len(figures) == text.count('class="plotly-graph-div"') == 6
    assert by_title(data, "Timeline Plot")["types"] == ["scattergl"] * 4  # COMPLETE, FAIL, PRUNED, RUNNING
    assert "scattergl" in by_title(data, "Optimization History Plot")["types"]
    assert not any(f["no_webgl"] for f in data), data

    # The trials table holds every trial: paged, searchable, sortable.
    table = browser.script(TRIALS_TABLE)
    assert table["total"] == 2_000 and table["body_rows"] == 50, table
    assert table["info"] == "1–50 of 2,000 trials, page 1 of 40" and table["first"][0] == "0"
    import optuna

    study = optuna.load_study(study_name=name, storage=store_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    found = browser.script(TRIALS_SEARCH)
    assert found["info"].startswith(f"1–50 of {len(complete):,} trials (filtered from 2,000)"), found
    assert found["states"] == ["COMPLETE"] and found["first_value"] == pytest.approx(min(t.value for t in complete),
                                                                                     rel=1e-5)
    assert found["last_page_last_number"] == str(max(t.number for t in complete)) or found["sorted_desc"]


TRIALS_TABLE = """
const root = document.getElementById('trials-table');
const rows = root.querySelectorAll('tbody tr');
return {total: root.hpoTable.rows.length, body_rows: rows.length,
        info: root.querySelector('.trials-info').textContent,
        first: Array.from(rows[0].children).map(td => td.textContent)};
"""

# Search for COMPLETE, sort by value (one click: ascending), then read the first row; then the last page.
TRIALS_SEARCH = """
const root = document.getElementById('trials-table');
const search = root.querySelector('input[type=search]');
search.value = 'complete';
search.dispatchEvent(new Event('input'));
const col = root.hpoTable.columns.indexOf('value');
root.querySelector('thead th[data-col="' + col + '"]').click();
const body = () => Array.from(root.querySelectorAll('tbody tr')).map(tr => Array.from(tr.children).map(td => td.textContent));
const page = body();
const out = {info: root.querySelector('.trials-info').textContent, states: [...new Set(page.map(r => r[1]))],
             first_value: parseFloat(page[0][col]),
             sorted_desc: root.hpoTable.state.desc};
root.querySelector('thead th[data-col="0"]').click();
root.querySelector('button[data-step="last"]').click();
const last = body();
out.last_page_last_number = last[last.length - 1][0];
return out;
"""

# The bounding boxes of the ensemble labels in the retrain's fold-scores figure.
VOTE_LABELS = """
return Array.from(document.querySelectorAll('.plotly-graph-div'))
  .filter(d => ((d.layout.title || {}).text || '').startsWith('Test scores per fold model')).flatMap(d =>
  Array.from(d.querySelectorAll('.annotation-text')).filter(t => /majority vote|soft vote/.test(t.textContent))
    .map(t => { const r = t.getBoundingClientRect();
                return {figure: d.id, text: t.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom}; }));
"""


@pytest.mark.timeout(300)
def test_vote_labels_do_not_overlap_when_the_votes_are_close(tmp_path, store_url, browser):
    """A retrain whose majority vote (0.91) and soft vote (0.915) nearly coincide: their labels'
    bounding boxes in the drawn page do not intersect."""
    from test_report import _synthetic_study, write_contract_retrain

    from hpo.report.html import write_report
    from hpo.store.artifacts import open_artifact_store
    from hpo.store.storage import open_storage

    study = _synthetic_study(open_storage(store_url, heartbeat=False), "votes", n_trials=12, steps=5)
    write_contract_retrain(study, open_artifact_store(store_url), tmp_path / "retrain", folds=4,
                           task="classification", in_shape=(1, 8, 8), classes=["a", "b", "c"])
    out = write_report("votes", storage_url=store_url, out=tmp_path / "votes.html")
    open_report(browser, out, "report-votes")
    labels = browser.script(VOTE_LABELS)
    majority = [b for b in labels if b["text"].startswith("majority vote")]
    soft = [b for b in labels if b["text"].startswith("soft vote")]
    assert len(majority) == 1 and len(soft) == 2, labels  # soft vote: on the metric and the loss panel
    for a in majority:
        for b in soft:
            apart = a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            assert apart, (a, b)


def test_error_trap_sees_a_broken_page(tmp_path, browser):
    """The checks above can fail: a page with a script error and an empty figure div is caught."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><div class="plotly-graph-div" id="f"></div>'
                    '<script>console.error("boom"); no_such_function();</script></body></html>')
    browser.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_TRAP})
    browser.s("POST", "/url", {"url": page.as_uri()})
    errors = browser.script("return window.__errors;")
    assert any("boom" in e for e in errors) and any("no_such_function" in e for e in errors), errors
    assert browser.script(FIGURE_STATE)[0]["drawn"] == 0
