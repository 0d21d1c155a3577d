"""How a fleet's workers share a GPU, and CUDA MPS for it: start the control daemon when workers
share a GPU and none runs, stop it only if this fleet started it.

A worker learns how its GPU is shared from ``HPO_GPU_SHARING`` (``mps``, ``time-slice`` or
``exclusive``), which the fleet sets, and records it on its trials (``hpo.running.devices.gpu_sharing``).

Follows NVIDIA's Multi-Process Service documentation (docs.nvidia.com/deploy/mps; the
``nvidia-cuda-mps-control(1)`` manual page):

- ``nvidia-cuda-mps-control -d`` starts the control daemon; it and its clients meet through the
  pipes in ``CUDA_MPS_PIPE_DIRECTORY`` (default ``/tmp/nvidia-mps``) and log to
  ``CUDA_MPS_LOG_DIRECTORY``; both must be the same for the daemon and its clients. A fleet
  starts its own daemon in a private folder that only its workers are told about.
- ``echo quit | nvidia-cuda-mps-control`` stops the daemon and its servers; ``get_server_list``
  answers only while a daemon runs ("Cannot find MPS control daemon process" otherwise).
- A daemon started with ``CUDA_VISIBLE_DEVICES`` set remaps the devices its clients see: a client
  enumerates the daemon's devices, so it is given its GPU's position in that list, not the index.
- A client that cannot reach a daemon runs without MPS; one that reaches a daemon whose server
  belongs to another user waits until that user's clients are done (one user's server at a time).
- Commands go to the daemon on stdin (Legacy MPS v2, the default protocol; MPS v3, chosen with
  ``CUDA_MPS_PROTOCOL_VERSION=3``, has another syntax), so the daemon started here is pinned to v2.
- Exclusive compute modes restrict the MPS server, not its clients, and NVIDIA's own multi-user
  set-up puts the GPU in ``EXCLUSIVE_PROCESS`` before starting the daemon: a GPU's compute mode is
  no reason here to go without MPS (without it, exclusive mode would admit one worker per GPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

GPU_SHARING_ENV = "HPO_GPU_SHARING"
GPU_SHARING_MODES = ("mps", "time-slice", "exclusive")
CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
PROTOCOL_ENV = "CUDA_MPS_PROTOCOL_VERSION"
START_WAIT_S = 10.0  # for the daemon's control pipe to appear after ``-d`` returns
COMMAND_TIMEOUT_S = 30.0


class MpsDaemon:
    """The MPS control daemon of one fleet.

    Args:
        gpus: GPU indices (as in ``CUDA_VISIBLE_DEVICES``) the fleet pins its workers to, in order;
            ``None`` when the workers see the fleet's own devices (``--device cuda``).
        say: prints an informational line.
        warn: prints a warning line (MPS could not be used; the fleet goes on without it).
        environ: the fleet's environment (default ``os.environ``).

    After :meth:`start`, ``active`` says whether the workers run under MPS and ``started``
    whether this object started the daemon (and :meth:`stop` will stop it).
    """

    def __init__(self, *, gpus: list[str] | None, say: Callable[[str], None], warn: Callable[[str], None],
                 environ: Mapping[str, str] | None = None):
        self.gpus = list(dict.fromkeys(gpus)) if gpus is not None else None
        self.say, self.warn = say, warn
        self.environ = dict(os.environ if environ is None else environ, **{PROTOCOL_ENV: "2"})
        self.active = False
        self.started = False
        self.folder: Path | None = None  # this fleet's own pipe and log folder
        self._client_env: dict[str, str | None] = {}
        self._binary: str | None = None

    def start(self) -> bool:
        """Use the daemon already running for this user, or start one; never raises.

        Returns:
            whether the workers run under MPS (also ``self.active``).
        """
        self._binary = shutil.which(CONTROL, path=self.environ.get("PATH"))
        if self._binary is None:
            self.warn(f"MPS: {CONTROL} not found on PATH; the workers time-slice the GPU")
            return False
        existing = self.environ.get(PIPE_ENV) or DEFAULT_PIPE_DIRECTORY
        owner = self._running_owner(existing)
        if owner is not None and owner in (os.getuid(), 0):
            # Root's daemon serves every user (it starts a server per user); our own is ours to share.
            self.active = True
            self.say(f"MPS: using the control daemon already running ({PIPE_ENV}={existing}); it is left running")
            return True
        self.folder = Path(tempfile.mkdtemp(prefix="hpo-mps-"))
        pipe, log = self.folder / "pipe", self.folder / "log"
        pipe.mkdir()
        log.mkdir()
        if owner is not None:
            # The workers would queue behind that user's server: keep them off it (an empty pipe folder).
            self._client_env = {PIPE_ENV: str(pipe)}
            self.warn(f"MPS: a control daemon of another user (uid {owner}) runs at {existing}; "
                      "the workers time-slice the GPU")
            return False
        env = dict(self.environ, **{PIPE_ENV: str(pipe), LOG_ENV: str(log)})
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        problem = self._start_daemon(env, pipe)
        if problem:
            self.warn(f"MPS: could not start the control daemon ({problem}); the workers time-slice the GPU")
            self._remove_folder()
            return False
        self.active = self.started = True
        self._client_env = {PIPE_ENV: str(pipe), LOG_ENV: str(log)}
        on = f"GPUs {','.join(self.gpus)}" if self.gpus is not None else "the visible GPUs"
        self.say(f"MPS: started the control daemon for {on} ({PIPE_ENV}={pipe}, logs in {log}); "
                 "it is stopped when the fleet ends")
        return True

    def client_env(self, gpu: str | None) -> dict[str, str | None]:
        """Environment changes for a GPU worker pinned to ``gpu`` (``None``: not pinned); a value
        of ``None`` removes the variable."""
        env = dict(self._client_env)
        if self.started:
            # The daemon remaps devices: a client names its GPU by position among the daemon's.
            env["CUDA_VISIBLE_DEVICES"] = None if gpu is None or self.gpus is None else str(self.gpus.index(gpu))
        return env

    def stop(self) -> None:
        """Stop the daemon if this object started it (``echo quit | nvidia-cuda-mps-control``) and
        remove its folder; a daemon found running is left alone. Safe to call twice; never raises."""
        if not self.started:
            self._remove_folder()
            return
        self.started = False
        pipe = self.folder / "pipe"
        problem = self._command("quit", pipe)
        if problem:
            self.warn(f"MPS: could not stop the control daemon ({problem}); its logs are in {self.folder / 'log'}")
            return
        self.say("MPS: control daemon stopped")
        self._remove_folder()

    def _running_owner(self, pipe_dir: str) -> int | None:
        """The uid owning the daemon that answers at ``pipe_dir``, or None when none answers."""
        control = Path(pipe_dir) / "control"
        try:
            owner = control.stat().st_uid
        except OSError:
            return None
        return None if self._command("get_server_list", Path(pipe_dir)) else owner

    def _start_daemon(self, env: dict[str, str], pipe: Path) -> str | None:
        """Run ``nvidia-cuda-mps-control -d``; the problem in a few words, or None when it runs."""
        try:
            # Own session: a Ctrl-C on the fleet's terminal must not reach the daemon while it forks.
            proc = subprocess.run([self._binary, "-d"], env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if proc.returncode != 0:
            return _first_line(proc, f"{CONTROL} -d exited with {proc.returncode}")
        deadline = time.monotonic() + START_WAIT_S
        while not (pipe / "control").exists():
            if time.monotonic() > deadline:
                return f"no control pipe in {pipe} after {START_WAIT_S:.0f} s"
            time.sleep(0.05)
        return None

    def _command(self, command: str, pipe: Path) -> str | None:
        """Send one command to the daemon at ``pipe``; the problem in a few words, or None."""
        env = dict(self.environ, **{PIPE_ENV: str(pipe)})
        try:
            proc = subprocess.run([self._binary], input=f"{command}\n", env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if proc.returncode != 0:
            return _first_line(proc, f"{command!r} exited with {proc.returncode}")
        return None

    def _remove_folder(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _first_line(proc: subprocess.CompletedProcess, default: str) -> str:
    lines = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
    return lines[0][:200] if lines else default
