"""N ``hpo worker`` processes of one study sharing one device, with and without CUDA MPS.

Each round gets a fresh study (the shipped ``fmnist`` spec, or a cut-down one for ``--quick``) in
a temporary SQLite store; the workers stop starting trials after a set time. The rate is the
trials' model-epochs (their ``epochs_run``, pruned trials included) per second once every worker
has finished its first trial (``steady_rate``), so process start-up, data loading and first-trial
costs are not in it (start-up is reported apart); when a worker finished only one trial, the rate
falls back to all epochs over the span from the first trial's start to the last one's end.

Without MPS, processes on one GPU are time-sliced: one context runs at a time, so small kernels
from N processes do not overlap. The MPS daemon (``nvidia-cuda-mps-control -d``) funnels them into
one context where they run concurrently. The bench starts its own daemon, with its pipe and log
folders in its scratch folder, for the MPS rounds only, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

HPO = [sys.executable, "-m", "hpo.cli"]
STUDY = "bench-workers"
QUICK_SPEC = {"data": {"train_subset": 512, "val_subset": 256}, "space": {"epochs": {"int": [1, 3]}},
              "pruner": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 0}}


def write_spec(folder: Path, *, quick: bool) -> Path:
    """The shipped fmnist spec under the bench's study name (cut down to seconds per trial for
    ``quick``), with no trial budget of its own: the rounds are timed."""
    from hpo.spec.schema import find_spec_file

    raw = yaml.safe_load(find_spec_file("fmnist").read_text())
    raw["name"] = STUDY
    raw["budget"] = {"n_trials": 100000}
    if quick:
        raw["data"].update(QUICK_SPEC["data"])
        raw["space"].update(QUICK_SPEC["space"])
        raw["pruner"] = QUICK_SPEC["pruner"]
    path = folder / f"{STUDY}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def mps_running() -> bool:
    """Whether an MPS control daemon or server of anyone's runs on this machine."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("nvidia-cuda-mps"):
                return True
    return False


_PROBE = """import subprocess, sys, torch
torch.ones(1, device=sys.argv[2]).sum().item()
print(subprocess.run([sys.argv[1]], input="get_server_list\\n", capture_output=True, text=True).stdout.strip())
"""


@contextlib.contextmanager
def mps_daemon(scratch: Path, device: str) -> Iterator[tuple[dict[str, str] | None, str]]:
    """Start an MPS control daemon of the bench's own and yield the environment its clients need
    (``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``) and "", or None and why it could not
    start. The daemon is asked to quit on exit (NVIDIA MPS docs, "Starting and stopping MPS on
    Linux")."""
    binary = shutil.which("nvidia-cuda-mps-control")
    if binary is None:
        yield None, "nvidia-cuda-mps-control not found"
        return
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(scratch / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(scratch / "mps-log")}
    for folder in env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    started = subprocess.run([binary, "-d"], env=full_env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        yield None, f"nvidia-cuda-mps-control -d failed: {(started.stderr or started.stdout).strip()[:200]}"
        return
    try:
        # The daemon starts a server for the first client, and a client that cannot reach it runs
        # without MPS, silently (NVIDIA MPS docs): one tiny CUDA client asks the daemon for its
        # servers while it is connected.
        probe = subprocess.run([sys.executable, "-c", _PROBE, binary, device], env=full_env, capture_output=True,
                               text=True, timeout=120)
        if probe.returncode != 0:
            lines = probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"]
            yield None, f"MPS client failed: {lines[-1][:200]}"
        elif not probe.stdout.strip():
            yield None, "no MPS server came up for a CUDA client (see the daemon's log in CUDA_MPS_LOG_DIRECTORY)"
        else:
            yield env, ""
    finally:
        subprocess.run([binary], input="quit\n", env=full_env, capture_output=True, text=True, timeout=30)


def run_round(n: int, *, spec: Path, storage: str, device: str, seconds: float, data_dir: str,
              extra_env: dict[str, str] | None = None) -> dict:
    """``n`` workers on ``device`` for ``seconds``, against a fresh study; their trials' totals."""
    import optuna

    from hpo.search.study import create
    from hpo.spec.schema import load_spec_file
    from hpo.store.storage import open_storage

    create(load_spec_file(spec), open_storage(storage, heartbeat=False), force=True)
    env = {**os.environ, "HPO_STORAGE": storage, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    start = time.time()
    procs = [subprocess.Popen([*HPO, "worker", "--study", STUDY, "--device", device, "--worker-index", str(i),
                               "--timeout", str(seconds), "--data-dir", data_dir], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"exit {p.returncode}: {(err.strip().splitlines() or [''])[-1][:200]}")
    wall = time.time() - start
    study = optuna.load_study(study_name=STUDY, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    done = [t for t in finished if t.datetime_start and t.datetime_complete]
    epochs = sum(int(t.user_attrs.get("epochs_run", 0)) for t in finished)
    span = ((max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            if done else 0.0)
    first = (min(t.datetime_start for t in done).timestamp() - start) if done else None
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    steady = steady_rate(done)
    return {"workers": n, "wall_s": wall, "startup_s": first, "span_s": span, "finished": len(finished),
            "pruned": sum(t.state.name == "PRUNED" for t in finished),
            "failed": sum(t.state.name == "FAIL" for t in finished), "model_epochs": epochs,
            "model_epochs_per_s": steady if steady is not None else (epochs / span if span > 0 else None),
            "steady": steady is not None, "best_val": max((t.value for t in complete), default=None),
            "paths": sorted({t.user_attrs.get("train_path", "?") for t in complete}), "errors": errors}


def steady_rate(trials: list) -> float | None:
    """Model-epochs per second of all workers together once each has finished its first trial
    (which carries one-off costs: lazy imports, cuDNN autotuning, graph capture): the sum over
    workers of the epochs of their later trials over the time from their first trial's end to
    their last one's. None when some worker finished fewer than two trials."""
    by_worker: dict[str, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    total = 0.0
    for runs in by_worker.values():
        runs.sort(key=lambda t: t.datetime_complete)
        seconds = (runs[-1].datetime_complete - runs[0].datetime_complete).total_seconds()
        if len(runs) < 2 or seconds <= 0:
            return None
        total += sum(int(t.user_attrs.get("epochs_run", 0)) for t in runs[1:]) / seconds
    return total if by_worker else None
