"""The fleet (hpo/running/fleet.py) and its CUDA MPS control (hpo/running/mps.py), on the CPU: a stand-in
``nvidia-cuda-mps-control`` on PATH records every call, and stand-in workers record what they got."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import HPO, REPO, run_hpo
from test_faults import (
    FAST_HEARTBEAT,
    LONG_EPOCHS,
    create,
    running_with_reports,
    slow_spec,
    trials_of,
    wait_for,
)
from test_parallel import budget_trials, fast_spec

from hpo.running.devices import GPU_SHARING_ENV, gpu_sharing
from hpo.running.fleet import (
    Member,
    plan,
    run_fleet,
    shares_gpu,
    sharing_modes,
    worker_env,
)
from hpo.running.mps import LOG_ENV, PIPE_ENV, MpsDaemon

# Answers as NVIDIA's tool does: -d starts a daemon that makes the control pipe; a command finds
# the daemon by that pipe or says "Cannot find MPS control daemon process" and exits 1.
FAKE_CONTROL = r"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "-d pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY visible=${CUDA_VISIBLE_DEVICES-unset}" >> "$FAKE_MPS_LOG"
  if [ -n "$FAKE_MPS_FAIL" ]; then echo "$FAKE_MPS_FAIL" >&2; exit 1; fi
  echo alive > "$CUDA_MPS_PIPE_DIRECTORY/control"
  exit 0
fi
read -r command
echo "$command pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"
grep -q alive "$CUDA_MPS_PIPE_DIRECTORY/control" 2>/dev/null || { echo "Cannot find MPS control daemon process"; exit 1; }
if [ "$command" = quit ]; then rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
exit 0
"""

# A stand-in worker: records its environment, then exits 0, crashes (SIGKILL) on its first run,
# or sleeps until SIGTERM, as FAKE_WORKER says.
FAKE_WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path
out = Path(os.environ["FAKE_WORKER_DIR"])
index = sys.argv[sys.argv.index("--worker-index") + 1]
run = len(list(out.glob(f"w{index}-*.json")))
keys = ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "HPO_GPU_SHARING")
record = {k: os.environ.get(k) for k in keys}
record["device"] = sys.argv[sys.argv.index("--device") + 1]
(out / f"w{index}-{run}.json").write_text(json.dumps(record))
mode = os.environ.get("FAKE_WORKER", "done")
if mode == "crash-once" and run == 0 or mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
if mode.startswith("exit-once-"):  # e.g. exit-once-75: a worker that lost the store, the first time
    sys.exit(int(mode.rsplit("-", 1)[1]) if run == 0 else 0)
if mode == "sleep":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(60)
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch) -> Path:
    """A recording ``nvidia-cuda-mps-control`` first on PATH; returns its call log (one line per call).
    ``CUDA_MPS_PIPE_DIRECTORY`` points at an empty folder, so no daemon of this machine is seen."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(FAKE_CONTROL)
    control.chmod(control.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    log = tmp_path / "mps.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.setenv(PIPE_ENV, str(tmp_path / "no-daemon"))
    monkeypatch.delenv("FAKE_MPS_FAIL", raising=False)
    return log


def calls(log: Path) -> list[str]:
    return [line.split(" pipe=")[0] for line in log.read_text().splitlines()]


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str, err: bool = False) -> None:
        self.lines.append(text)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def daemon(gpus, lines: Lines) -> MpsDaemon:
    return MpsDaemon(gpus=gpus, say=lines, warn=lambda text: lines(f"warning: {text}"))


# ---------------------------------------------------------------- the MPS controller


def test_mps_started_once_for_its_gpus_and_stopped_only_by_its_starter(fake_mps):
    lines = Lines()
    mps = daemon(["2", "3", "3"], lines)
    assert mps.start() and mps.active and mps.started
    (start,) = fake_mps.read_text().splitlines()
    pipe, log = mps.folder / "pipe", mps.folder / "log"
    assert start == f"-d pipe={pipe} log={log} visible=2,3"
    # A client names its GPU by its position among the daemon's (NVIDIA: the server remaps devices).
    assert mps.client_env("3") == {PIPE_ENV: str(pipe), LOG_ENV: str(log), "CUDA_VISIBLE_DEVICES": "1"}
    assert mps.client_env("2")["CUDA_VISIBLE_DEVICES"] == "0"
    mps.stop()
    mps.stop()
    assert calls(fake_mps) == ["-d", "quit"] and not pipe.exists()
    assert "started the control daemon for GPUs 2,3" in str(lines) and "control daemon stopped" in str(lines)


def test_mps_for_unpinned_workers_leaves_their_devices_to_the_daemon(fake_mps, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    mps = daemon(None, Lines())
    assert mps.start()
    assert fake_mps.read_text().split(" visible=")[1].strip() == "5"
    assert mps.client_env(None)["CUDA_VISIBLE_DEVICES"] is None  # the client sees the daemon's devices
    mps.stop()


def test_mps_not_started_when_a_daemon_of_this_user_runs(fake_mps, tmp_path, monkeypatch):
    running = tmp_path / "running"
    running.mkdir()
    (running / "control").write_text("alive")
    monkeypatch.setenv(PIPE_ENV, str(running))
    lines = Lines()
    mps = daemon(["0"], lines)
    assert mps.start() and mps.active and not mps.started
    assert mps.client_env("0") == {}  # the workers inherit the running daemon's pipe folder
    mps.stop()
    assert calls(fake_mps) == ["get_server_list"] and (running / "control").exists()
    assert "already running" in str(lines)


def test_mps_started_when_only_a_stale_control_pipe_is_left(fake_mps, tmp_path, monkeypatch):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "control").write_text("")
    monkeypatch.setenv(PIPE_ENV, str(stale))
    mps = daemon(["0"], Lines())
    assert mps.start() and mps.started
    mps.stop()
    assert calls(fake_mps) == ["get_server_list", "-d", "quit"]


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_mps_daemon_of_another_user_gives_one_warning_and_keeps_the_workers_off_it(fake_mps, tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "control").write_text("alive")
    os.chown(theirs / "control", 65534, 65534)
    monkeypatch.setenv(PIPE_ENV, str(theirs))
    lines = Lines()
    mps = daemon(["0"], lines)
    assert not mps.start() and not mps.active
    assert [line for line in lines.lines if line.startswith("warning:")] == [
        f"warning: MPS: a control daemon of another user (uid 65534) runs at {theirs}; the workers time-slice the GPU"]
    own_empty = mps.client_env("0")[PIPE_ENV]
    assert own_empty != str(theirs) and not os.listdir(own_empty)
    mps.stop()
    assert calls(fake_mps) == ["get_server_list"] and not Path(own_empty).exists()


def test_mps_failing_start_warns_once_and_cleans_up(fake_mps, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "nvidia-cuda-mps-control: Operation not permitted")
    lines = Lines()
    mps = daemon(["0"], lines)
    assert not mps.start() and not mps.active
    assert lines.lines == ["warning: MPS: could not start the control daemon (nvidia-cuda-mps-control: "
                           "Operation not permitted); the workers time-slice the GPU"]
    assert mps.client_env("0") == {} and mps.folder is None
    mps.stop()
    assert calls(fake_mps) == ["-d"]


def test_mps_binary_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    lines = Lines()
    assert not daemon(["0"], lines).start()
    assert lines.lines == ["warning: MPS: nvidia-cuda-mps-control not found on PATH; the workers time-slice the GPU"]


# ---------------------------------------------------------------- plan, sharing, environment


def test_plan_and_sharing_modes():
    one_each = plan(gpus="0,1", per_gpu=1, device=None, workers=None)
    assert [(m.gpu, m.device) for m in one_each] == [("0", "cuda"), ("1", "cuda")]
    assert not shares_gpu(one_each) and sharing_modes(one_each, mps=True) == ["exclusive", "exclusive"]
    two_each = plan(gpus="0,1", per_gpu=2, device=None, workers=None)
    assert shares_gpu(two_each)
    assert sharing_modes(two_each, mps=True) == ["mps"] * 4
    assert sharing_modes(two_each, mps=False) == ["time-slice"] * 4
    one_gpu = plan(gpus=None, per_gpu=1, device="cuda", workers=3)  # all on the visible GPU
    assert shares_gpu(one_gpu) and sharing_modes(one_gpu, mps=False) == ["time-slice"] * 3
    cpu = plan(gpus=None, per_gpu=1, device=None, workers=2)
    assert not shares_gpu(cpu) and sharing_modes(cpu, mps=True) == [None, None]


def test_worker_env_says_how_the_gpu_is_shared(monkeypatch):
    monkeypatch.setenv(GPU_SHARING_ENV, "stale")
    mps_env = {PIPE_ENV: "/p", "CUDA_VISIBLE_DEVICES": "0"}
    gpu = worker_env(Member(0, "cuda", "3"), sharing="mps", mps_env=mps_env)
    assert (gpu[GPU_SHARING_ENV], gpu[PIPE_ENV], gpu["CUDA_VISIBLE_DEVICES"]) == ("mps", "/p", "0")
    cpu = worker_env(Member(1, "cpu"), sharing=None, mps_env=mps_env)
    assert GPU_SHARING_ENV not in cpu and cpu.get(PIPE_ENV) != "/p"


def test_gpu_sharing_is_recorded_for_gpu_workers_only(monkeypatch):
    monkeypatch.setenv(GPU_SHARING_ENV, "mps")
    assert gpu_sharing(torch.device("cuda", 0)) == "mps" and gpu_sharing(torch.device("cpu")) is None
    monkeypatch.setenv(GPU_SHARING_ENV, "bogus")
    assert gpu_sharing(torch.device("cuda", 0)) is None


# ---------------------------------------------------------------- the supervisor, with stand-in workers


@pytest.fixture
def fake_workers(tmp_path, monkeypatch) -> tuple[list[str], Path]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    out = tmp_path / "workers"
    out.mkdir()
    monkeypatch.setenv("FAKE_WORKER_DIR", str(out))
    return [sys.executable, str(script)], out


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def test_fleet_starts_mps_once_for_k_workers_per_gpu_and_its_workers_inherit_it(fake_mps, fake_workers):
    command, out = fake_workers
    lines = Lines()
    result = run_fleet(plan(gpus="0,1", per_gpu=2, device=None, workers=None), command, mps=None, max_restarts=0,
                       echo=lines)
    assert result.codes == [0] * 4 and not result.failed and result.sharing == ["mps"] * 4
    assert calls(fake_mps) == ["-d", "quit"], lines
    pipe = fake_mps.read_text().split("-d pipe=")[1].split(" ")[0]
    seen = records(out)
    assert [(r["CUDA_VISIBLE_DEVICES"], r["HPO_GPU_SHARING"], r["CUDA_MPS_PIPE_DIRECTORY"]) for r in seen.values()] == [
        ("0", "mps", pipe), ("0", "mps", pipe), ("1", "mps", pipe), ("1", "mps", pipe)]
    assert not Path(pipe).exists()  # the fleet's own folder goes with its daemon
    assert "w0 gpu0 cuda (mps)" in str(lines)


@pytest.mark.parametrize("per_gpu, mps", [(1, None), (2, False)])
def test_fleet_never_starts_mps_for_one_worker_per_gpu_or_no_mps(fake_mps, fake_workers, per_gpu, mps):
    command, out = fake_workers
    result = run_fleet(plan(gpus="0", per_gpu=per_gpu, device=None, workers=None), command, mps=mps,
                       max_restarts=0, echo=Lines())
    assert calls(fake_mps) == []
    assert result.sharing == (["exclusive"] if per_gpu == 1 else ["time-slice"] * 2)
    assert {r["HPO_GPU_SHARING"] for r in records(out).values()} == set(result.sharing)
    assert all(r["CUDA_MPS_PIPE_DIRECTORY"] == os.environ[PIPE_ENV] for r in records(out).values())


def test_fleet_goes_on_without_mps_when_it_cannot_start(fake_mps, fake_workers, monkeypatch):
    command, out = fake_workers
    monkeypatch.setenv("FAKE_MPS_FAIL", "nvidia-cuda-mps-control: permission denied")
    lines = Lines()
    result = run_fleet(plan(gpus="0", per_gpu=2, device=None, workers=None), command, mps=None, max_restarts=0,
                       echo=lines)
    assert result.codes == [0, 0] and result.sharing == ["time-slice"] * 2
    assert sum("warning" in line for line in lines.lines) == 1 and calls(fake_mps) == ["-d"]


def test_fleet_restarts_its_only_worker_after_a_crash_and_stops_mps_at_the_end(fake_mps, fake_workers, monkeypatch):
    command, out = fake_workers
    monkeypatch.setenv("FAKE_WORKER", "crash-once")
    lines = Lines()
    result = run_fleet([Member(0, "cpu")], command, mps=True, max_restarts=3, echo=lines)
    assert result.codes == [0] and result.restarts == [1] and not result.failed
    assert list(records(out)) == ["w0-0", "w0-1"]
    assert "fleet: w0 exited with SIGKILL; restarted" in str(lines)
    assert calls(fake_mps) == ["-d", "quit"]


@pytest.mark.parametrize("code, restarted", [(75, True), (2, False), (74, False)])
def test_fleet_restarts_a_worker_that_lost_the_store_but_not_one_with_bad_input(fake_workers, monkeypatch,
                                                                                code, restarted):
    """75: the store stayed unreachable past HPO_STORE_RETRY (it may be back); 2: bad input; 74: a
    full store. Only the first is worth a restart."""
    command, out = fake_workers
    monkeypatch.setenv("FAKE_WORKER", f"exit-once-{code}")
    result = run_fleet([Member(0, "cpu")], command, mps=False, max_restarts=3, echo=Lines())
    assert result.restarts == [int(restarted)] and result.codes == [0 if restarted else code]
    assert len(records(out)) == 1 + restarted


def test_fleet_gives_up_after_max_restarts(fake_workers, monkeypatch):
    command, out = fake_workers
    monkeypatch.setenv("FAKE_WORKER", "crash")
    result = run_fleet([Member(0, "cpu"), Member(1, "cpu")], command, mps=False, max_restarts=2, echo=Lines())
    assert result.codes == [-signal.SIGKILL] * 2 and result.restarts == [2, 2] and result.failed
    assert len(records(out)) == 6


def test_fleet_stops_its_workers_and_mps_on_sigint(fake_mps, fake_workers, monkeypatch):
    command, out = fake_workers
    monkeypatch.setenv("FAKE_WORKER", "sleep")

    def interrupt_when_both_run():
        deadline = time.monotonic() + 30
        while len(records(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the workers' SIGTERM handlers are set right after they record
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_both_run, daemon=True).start()
    started = time.monotonic()
    result = run_fleet(plan(gpus=None, per_gpu=1, device="cuda", workers=2), command, mps=None, max_restarts=3,
                       echo=Lines())
    assert time.monotonic() - started < 30
    assert result.signalled and result.codes == [0, 0] and result.restarts == [0, 0] and not result.failed
    assert calls(fake_mps) == ["-d", "quit"]


# ---------------------------------------------------------------- status and report


def test_status_and_report_count_trials_by_gpu_sharing(tmp_path, store_url, cli_env):
    from hpo.report import html as report
    from hpo.search.study import open_study
    from hpo.store.statistics import summarize
    from hpo.store.storage import open_storage

    create(fast_spec(tmp_path, 5), store_url)
    study, spec = open_study("regression", open_storage(store_url, heartbeat=False))
    for i, mode in enumerate(["mps", "mps", "time-slice", None]):
        attrs = {"gpu_sharing": mode} if mode else {}
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=float(i), user_attrs=attrs))
    status = run_hpo("status", "--study", "regression", env=cli_env, check=0).stdout
    assert "GPU sharing (trials):      mps 2, time-slice 1" in status
    assert summarize(study).gpu_sharing == {"mps": 2, "time-slice": 1}  # also what status --json prints
    page = report.Page()
    report.statistics_section(page, summarize(study), spec, study.get_trials())
    html = "".join(page.sections[0].parts)
    assert "GPU sharing (trials)" in html and "mps 2, time-slice 1" in html


# ---------------------------------------------------------------- end to end, real workers


@pytest.mark.slow
def test_fleet_of_one_worker_restarts_it_after_kill_9_and_finishes_the_budget(tmp_path, store_url, fake_mps):
    env = dict(os.environ, HPO_STORAGE=store_url, **FAST_HEARTBEAT)
    create(slow_spec(tmp_path, 1, LONG_EPOCHS), store_url)  # one trial of several seconds, killed in the middle
    fleet = subprocess.Popen([*HPO, "fleet", "--study", "regression", "--workers", "1", "--mps"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = wait_for(lambda: running_with_reports(store_url))
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, _ = fleet.communicate(timeout=120)
    assert fleet.returncode == 0, out
    assert "fleet: w0 exited with SIGKILL; restarted (pid" in out
    assert "fleet: all workers stopped (all exit 0; restarted: w0 1x)" in out
    trials = {t.number: t for t in trials_of(store_url)}
    assert trials[victim.number].state == optuna.trial.TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == victim.number and t.state.is_finished()
               and t.state != optuna.trial.TrialState.FAIL for t in trials.values())
    assert len(budget_trials(store_url, "regression")) == 1
    assert calls(fake_mps) == ["-d", "quit"]
