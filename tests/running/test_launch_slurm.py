"""`hpo launch slurm`: the job script, the refusals, and job arrays on a real one-node SLURM cluster.

The cluster is the one `.ci/slurm-up.sh` starts (2 CPUs, no GPU). Where `sbatch`/`sinfo` are missing
or the cluster does not answer, the tests that need it skip and say why.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import optuna
import pytest
from conftest import REPO, run_hpo
from optuna.trial import TrialState
from test_faults import LONG_EPOCHS, slow_spec, wait_for
from test_parallel import budget_trials, create, fast_spec

from hpo.cli import main
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage

PASSWORD = "pw-Sl4rm-secret"  # PostgreSQL here trusts local clients, so any password connects
ARRAY_TIMEOUT = 240  # seconds an array of a few short trials may take on a busy 2-core machine


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@")


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    missing = [t for t in ("sbatch", "sinfo", "squeue", "scancel", "scontrol") if shutil.which(t) is None]
    if missing:
        return f"SLURM client tools not on PATH ({', '.join(missing)}); .ci/slurm-up.sh starts a test cluster"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not {"idle", "mix", "alloc"} & set(states):
        return f"no SLURM node up (sinfo: {(proc.stderr or proc.stdout).strip()[:200] or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def env_for(url: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HPO_STORAGE=url, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def squeue(job: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %t"], capture_output=True, text=True, timeout=30)
    return proc.stdout.split("\n") if proc.returncode == 0 and proc.stdout.strip() else []


def launch(tmp_path: Path, url: str, workers: int, **extra: str) -> tuple[str, str]:
    """Submit the array through the CLI; returns (job id, stdout)."""
    proc = run_hpo("launch", "slurm", "--study", "regression", "--workers", str(workers), "--device", "cpu",
                   "--jobs-dir", str(tmp_path / "jobs"), env=env_for(url, **extra), timeout=120, check=0)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job, proc.stdout + proc.stderr


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url, heartbeat=False)
    try:
        return optuna.load_study(study_name="regression", storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def check_budget(url: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    trials = trials_of(url)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len(budget_trials(url, "regression")) == n_trials
    return trials


def logs(tmp_path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((tmp_path / "jobs").glob("*.out"))}


@pytest.fixture
def cancel_after():
    jobs: list[str] = []
    yield jobs.append
    for job in jobs:  # a failed test leaves no task running
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


# --- the script and the refusals (no cluster needed) -----------------------------------------------

def parse_hpo(args: list[str]) -> tuple[str, dict]:
    """(subcommand, its parsed parameters) of ``hpo ARGS``, by hpo's own click parser."""
    name, *rest = args
    command = main.get_command(click.Context(main), name)
    return name, command.make_context(name, rest).params


def exec_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    return shlex.split(line)[1:]


def test_dry_run_script(tmp_path, pg_url):
    create(fast_spec(tmp_path, 4), pg_url)
    url = with_password(pg_url)
    proc = run_hpo("launch", "slurm", "--study", "regression", "--workers", "3", "--device", "cpu",
                   "--time", "02:00:00", "--grace", "90", "--sbatch-arg=--mem=1G", "--dry-run",
                   "--jobs-dir", str(tmp_path / "jobs"), env=env_for(url), check=0)
    script = proc.stdout
    assert script.startswith("#!/bin/bash\n")
    assert subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0
    sbatch = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert "--array=0-2" in sbatch and "--signal=B:TERM@90" in sbatch and "--requeue" in sbatch
    assert "--time=02:00:00" in sbatch and "--mem=1G" in sbatch and "--export=ALL,HPO_STORAGE" in sbatch
    assert not any(s.startswith("--gres") for s in sbatch)
    # The task runs this interpreter's hpo: a valid `hpo worker` invocation.
    argv = exec_argv(script)
    assert argv[:3] == [sys.executable, "-m", "hpo.cli"]
    name, params = parse_hpo(argv[3:])
    assert name == "worker" and params["study_name"] == "regression" and params["device"] == "cpu"
    assert "--storage" not in argv and params["allow_version_mismatch"] is False
    # No password, nor the URL, anywhere; nothing written, nothing submitted.
    everything = proc.stdout + proc.stderr
    assert PASSWORD not in everything and "postgres:***@" in proc.stderr
    assert "127.0.0.1" not in script and pg_url.rsplit("/", 1)[1] not in script
    assert not (tmp_path / "jobs").exists()


def test_gpu_tasks_share_a_gpu_through_fleet(tmp_path, pg_url):
    create(fast_spec(tmp_path, 4), pg_url)
    proc = run_hpo("launch", "slurm", "--study", "regression", "--workers", "8", "--gpus-per-worker", "1",
                   "--workers-per-gpu", "4", "--dry-run", "--artifacts", "shared/artifacts",
                   "--allow-version-mismatch", env=env_for(pg_url),
                   check=0, cwd=tmp_path)
    sbatch = [line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith("#SBATCH ")]
    assert "--array=0-1" in sbatch and "--gres=gpu:1" in sbatch and "--cpus-per-task=4" in sbatch
    name, params = parse_hpo(exec_argv(proc.stdout)[3:])
    assert name == "fleet" and params["device"] == "cuda" and params["workers"] == 4
    assert params["allow_version_mismatch"] is True  # and the fleet passes it to its workers (test_worker_output)
    # The fleet's workers checkpoint where the submitter said, whatever folder the task starts in.
    assert params["artifacts"] == str(tmp_path / "shared" / "artifacts")


def test_the_url_reaches_sbatch_through_its_environment_only(tmp_path, pg_url):
    # A stand-in sbatch that records what it was given (the real one is used in the tests below).
    create(fast_spec(tmp_path, 4), pg_url)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n'
                                    f'printf %s "$HPO_STORAGE" > {tmp_path}/url\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = env_for("")
    del env["HPO_STORAGE"]
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    url = with_password(pg_url)
    proc = run_hpo("launch", "slurm", "--study", "regression", "--workers", "2", "--storage", url,
                   "--jobs-dir", str(tmp_path / "jobs"), env=env, check=0)
    assert (tmp_path / "url").read_text() == url
    (script,) = (tmp_path / "jobs").glob("*.sbatch")
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(script)]
    assert "submitted job 4242" in proc.stdout and "scancel 4242" in proc.stdout
    assert PASSWORD not in proc.stdout + proc.stderr + script.read_text()


@pytest.mark.parametrize("args, env_extra, message", [
    (["--workers", "0"], {}, "--workers 0: need at least 1 worker"),
    (["--workers", "2", "--storage", "sqlite:///storage/x.db"], {}, "cannot share a local SQLite file"),
    (["--workers", "2", "--gpus-per-worker", "2"], {}, "--gpus-per-worker 2"),
    (["--workers", "3", "--gpus-per-worker", "1", "--workers-per-gpu", "2"], {}, "not a multiple"),
    (["--workers", "2", "--storage", "postgresql://nobody@127.0.0.1:1/none"], {"PATH": "/nonexistent"},
     "sbatch is not on PATH"),
])
def test_refusals(tmp_path, args, env_extra, message):
    env = env_for(f"sqlite:///{tmp_path / 'hpo.db'}")
    env.update(env_extra)
    proc = run_hpo("launch", "slurm", "--study", "regression", *args, "--jobs-dir", str(tmp_path / "jobs"),
                   env=env, check=2)
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "hpo.db").exists()


def test_unknown_study_is_refused(tmp_path, pg_url):
    url = with_password(pg_url)
    proc = run_hpo("launch", "slurm", "--study", "nope", "--workers", "2", "--dry-run", env=env_for(url), check=2)
    assert proc.stderr.count("\n") == 1 and "no study named 'nope'" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


# --- real arrays ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(ARRAY_TIMEOUT + 120)
def test_array_runs_exactly_the_budget(tmp_path, pg_url, slurm, cancel_after):
    n_trials = 12
    create(fast_spec(tmp_path, n_trials), pg_url)
    url = with_password(pg_url)
    start, t0 = time.monotonic(), dt.datetime.now()
    job, out = launch(tmp_path, url, workers=2)
    cancel_after(job)
    assert f"squeue -j {job}" in out and f"scancel {job}" in out and PASSWORD not in out
    wait_for(lambda: not squeue(job), ARRAY_TIMEOUT, f"array {job} to finish")
    wall = time.monotonic() - start
    trials = check_budget(pg_url, n_trials)
    texts = logs(tmp_path)
    assert len(texts) == 2, texts
    for name, text in texts.items():
        assert f"used its budget of {n_trials} trials" in text and "Traceback" not in text, (name, text)
        assert PASSWORD not in text
    script = next((tmp_path / "jobs").glob("*.sbatch")).read_text()
    assert PASSWORD not in script and "HPO_STORAGE" in script
    first = min(t.datetime_start for t in trials) - t0
    workers = {t.user_attrs.get("worker") for t in trials}
    print(f"\nslurm array {job}: 2 tasks, {len(trials)} trials for a budget of {n_trials}, "
          f"{len(workers)} workers, wall {wall:.1f} s, first trial {first.total_seconds():.1f} s after hpo launch")


def task_id(job: str, index: int) -> tuple[str, str]:
    """(SLURM's own job id of array task ``job_index``, its state)."""
    text = subprocess.run(["scontrol", "show", "job", f"{job}_{index}"], capture_output=True, text=True,
                          timeout=30).stdout
    return re.search(r"JobId=(\d+)", text).group(1), re.search(r"JobState=(\w+)", text).group(1)


def worker_pid(job: str, index: int) -> int | None:
    """The pid of task ``index``'s worker: its batch step, which the script replaced with the worker."""
    raw, state = task_id(job, index)
    if state != "RUNNING":
        return None
    text = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in text.splitlines()[1:]]
    return next((int(r[0]) for r in rows if len(r) > 2 and r[2] == "batch"), None)


def running_trial_of(url: str, label: str) -> optuna.trial.FrozenTrial | None:
    """The RUNNING trial of worker ``label`` once it has reported at least two epochs."""
    for t in trials_of(url):
        if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == label and len(t.intermediate_values) >= 2:
            return t
    return None


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(ARRAY_TIMEOUT + 120)
@pytest.mark.parametrize("how", ["requeue", "scancel"])
def test_a_preempted_task_loses_nothing(tmp_path, pg_url, slurm, cancel_after, how):
    n_trials = 4
    # Trials of several seconds without pruning, so that a task is certainly caught in the middle of one.
    # A heartbeat a second writes a running trial's worker and epochs while we watch.
    create(slow_spec(tmp_path, n_trials, LONG_EPOCHS), pg_url, heartbeat=Heartbeat(interval=1, grace=5))
    job, _ = launch(tmp_path, pg_url, workers=2)
    cancel_after(job)
    pid = wait_for(lambda: worker_pid(job, 0), 120, "task 0 to run")
    victim = wait_for(lambda: running_trial_of(pg_url, f"{socket.gethostname()}:{pid}"), 120,
                      "task 0 to be in the middle of a trial")
    if how == "requeue":  # what preemption with PreemptMode=REQUEUE does: SIGTERM to the task, then run it again
        cmd = ["scontrol", "requeue", f"{job}_0"]
    else:  # a signal to the batch step, where the worker runs
        cmd = ["scancel", "--batch", "--signal=TERM", f"{job}_0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    wait_for(lambda: not squeue(job), ARRAY_TIMEOUT, f"array {job} to finish")

    trials = check_budget(pg_url, n_trials)
    interrupted = trials[victim.number]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs.get("fail_reason") == "interrupted"
    reruns = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(reruns) == 1 and reruns[0].state == TrialState.COMPLETE
    assert reruns[0].params == interrupted.params
    text = "".join(logs(tmp_path).values())
    assert "interrupted: the running trial is re-queued" in text and "Traceback" not in text
    if how == "requeue":
        assert "restart 1" in text  # the requeued task ran again
    states = ", ".join(f"#{t.number} {t.state.name}"
                       + (f" ({t.user_attrs['fail_reason']})" if "fail_reason" in t.user_attrs else "")
                       + (f" retry of #{t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
                       for t in trials)
    print(f"\nslurm {how} of task {job}_0 during trial #{victim.number} "
          f"(epoch {max(victim.intermediate_values)}): {states}; rerun by {reruns[0].user_attrs.get('worker')}")
