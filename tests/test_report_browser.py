"""The report of a real study and retrain, opened offline in headless Chromium through chromedriver's
HTTP API (no extra package): no JS errors, every figure drawn, a screenshot kept in test-artifacts/."""

from __future__ import annotations

import base64
import json
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

    browser.cdp("Network.enable")
    browser.cdp("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                     "uploadThroughput": -1})
    browser.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_TRAP})
    browser.s("POST", "/url", {"url": out.as_uri()})
    deadline = time.monotonic() + 60
    while True:
        figures = browser.script(FIGURE_STATE)
        if figures and all(f["drawn"] for f in figures) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    ARTIFACTS.mkdir(exist_ok=True)
    metrics = browser.cdp("Page.getLayoutMetrics")["cssContentSize"]
    shot = browser.cdp("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": metrics["width"], "height": min(metrics["height"], 16000), "scale": 1}})
    (ARTIFACTS / "report-regression.png").write_bytes(base64.b64decode(shot["data"]))
    (ARTIFACTS / "report-regression.html").write_text(text)

    errors = browser.script("return window.__errors;")
    logs = browser.s("POST", "/se/log", {"type": "browser"})
    severe = [entry["message"] for entry in logs if entry["level"] == "SEVERE"]
    assert errors == [] and severe == [], (errors, severe)
    assert len(figures) == text.count('class="plotly-graph-div"') == 11
    assert all(f["drawn"] > 0 and f["height"] > 100 for f in figures), figures
    assert (ARTIFACTS / "report-regression.png").stat().st_size > 50_000


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
