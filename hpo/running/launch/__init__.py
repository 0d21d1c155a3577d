"""Workers on cluster engines: SLURM job arrays (``hpo.running.launch.slurm``) and Kubernetes Indexed Jobs
(``hpo.running.launch.k8s``). The engine places, restarts and preempts; hpo only writes what it runs.

One engine task (an array task, a pod) is one ``hpo worker`` (or, on SLURM, one ``hpo fleet`` of
K workers sharing the task's GPU); the store URL reaches it through the environment only.
"""

from __future__ import annotations

import hashlib
import re

from hpo.errors import HpoError

GRACE = 120  # seconds a stopped worker gets to end its epoch and re-queue its trial


def check_workers(workers: int) -> int:
    """``workers`` if it is at least 1.

    Raises:
        HpoError: when ``workers`` < 1.
    """
    if workers < 1:
        raise HpoError(f"--workers {workers}: need at least 1 worker")
    return workers


def check_gpus(gpus_per_worker: int | None, device: str | None) -> tuple[int, str]:
    """(GPUs per worker, the worker's --device): 0 and ``cpu`` unless a GPU is asked for.

    Raises:
        HpoError: on more than one GPU per worker, or a device that contradicts the GPUs.
    """
    gpus = gpus_per_worker or 0
    if gpus not in (0, 1):
        raise HpoError(f"--gpus-per-worker {gpus}: an hpo worker trains on one GPU; allowed 0 or 1 "
                       f"(share a GPU between workers with --workers-per-gpu)")
    if device not in (None, "cpu", "cuda"):
        raise HpoError(f"--device {device!r}: allowed cpu, or cuda with --gpus-per-worker 1")
    if device == "cuda" and not gpus:
        raise HpoError("--device cuda: ask the engine for the GPU with --gpus-per-worker 1")
    if device == "cpu" and gpus:
        raise HpoError("--device cpu cannot be combined with --gpus-per-worker 1")
    return gpus, "cuda" if gpus else "cpu"


def dns_name(text: str, *, limit: int = 63) -> str:
    """``text`` as a DNS-1123 label (lower-case letters, digits, '-'; at most ``limit`` characters),
    usable as a Kubernetes object name or label value and as a SLURM job or file name.

    Raises:
        HpoError: when nothing usable is left of ``text``.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not name:
        raise HpoError(f"study name {text!r} has no letter or digit to name the job by")
    return name


def unique_dns_name(text: str, *, limit: int = 63) -> str:
    """``dns_name(text)``, with 8 hex digits of ``text``'s SHA-256 added whenever that name lost
    something (upper case, ``_`` or ``.``, a cut): studies ``My_Study`` and ``my-study`` get two
    names, so their Jobs cannot replace each other.

    Raises:
        HpoError: when nothing usable is left of ``text``.
    """
    name = dns_name(text, limit=limit)
    if name == text:
        return name
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{dns_name(text, limit=limit - 9)}-{digest}"
