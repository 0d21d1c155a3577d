"""Shared fixtures: temporary stores, small specs, and the CLI through its real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"
HPO = [sys.executable, "-m", "hpo.cli"]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh SQLite store in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'store' / 'hpo.db'}"


@pytest.fixture
def cli_env(tmp_path: Path, store_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HPO_STORAGE"] = store_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_hpo(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None,
            check: int | None = None) -> subprocess.CompletedProcess:
    """Run ``hpo ARGS`` in a subprocess; with ``check``, assert that exit code."""
    proc = subprocess.run([*HPO, *args], env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"hpo {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def small_regression_spec(tmp_path: Path, **overrides) -> Path:
    """The shipped regression spec made small (few epochs) so a study runs in seconds; returns its path."""
    raw = yaml.safe_load((STUDIES / "regression.yaml").read_text())
    raw["data"]["train"] = str(STUDIES / "data" / "regression_train.csv")
    raw["data"]["test"] = str(STUDIES / "data" / "regression_test.csv")
    raw["space"]["epochs"] = {"int": [20, 60], "step": 10}
    raw["report_every"] = 5
    raw["pruner"] = {"kind": "median", "n_startup_trials": 3, "n_warmup_steps": 5}
    raw["sampler"] = {"kind": "tpe", "n_startup_trials": 4}
    raw["budget"] = {"n_trials": 12}
    for key, value in overrides.items():
        raw[key] = value
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
