"""``hpo fleet``: start several workers on one machine (pinned to GPUs, or on the CPU) and supervise them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import click

from hpo.commands.options import storage_option, study_option
from hpo.errors import HpoError


def _parse_gpus(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise HpoError(f"--gpus: {text!r} is not a list of GPU indices; use e.g. --gpus 0,1")
    return gpus


def plan(*, gpus: str | None, per_gpu: int, device: str | None, workers: int | None) -> list[tuple[str | None, str]]:
    """The fleet as (CUDA_VISIBLE_DEVICES or None, --device) per worker, in worker-index order.

    Raises:
        HpoError: on an unusable combination of options.
    """
    if gpus is not None:
        if device is not None and device != "cuda":
            raise HpoError(f"--device {device!r} cannot be combined with --gpus (the workers run on cuda)")
        if workers is not None:
            raise HpoError("give --per-gpu with --gpus, not --workers")
        # Each worker sees only its own GPU, so an out-of-memory on one GPU cannot spill onto another.
        return [(g, "cuda") for g in _parse_gpus(gpus) for _ in range(per_gpu)]
    return [(None, device or "cpu")] * (workers or 1)


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        click.echo(f"{prefix} {line.rstrip()}")


@click.command("fleet")
@study_option
@storage_option
@click.option("--gpus", default=None, metavar="LIST", help="GPU indices, e.g. 0,1; each worker is pinned to one.")
@click.option("--per-gpu", type=click.IntRange(min=1), default=1, show_default=True, help="Workers per GPU.")
@click.option("--device", default=None, metavar="DEV", help="Device of every worker without --gpus (default cpu).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Number of workers without --gpus.")
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="At most N trials per worker.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S", help="Stop starting trials after S seconds.")
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Restart a crashed worker at most this many times.")
def fleet(study_name: str, storage: str | None, gpus: str | None, per_gpu: int, device: str | None,
          workers: int | None, n_trials: int | None, timeout: float | None, data_dir: str | None,
          max_restarts: int) -> None:
    """Start several `hpo worker` processes on this machine and supervise them.

    Ctrl-C or SIGTERM stops them all cleanly (running trials are re-queued); a second one kills them.
    A worker that crashes is restarted (--max-restarts).
    """
    from hpo.store import open_storage
    from hpo.study import load

    members = plan(gpus=gpus, per_gpu=per_gpu, device=device, workers=workers)
    load(study_name, open_storage(storage, heartbeat=False))  # fail fast, once, on a bad store or name
    base = [sys.executable, "-m", "hpo.cli", "worker", "--study", study_name]
    for flag, value in (("--storage", storage), ("--n-trials", n_trials), ("--timeout", timeout),
                        ("--data-dir", data_dir)):
        if value is not None:
            base += [flag, str(value)]
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def spawn(index: int) -> subprocess.Popen:
        visible, dev = members[index]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        # Own session: a Ctrl-C on the terminal reaches the fleet only, which forwards one SIGTERM.
        proc = subprocess.Popen([*base, "--device", dev, "--worker-index", str(index)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        prefix = f"[w{index}{'' if visible is None else f' gpu{visible}'}]"
        pumps.append(threading.Thread(target=_pump, args=(proc, prefix), daemon=True))
        pumps[-1].start()
        return proc

    procs = [spawn(i) for i in range(len(members))]
    restarts = [0] * len(procs)
    click.echo(f"fleet: {len(procs)} workers on study {study_name!r} (pids {' '.join(str(p.pid) for p in procs)})")

    signals = []

    def forward(signum, frame):
        signals.append(signum)
        kind = signal.SIGTERM if len(signals) == 1 else signal.SIGKILL
        click.echo(f"fleet: {signal.Signals(signum).name}: sending {kind.name} to the workers", err=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(kind)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while [p.poll() for p in procs].count(None):  # poll every one: it sets returncode
            for i, p in enumerate(procs):
                # A crashed worker (not a clean exit, not bad input) is replaced; its trial is re-queued
                # by the heartbeat and run by whichever worker is free.
                if p.returncode not in (None, 0, 2) and not signals and restarts[i] < max_restarts:
                    restarts[i] += 1
                    procs[i] = spawn(i)
                    click.echo(f"fleet: w{i} exited with {p.returncode}; restarted (pid {procs[i].pid}, "
                               f"restart {restarts[i]} of {max_restarts})", err=True)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    failed = [f"w{i}={c}" for i, c in enumerate(codes) if c != 0]
    click.echo(f"fleet: all workers stopped ({'exit codes ' + ' '.join(failed) if failed else 'all exit 0'})")
    if failed and not signals:
        raise SystemExit(1)


COMMANDS: list = [fleet]
