"""The store URL hpo prints opens the store in plain Optuna, the ``optuna`` CLI and a stand-alone
optuna-dashboard in the same environment (SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo, small_regression_spec
from test_dashboard_browser import free_port, get_json

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent  # the environment's own optuna and optuna-dashboard scripts


@pytest.fixture
def printed_url(tmp_path, pg_url, cli_env):
    """A one-trial study in PostgreSQL made through the CLI from the bare URL a user writes, and the
    URL that ``hpo create-study`` printed."""
    bare = pg_url.replace("postgresql+psycopg2://", "postgresql://")
    env = {**cli_env, "HPO_STORAGE": bare}
    proc = run_hpo("create-study", str(small_regression_spec(tmp_path, budget={"n_trials": 1})), env=env, check=0)
    url = re.search(r"created study 'regression' in (\S+) ", proc.stdout).group(1)
    assert url == bare
    run_hpo("worker", "--study", "regression", env=env, check=0)
    return url


def test_plain_optuna_and_its_cli_open_the_printed_url(printed_url):
    study = optuna.load_study(study_name="regression", storage=printed_url)  # plain Optuna, not hpo's storage
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    proc = subprocess.run([str(BIN / "optuna"), "studies", "--storage", printed_url, "-f", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [(s["name"], s["n_trials"]) for s in json.loads(proc.stdout)] == [("regression", 1)]


def test_standalone_optuna_dashboard_serves_the_printed_url(printed_url):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "optuna-dashboard"), printed_url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = get_json(base + "/api/studies")["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"optuna-dashboard did not answer: {proc.communicate(timeout=5)[0]}") from None
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["regression"]
        detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
        assert [t["state"] for t in detail["trials"]] == ["Complete"]
        with urllib.request.urlopen(f"{base}/dashboard/") as page:
            assert page.status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
