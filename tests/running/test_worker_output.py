"""What a worker prints, captured off a terminal: the data it loads, each trial's parameters, a
resumed retry, the study's progress against its budget; a fleet's statistics once; the stop line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import HPO, REPO
from test_faults import FAST_HEARTBEAT, LONG_EPOCHS, create, running_with_reports, slow_spec, wait_for
from test_parallel import fast_spec, start_worker

from hpo.console import budget_line, duration_text
from hpo.running.fleet import worker_command
from hpo.running.progress import BudgetProgress
from hpo.store.statistics import Summary


def stats(finished: int, running: int = 0) -> Summary:
    counts = {"COMPLETE": finished, "PRUNED": 0, "FAIL": 0, "RUNNING": running, "WAITING": 0}
    return Summary(name="s", direction="minimize", metric="val_mse", counts=counts, finished=finished, failed=0,
                   interrupted=0, best_value=None, best_trial=None, best_params={}, wall_seconds=None, gpu_sharing={})


def test_budget_line_gives_the_share_done_and_the_time_left():
    assert budget_line(stats(12, 3), budget=300, per_minute=2.9) == \
        "study: 12 of 300 trials finished (4%), 3 running; about 1h 39m left at 2.9 trials/min"
    assert budget_line(stats(1), budget=4, per_minute=None) == "study: 1 of 4 trials finished (25%), 0 running"
    assert budget_line(stats(4), budget=4, per_minute=10.0) == "study: 4 of 4 trials finished (100%), 0 running"
    assert budget_line(stats(7, 1), budget=None, per_minute=3.0) == "study: 7 trials finished (no trial budget), 1 running"
    assert [duration_text(s) for s in (42, 252, 11_100)] == ["42s", "4m 12s", "3h 05m"]


def test_budget_progress_rate_comes_from_trials_finished_since_it_started(monkeypatch):
    import hpo.running.progress as progress

    clock = iter([100.0, 160.0, 165.0, 400.0])  # start, then one reading per line() call
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    finished = iter([10, 13, 14, 20])  # 10 already finished before this worker began
    tracker = BudgetProgress(lambda: stats(next(finished)), budget=40, every=30.0)
    assert tracker.line() == "study: 13 of 40 trials finished (32%), 0 running; about 9m 00s left at 3 trials/min"
    assert tracker.line() is None  # 5 s later: not due yet
    assert tracker.line() == "study: 14 of 40 trials finished (35%), 0 running; about 32m 30s left at 0.8 trials/min"


def test_fleet_workers_get_the_artifact_folder_and_print_no_statistics():
    command = worker_command("s", n_trials=None, timeout=None, data_dir=None, artifacts="/shared/art")
    assert command[:3] == [sys.executable, "-m", "hpo.cli"] and "--no-summary" in command
    assert command[command.index("--artifacts") + 1] == "/shared/art" and "--allow-version-mismatch" not in command
    allowed = worker_command("s", n_trials=None, timeout=None, data_dir=None, allow_version_mismatch=True)
    assert allowed[-1] == "--allow-version-mismatch"


@pytest.mark.slow
def test_worker_output_says_what_happens_through_a_stop_and_a_resumed_retry(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, HPO_ARTIFACTS=str(tmp_path / "artifacts"), **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 1, LONG_EPOCHS), store_url)
    first = start_worker(env, "regression", tmp_path / "first.log")
    try:
        wait_for(lambda: running_with_reports(store_url), timeout=240)
    except AssertionError:
        first.kill()
        raise AssertionError((tmp_path / "first.log").read_text()) from None
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()
    lines = (tmp_path / "first.log").read_text().splitlines()
    assert re.fullmatch(r"  loading regression_train\.csv \([\d,]+ rows\) \.\.\.", lines[1]), lines
    assert re.fullmatch(r"  \d+ training and \d+ validation samples, \d+ test on cpu in [\d.]+s", lines[2]), lines
    assert "hpo: got SIGTERM: stopping after the current epoch (again to exit now)" in lines  # a line of its own
    assert "interrupted: the running trial is re-queued" in lines

    second = start_worker(env, "regression", tmp_path / "second.log")
    assert second.wait(timeout=180) == 0
    text = (tmp_path / "second.log").read_text()
    lines = text.splitlines()
    retry = next(i for i, line in enumerate(lines) if line.startswith("trial 1: "))
    assert re.fullmatch(r"trial 1: retry of #0, resumed from epoch [1-9]\d*", lines[retry]), lines
    assert re.match(r"trial +1  COMPLETE +val_mse=", lines[retry + 1]), lines
    assert re.fullmatch(r" +params: (\w+=\S+, )*lr=[\d.e-]+(, \w+=\S+)*", lines[retry + 2]), lines
    assert lines[retry + 3] == "study: 1 of 1 trials finished (100%), 0 running"
    assert text.count("Study statistics: regression") == 1


@pytest.mark.slow
def test_a_fleet_of_two_prints_the_statistics_once(tmp_path, store_url):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(fast_spec(tmp_path, 4, checkpoint={"every_seconds": 0}), store_url)  # a checkpoint every epoch
    artifacts = tmp_path / "shared-artifacts"
    proc = subprocess.run([*HPO, "fleet", "--study", "regression", "--workers", "2", "--artifacts", str(artifacts)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("Study statistics: regression") == 1, out
    assert out.index("fleet: all workers stopped") < out.index("Study statistics")  # the fleet's, at the end
    for w in ("[w0]", "[w1]"):
        assert f"{w}   loading regression_train.csv" in out, out
    assert len(re.findall(r"\] +params: ", out)) == 4  # one line per trial, whichever worker ran it
    assert re.search(r"\[w\d\] study: \d of 4 trials finished \(\d+%\), \d running", out), out
    assert (artifacts / "checkpoints").is_dir()  # the workers checkpointed into the fleet's --artifacts
