"""Kubernetes Indexed Jobs of hpo workers: one pod, one ``hpo worker``.

The Job controller does the rest: ``completions``/``parallelism`` N pods, a crashed worker's pod is
replaced (its exit counts against ``backoffLimitPerIndex``), a pod evicted or preempted
(``DisruptionTarget``) is replaced without counting. Kubernetes sends SIGTERM first and SIGKILL
``terminationGracePeriodSeconds`` later: the worker ends its trial after the current epoch as FAIL
"interrupted" and re-queues it. The store URL comes from a Secret (``secretKeyRef``), never inline.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hpo.errors import HpoError
from hpo.running.launch import GRACE, check_gpus, check_workers, dns_name

IMAGE = "hpo-worker:latest"  # the image docker-compose.yml and the Dockerfile build
STORE_SECRET = "hpo-store"  # keys: url (HPO_STORAGE), password (PGPASSWORD, optional)
RETRIES_PER_WORKER = 3  # crashes of one worker's pod before its index counts as failed
CONTAINER = "worker"


def store_env(secret: str) -> list[dict]:
    """The container env that carries the store: ``HPO_STORAGE`` from key ``url`` of Secret ``secret``,
    and ``PGPASSWORD`` from its optional key ``password`` (so the URL itself may carry no password)."""
    return [
        {"name": "HPO_STORAGE", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}},
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password", "optional": True}}},
    ]


def worker_args(study: str, device: str) -> list[str]:
    """The container's args after the image's ``hpo`` entrypoint."""
    return ["worker", "--study", study, "--device", device]


def worker_job(*, study: str, workers: int, gpus_per_worker: int | None = None, image: str = IMAGE,
               namespace: str | None = None, store_secret: str = STORE_SECRET, grace: int = GRACE) -> dict:
    """The Indexed Job of ``workers`` pods, each one ``hpo worker --study study`` (a manifest as a dict).

    ``grace``: seconds between SIGTERM and SIGKILL (``terminationGracePeriodSeconds``), which must
    cover one epoch of the study's slowest trial plus a few store writes.

    Raises:
        HpoError: on fewer than 1 worker, more than 1 GPU per worker, or a grace under 1 s.
    """
    check_workers(workers)
    gpus, device = check_gpus(gpus_per_worker, None)
    if grace < 1:
        raise HpoError(f"--grace {grace}: seconds from SIGTERM to SIGKILL, at least 1")
    name = f"hpo-worker-{dns_name(study, limit=40)}"
    labels = {"app.kubernetes.io/name": "hpo", "app.kubernetes.io/component": "worker",
              "hpo/study": dns_name(study)}
    resources: dict = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    container = {
        "name": CONTAINER,
        "image": image,
        "args": worker_args(study, device),
        "env": [*store_env(store_secret), {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    metadata: dict = {"name": name, "labels": labels}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimitPerIndex": RETRIES_PER_WORKER,
            "backoffLimit": RETRIES_PER_WORKER * workers,
            "podFailurePolicy": {"rules": [
                # Eviction, preemption, node drain: not the worker's fault; its trial is re-queued.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # A crash (any non-zero exit) counts; the Job replaces the pod up to the limits above.
                {"action": "Count", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
            ]},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "restartPolicy": "Never",  # required by podFailurePolicy; the Job makes a new pod
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},  # the Dockerfile's user hpo
                    "containers": [container],
                },
            },
        },
    }


def render(manifests: list[dict]) -> str:
    """Manifests as one YAML stream (``---`` between documents), for ``kubectl apply -f -``."""
    return yaml.safe_dump_all(manifests, sort_keys=False)


def write(manifests: list[dict], out: Path) -> Path:
    """Write the manifests to ``out/<Job name>.yaml`` and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{manifests[0]['metadata']['name']}.yaml"
    path.write_text(render(manifests))
    return path
