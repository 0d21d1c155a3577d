"""A fleet: several ``hpo worker`` processes on one machine, pinned to GPUs or on the CPU.

Plans who runs where, shares GPUs through CUDA MPS where several workers use one (``hpo.running.mps``),
spawns the workers, restarts crashed ones and forwards stop signals. ``hpo fleet`` is its command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hpo.errors import HpoError
from hpo.running.mps import GPU_SHARING_ENV, MpsDaemon

POLL_S = 0.2
# Done, bad input, a full store: a restart would end the same way. A worker that lost the store
# (75, hpo.errors.StoreUnreachable) is restarted like a crashed one: the store may be back.
CLEAN_EXITS = (0, 2, 74)


@dataclass(frozen=True)
class Member:
    """One worker of the fleet: its ``--device`` and the GPU index it is pinned to (its
    ``CUDA_VISIBLE_DEVICES``), or ``None`` when it sees the fleet's own devices."""

    index: int
    device: str
    gpu: str | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def label(self) -> str:
        return f"w{self.index}" + ("" if self.gpu is None else f" gpu{self.gpu}")


def _parse_gpus(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise HpoError(f"--gpus: {text!r} is not a list of GPU indices; use e.g. --gpus 0,1")
    return gpus


def plan(*, gpus: str | None, per_gpu: int, device: str | None, workers: int | None) -> list[Member]:
    """The fleet's members in worker-index order: ``per_gpu`` per GPU of ``gpus``, or ``workers``
    on ``device`` (default cpu).

    Raises:
        HpoError: on an unusable combination of options.
    """
    if gpus is not None:
        if device is not None and device != "cuda":
            raise HpoError(f"--device {device!r} cannot be combined with --gpus (the workers run on cuda)")
        if workers is not None:
            raise HpoError("give --per-gpu with --gpus, not --workers")
        # Each worker sees only its own GPU, so an out-of-memory on one GPU cannot spill onto another.
        pinned = [g for g in _parse_gpus(gpus) for _ in range(per_gpu)]
        return [Member(i, "cuda", g) for i, g in enumerate(pinned)]
    return [Member(i, device or "cpu") for i in range(workers or 1)]


def _gpu_key(member: Member) -> str:
    return member.gpu if member.gpu is not None else member.device


def shares_gpu(members: list[Member]) -> bool:
    """Whether two or more GPU workers use one GPU (then MPS pays)."""
    counts = Counter(_gpu_key(m) for m in members if m.on_gpu)
    return any(n > 1 for n in counts.values())


def sharing_modes(members: list[Member], *, mps: bool) -> list[str | None]:
    """How each member's GPU is shared: ``exclusive`` (alone on it), ``mps`` or ``time-slice``
    (several on it, with or without MPS); ``None`` for CPU workers."""
    counts = Counter(_gpu_key(m) for m in members if m.on_gpu)
    return [None if not m.on_gpu else "exclusive" if counts[_gpu_key(m)] == 1 else "mps" if mps else "time-slice"
            for m in members]


def check_study(study_name: str, storage_url: str | None) -> None:
    """Fail fast, once, on a bad store or study name, holding no connection afterwards.

    Raises:
        StoreError, SpecError: as ``hpo worker`` would.
    """
    from hpo.search.study import open_study
    from hpo.store.storage import open_storage

    storage = open_storage(storage_url, heartbeat=False)
    try:
        open_study(study_name, storage)
    finally:
        storage.engine.dispose()


def worker_command(study_name: str, *, n_trials: int | None, timeout: float | None,
                   data_dir: str | None, artifacts: str | None = None,
                   allow_version_mismatch: bool = False) -> list[str]:
    """The ``hpo worker`` command line shared by every member (without ``--device``/``--worker-index``).
    It never holds the store URL: command lines are readable by every local user (``ps``), so the
    URL goes through the environment (:func:`worker_env`). The members print no statistics: the
    fleet prints them once, when all have stopped."""
    command = [sys.executable, "-m", "hpo.cli", "worker", "--study", study_name, "--no-summary"]
    for flag, value in (("--n-trials", n_trials), ("--timeout", timeout), ("--data-dir", data_dir),
                        ("--artifacts", artifacts)):
        if value is not None:
            command += [flag, str(value)]
    return command + (["--allow-version-mismatch"] if allow_version_mismatch else [])


def worker_env(member: Member, *, sharing: str | None, mps_env: dict[str, str | None],
               environ: dict[str, str] | None = None, storage: str | None = None) -> dict[str, str]:
    """The member's environment: the fleet's, the store URL given to the fleet (``HPO_STORAGE``), its
    GPU pin, how its GPU is shared (``HPO_GPU_SHARING``) and the MPS client variables (``None``
    removes a variable)."""
    env = dict(os.environ if environ is None else environ, PYTHONUNBUFFERED="1")
    if storage is not None:
        env["HPO_STORAGE"] = storage
    if member.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = member.gpu
    env.pop(GPU_SHARING_ENV, None)
    if sharing is not None:
        env[GPU_SHARING_ENV] = sharing
    for name, value in (mps_env if member.on_gpu else {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def exit_text(code: int) -> str:
    """An exit status as people read it: ``1``, or ``SIGKILL`` for a worker killed by a signal."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return str(code)


@dataclass(frozen=True)
class FleetResult:
    codes: list[int]  # the last exit status of each member (negative: killed by that signal)
    restarts: list[int]
    signalled: bool  # stopped by SIGINT/SIGTERM
    sharing: list[str | None]

    @property
    def failed(self) -> bool:
        """Some worker did not end cleanly and nobody asked the fleet to stop."""
        return any(c != 0 for c in self.codes) and not self.signalled


class Supervisor:
    """Runs the members as child processes, restarts crashed ones and forwards stop signals.

    A crashed worker (exit status not 0, 2 or 74, no stop signal received; 75, a worker that lost the
    store, is restarted too) is restarted, at most
    ``max_restarts`` times per member, whether or not the others are alive: its running trial is
    re-queued by the heartbeat and run by whichever worker is free.
    """

    def __init__(self, command: list[str], members: list[Member], envs: list[dict[str, str]], *,
                 max_restarts: int, echo: Callable[..., None]):
        self.command, self.members, self.envs = command, members, envs
        self.max_restarts, self.echo = max_restarts, echo
        self.procs: list[subprocess.Popen] = []
        self.restarts = [0] * len(members)
        self.signals: list[int] = []
        self._pumps: list[threading.Thread] = []
        self._told: set[int] = set()  # pids the first signal was forwarded to

    def spawn(self, i: int) -> subprocess.Popen:
        m = self.members[i]
        # Own session: a Ctrl-C on the terminal reaches the fleet only, which forwards one SIGTERM.
        proc = subprocess.Popen([*self.command, "--device", m.device, "--worker-index", str(i)], env=self.envs[i],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        pump = threading.Thread(target=self._pump, args=(proc, f"[{m.label}]"), daemon=True)
        pump.start()
        self._pumps.append(pump)
        return proc

    def _pump(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in proc.stdout:
            self.echo(f"{prefix} {line.rstrip()}")

    def forward(self, signum: int, frame=None) -> None:
        """Signal handler: the first signal sends SIGTERM to every live worker, the next SIGKILL."""
        self.signals.append(signum)
        kind = signal.SIGTERM if len(self.signals) == 1 else signal.SIGKILL
        self.echo(f"fleet: {signal.Signals(signum).name}: sending {kind.name} to the workers", err=True)
        for p in list(self.procs):
            if p.poll() is None:
                p.send_signal(kind)
                self._told.add(p.pid)

    def run(self) -> list[int]:
        """Start every member and supervise until all have exited; returns their last exit statuses."""
        for i in range(len(self.members)):
            self.procs.append(self.spawn(i))
        if self.signals:  # a signal came while they were starting: tell the ones started after it
            for p in self.procs:
                if p.pid not in self._told:
                    p.send_signal(signal.SIGTERM)
        self.echo(f"fleet: {len(self.procs)} workers (pids {' '.join(str(p.pid) for p in self.procs)})")
        while True:
            codes = [p.poll() for p in self.procs]  # poll every one: it sets returncode
            for i, code in enumerate(codes):
                if code is None or code in CLEAN_EXITS or self.signals or self.restarts[i] >= self.max_restarts:
                    continue
                self.restarts[i] += 1
                self.procs[i] = self.spawn(i)
                codes[i] = None
                self.echo(f"fleet: w{i} exited with {exit_text(code)}; restarted (pid {self.procs[i].pid}, "
                          f"restart {self.restarts[i]} of {self.max_restarts})", err=True)
            # Only after the restarts: a lone (or last) worker that crashed is running again here.
            if all(code is not None for code in codes):
                break
            time.sleep(POLL_S)
        for pump in self._pumps:
            pump.join(timeout=5)
        return [p.returncode for p in self.procs]


def run_fleet(members: list[Member], command: list[str], *, mps: bool | None, max_restarts: int,
              echo: Callable[..., None], storage: str | None = None) -> FleetResult:
    """Run the fleet to its end: MPS if wanted, the workers, their restarts; stops MPS if it started it.

    Args:
        mps: ``True`` starts (or uses) the MPS daemon, ``False`` never, ``None`` when two or more
            workers share a GPU.
        echo: ``click.echo``-like; workers' lines come prefixed ``[wI gpuG]``.
        storage: the store URL given to the fleet, passed to the workers as ``HPO_STORAGE``
            (default: they inherit the fleet's environment).

    SIGINT/SIGTERM are handled while it runs: the first stops the workers cleanly (their running
    trials are re-queued), the next kills them; the MPS daemon it started is stopped either way.
    """
    warn = lambda text: echo(f"fleet: warning: {text}", err=True)  # noqa: E731
    say = lambda text: echo(f"fleet: {text}")  # noqa: E731
    daemon = None
    if shares_gpu(members) if mps is None else mps:
        pinned = [m.gpu for m in members if m.gpu is not None]
        daemon = MpsDaemon(gpus=pinned or None, say=say, warn=warn)
    supervisor = Supervisor(command, members, [], max_restarts=max_restarts, echo=echo)
    previous = {s: signal.signal(s, supervisor.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    sharing: list[str | None] = sharing_modes(members, mps=False)
    codes = [0] * len(members)
    try:
        active = daemon.start() if daemon is not None else False
        sharing = sharing_modes(members, mps=active)
        supervisor.envs = [worker_env(m, sharing=s, mps_env=daemon.client_env(m.gpu) if daemon else {}, storage=storage)
                           for m, s in zip(members, sharing)]
        say("workers: " + ", ".join(f"{m.label} {m.device}" + (f" ({s})" if s else "")
                                    for m, s in zip(members, sharing)))
        if not supervisor.signals:  # a Ctrl-C while MPS was starting: start no worker
            codes = supervisor.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if daemon is not None:
            daemon.stop()
    return FleetResult(codes=codes, restarts=supervisor.restarts, signalled=bool(supervisor.signals), sharing=sharing)
