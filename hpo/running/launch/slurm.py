"""SLURM job arrays of hpo workers: the job script, its checks, and ``sbatch``.

One array task is one ``hpo worker`` (or an ``hpo fleet`` of K workers sharing the task's GPU).
The worker is the batch shell itself (``exec``), so the signals SLURM sends before the time limit
(``--signal=B:TERM@S``), on ``scancel`` and on preemption reach it directly: it ends its running
trial after the current epoch as FAIL "interrupted", re-queues it and exits 0; ``--requeue`` lets a
preempted task run again. The store URL is never written into the script: ``--export=ALL,HPO_STORAGE``
hands the submitting environment to the tasks.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpo.errors import HpoError
from hpo.running.launch import GRACE, check_gpus, check_workers, dns_name
from hpo.store.config import STORAGE_ROOT

JOBS_DIR = STORAGE_ROOT / "jobs"
SBATCH_TIMEOUT = 60  # seconds sbatch may take to answer
_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # SLURM's [D-]HH[:MM[:SS]] and MM forms


@dataclass(frozen=True)
class SlurmPlan:
    """A job array: ``tasks`` tasks of ``workers_per_task`` workers, each task with ``gpus`` GPUs."""

    study: str
    tasks: int
    workers_per_task: int
    gpus: int
    device: str
    python: str
    grace: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch_args: tuple[str, ...] = ()
    artifacts: str | None = None  # absolute; the tasks' --artifacts
    allow_version_mismatch: bool = False  # the tasks' --allow-version-mismatch

    @property
    def workers(self) -> int:
        return self.tasks * self.workers_per_task


def plan(*, study: str, workers: int, gpus_per_worker: int | None = None, device: str | None = None,
         workers_per_gpu: int = 1, partition: str | None = None, time: str | None = None,
         account: str | None = None, sbatch_args: tuple[str, ...] = (), grace: int = GRACE,
         python: str | None = None, artifacts: str | None = None, allow_version_mismatch: bool = False) -> SlurmPlan:
    """Check the options and lay the workers out as array tasks.

    ``workers`` counts workers: with ``workers_per_gpu`` K there are ``workers / K`` tasks, each one
    GPU running ``hpo fleet`` of K workers. ``python`` (default: this interpreter) runs
    ``-m hpo.cli`` in the tasks, so they run the same hpo as the command that submits them.
    ``artifacts`` (made absolute here: a task may start elsewhere) is the tasks' artifact folder,
    where they checkpoint running trials; it should be on a filesystem every node shares.

    Raises:
        HpoError: on fewer than 1 worker, a worker count that is not a multiple of K, K workers on
            the CPU, more than 1 GPU per worker, a malformed ``time``, a negative ``grace`` or an
            ``sbatch_args`` entry that is not one option.
    """
    check_workers(workers)
    gpus, dev = check_gpus(gpus_per_worker, device)
    if workers_per_gpu < 1:
        raise HpoError(f"--workers-per-gpu {workers_per_gpu}: need at least 1")
    if workers_per_gpu > 1 and not gpus:
        raise HpoError(f"--workers-per-gpu {workers_per_gpu} needs --gpus-per-worker 1; "
                       f"on the CPU each task is one worker (ask for more with --workers)")
    if workers % workers_per_gpu:
        raise HpoError(f"--workers {workers} is not a multiple of --workers-per-gpu {workers_per_gpu}")
    if time is not None and not _TIME.match(time):
        raise HpoError(f"--time {time!r}: use SLURM's HH:MM:SS or D-HH:MM:SS")
    if grace < 0:
        raise HpoError(f"--grace {grace}: seconds before the time limit, at least 0")
    for arg in sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise HpoError(f"--sbatch-arg {arg!r}: give one sbatch option per --sbatch-arg, e.g. --sbatch-arg=--mem=8G")
    return SlurmPlan(study=study, tasks=workers // workers_per_gpu, workers_per_task=workers_per_gpu, gpus=gpus,
                     device=dev, python=python or sys.executable, grace=grace, partition=partition, time=time,
                     account=account, sbatch_args=tuple(sbatch_args),
                     artifacts=str(Path(artifacts).expanduser().resolve()) if artifacts else None,
                     allow_version_mismatch=allow_version_mismatch)


def task_command(p: SlurmPlan) -> list[str]:
    """The argv each array task runs: ``PYTHON -m hpo.cli worker ...`` (or ``fleet`` of K workers).

    The store comes from ``HPO_STORAGE`` in the task's environment. A GPU task's workers use
    ``cuda``, i.e. the GPU SLURM made visible to the task (``CUDA_VISIBLE_DEVICES``).
    """
    hpo = [p.python, "-m", "hpo.cli"]
    artifacts = ["--artifacts", p.artifacts] if p.artifacts else []
    artifacts += ["--allow-version-mismatch"] if p.allow_version_mismatch else []
    if p.workers_per_task == 1:
        return [*hpo, "worker", "--study", p.study, "--device", p.device, *artifacts]
    return [*hpo, "fleet", "--study", p.study, "--device", p.device, "--workers", str(p.workers_per_task), *artifacts]


def job_name(p: SlurmPlan) -> str:
    return f"hpo-{dns_name(p.study, limit=50)}"


def job_script(p: SlurmPlan, *, log_dir: Path) -> str:
    """The sbatch script of the array (text). ``log_dir``: where the tasks' ``%A_%a.out`` logs go."""
    options = [f"--job-name={job_name(p)}", f"--array=0-{p.tasks - 1}", f"--cpus-per-task={p.workers_per_task}"]
    if p.gpus:
        options.append(f"--gres=gpu:{p.gpus}")
    options += [f"--{flag}={value}" for flag, value in
                (("partition", p.partition), ("time", p.time), ("account", p.account)) if value]
    options += ["--requeue", f"--signal=B:TERM@{p.grace}", "--export=ALL,HPO_STORAGE", "--open-mode=append",
                f"--output={log_dir.resolve() / (job_name(p) + '-%A_%a.out')}", *p.sbatch_args]
    what = f"{p.tasks} task{'s' * (p.tasks > 1)} x {p.workers_per_task} worker{'s' * (p.workers_per_task > 1)}"
    lines = [
        "#!/bin/bash",
        f"# hpo launch slurm: study {p.study!r}, {what} on {p.device}.",
        "# The store URL comes from the environment (HPO_STORAGE, exported by sbatch), never from this file.",
        f"# SIGTERM (scancel, preemption, or {p.grace} s before --time): the running trial ends after its epoch,",
        "# is marked FAIL 'interrupted' and re-queued for another task; --requeue runs a preempted task again.",
        *(f"#SBATCH {shlex.quote(o)}" for o in options),
        "set -eu",
        'if [ -z "${HPO_STORAGE:-}" ]; then',
        '  echo "hpo: HPO_STORAGE is not set in this task; submit with sbatch --export=ALL,HPO_STORAGE" >&2',
        "  exit 2",
        "fi",
        'echo "hpo: task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname),'
        ' restart ${SLURM_RESTART_COUNT:-0}"',
        "export PYTHONUNBUFFERED=1",
        "# exec: the worker is the batch shell, so SLURM's signals reach it and nothing else.",
        f"exec {shlex.join(task_command(p))}",
        "",
    ]
    return "\n".join(lines)


def check_shared(url: str, *, allow_sqlite: bool) -> None:
    """Check that tasks on other nodes can use the store ``url``.

    Raises:
        HpoError: for a SQLite store without ``allow_sqlite``.
    """
    from hpo.store.config import mask_url, sqlite_path
    if sqlite_path(url) is not None and not allow_sqlite:
        raise HpoError(f"--storage {mask_url(url)}: tasks on other nodes cannot share a local SQLite file; "
                       f"use PostgreSQL or MySQL, or --allow-sqlite if the file is on a shared filesystem")


def study_budget(url: str, study: str) -> int:
    """The budget (trials) of ``study`` in the store ``url``.

    Raises:
        StoreError: when the store cannot be opened or has no study ``study``.
    """
    from hpo.search.study import open_study
    from hpo.store.storage import open_storage

    storage = open_storage(url, heartbeat=False)
    try:
        _, spec = open_study(study, storage)
    finally:
        storage.engine.dispose()
    return spec.budget.n_trials


def sbatch_path() -> str:
    """The ``sbatch`` executable.

    Raises:
        HpoError: when there is no ``sbatch`` on PATH.
    """
    path = shutil.which("sbatch")
    if path is None:
        raise HpoError("sbatch is not on PATH: run hpo launch slurm on a SLURM login node "
                       "(or add --dry-run to see the job script)")
    return path


def write_script(text: str, p: SlurmPlan, *, jobs_dir: Path) -> Path:
    """Write the job script as ``jobs_dir/hpo-STUDY-YYYYmmdd-HHMMSS.sbatch`` and return its path."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = jobs_dir / f"{job_name(p)}-{stamp}.sbatch"
    path.write_text(text)
    return path


def submit(script: Path, *, url: str, sbatch: str) -> str:
    """Submit ``script`` with ``sbatch``, the store URL in its environment only; returns the job id.

    Raises:
        HpoError: when sbatch refuses the job (its last line, passwords masked) or does not answer.
    """
    from hpo.store.config import mask_url
    env = dict(os.environ, HPO_STORAGE=url)
    try:
        proc = subprocess.run([sbatch, "--parsable", str(script)], env=env, capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise HpoError(f"sbatch did not answer within {SBATCH_TIMEOUT} s (is slurmctld up? try sinfo)") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise HpoError(f"sbatch refused the job script {script}: {mask_url(reason)}")
    return proc.stdout.strip().split(";")[0]



@dataclass(frozen=True)
class Submission:
    """What :func:`launch` submitted (or, on a dry run, would submit)."""

    what: str  # one line: workers, study, budget, tasks, device, store (password masked)
    script: str  # the job script's text
    path: Path | None = None  # where the script was written (None: dry run)
    job: str | None = None  # SLURM's job id (None: dry run)
    logs: str | None = None  # the tasks' log files, ``<task>`` standing for the array index


def launch(p: SlurmPlan, *, storage_url: str | None, jobs_dir: Path | None = None, allow_sqlite: bool = False,
           dry_run: bool = False) -> Submission:
    """Check the store and the study, write the job script and submit it with ``sbatch`` (a dry run
    writes and submits nothing).

    Raises:
        HpoError: a store the nodes may not share (SQLite without ``allow_sqlite``), no such study,
            no ``sbatch`` on PATH, or sbatch refusing the job.
    """
    from hpo.store.config import mask_url, resolve_url
    url = resolve_url(storage_url)
    check_shared(url, allow_sqlite=allow_sqlite)
    sbatch = None if dry_run else sbatch_path()
    budget = study_budget(url, p.study)
    jobs_dir = jobs_dir or JOBS_DIR
    script = job_script(p, log_dir=jobs_dir)
    what = (f"{p.workers} workers of study {p.study!r} (budget {budget} trials) as {p.tasks} array tasks "
            f"on {p.device}, store {mask_url(url)}")
    if dry_run:
        return Submission(what=what, script=script)
    path = write_script(script, p, jobs_dir=jobs_dir)
    job = submit(path, url=url, sbatch=sbatch)
    return Submission(what=what, script=script, path=path, job=job,
                      logs=f"{(jobs_dir / job_name(p)).resolve()}-{job}_<task>.out")
