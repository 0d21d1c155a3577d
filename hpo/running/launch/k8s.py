"""Kubernetes Indexed Jobs of hpo workers: one pod, one ``hpo worker``.

The Job controller does the rest: ``completions``/``parallelism`` N pods, a crashed worker's pod is
replaced (its exit counts against ``backoffLimitPerIndex``), a pod evicted or preempted
(``DisruptionTarget``) is replaced without counting. Kubernetes sends SIGTERM first and SIGKILL
``terminationGracePeriodSeconds`` later: the worker ends its trial after the current epoch as FAIL
"interrupted" and re-queues it. The store URL comes from a Secret (``secretKeyRef``), never inline.
Bad input (exit code 2: a wrong study name, a spec the worker refuses) fails the whole Job at once
(``FailJob``): every replacement pod would fail the same way. The artifact folder, where running
trials checkpoint, is a PersistentVolumeClaim when one is named, so a replaced pod resumes its
trial's checkpoint on any node (the claim must be ReadWriteMany for pods on several nodes).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hpo.errors import HpoError
from hpo.running.launch import GRACE, check_gpus, check_workers, unique_dns_name

STORE_SECRET = "hpo-store"  # keys: url (HPO_STORAGE), password (PGPASSWORD, optional)
RETRIES_PER_WORKER = 3  # crashes of one worker's pod before its index counts as failed
CONTAINER = "worker"
ARTIFACTS_MOUNT = "/artifacts"  # the Dockerfile's HPO_ARTIFACTS
TTL_AFTER_FINISHED = 7 * 24 * 3600  # seconds a finished Job (and its pods' logs) is kept
BAD_INPUT_EXIT = 2  # hpo's exit code for input the user must fix
# What GPU nodes are usually tainted with (NVIDIA's GPU operator, GKE, AKS): GPU workers tolerate it.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def toleration(text: str) -> dict:
    """A toleration from ``KEY[=VALUE][:EFFECT]`` (kubectl taint's form; no VALUE: any value).

    Raises:
        HpoError: on an empty key or an effect Kubernetes does not know.
    """
    rest, _, effect = text.partition(":")
    key, eq, value = rest.partition("=")
    if not key or (effect and effect not in _EFFECTS):
        raise HpoError(f"--toleration {text!r}: use KEY[=VALUE][:EFFECT], EFFECT one of {', '.join(_EFFECTS)} "
                       f"(e.g. --toleration nvidia.com/gpu:NoSchedule)")
    found = {"key": key, "operator": "Equal", "value": value} if eq else {"key": key, "operator": "Exists"}
    return {**found, "effect": effect} if effect else found


def node_selector(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``{"KEY": "VALUE"}`` from ``KEY=VALUE`` texts.

    Raises:
        HpoError: on a text without ``=`` or with an empty key.
    """
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise HpoError(f"--node-selector {pair!r}: use KEY=VALUE, e.g. --node-selector nvidia.com/gpu.present=true")
        out[key] = value
    return out


def store_env(secret: str) -> list[dict]:
    """The container env that carries the store: ``HPO_STORAGE`` from key ``url`` of Secret ``secret``,
    and ``PGPASSWORD`` from its optional key ``password`` (so the URL itself may carry no password)."""
    return [
        {"name": "HPO_STORAGE", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}},
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password", "optional": True}}},
    ]


def worker_args(study: str, device: str, *, allow_version_mismatch: bool = False) -> list[str]:
    """The container's args after the image's ``hpo`` entrypoint."""
    return ["worker", "--study", study, "--device", device, *(["--allow-version-mismatch"] if allow_version_mismatch else [])]


def worker_job(*, study: str, workers: int, image: str, gpus_per_worker: int | None = None,
               namespace: str | None = None, store_secret: str = STORE_SECRET, grace: int = GRACE,
               tolerations: list[dict] | None = None, node_selector: dict[str, str] | None = None,
               artifacts_pvc: str | None = None, ttl: int = TTL_AFTER_FINISHED,
               allow_version_mismatch: bool = False) -> dict:
    """The Indexed Job of ``workers`` pods, each one ``hpo worker --study study`` (a manifest as a dict).

    Args:
        image: the worker image, a tag built from the Dockerfile (no default: a ``latest`` tag
            would run whatever was pushed last).
        grace: seconds between SIGTERM and SIGKILL (``terminationGracePeriodSeconds``), which must
            cover one epoch of the study's slowest trial plus a few store writes.
        tolerations, node_selector: where the pods may and must run (GPU workers also tolerate
            ``GPU_TOLERATION``).
        artifacts_pvc: a PersistentVolumeClaim mounted as the artifact folder (``/artifacts``),
            where running trials checkpoint (default: the container's own disk, lost with the pod).
        ttl: seconds the finished Job is kept before Kubernetes deletes it (``ttlSecondsAfterFinished``).
        allow_version_mismatch: the workers run the study with its model family at another version
            than it was created with (``hpo worker --allow-version-mismatch``).

    Raises:
        HpoError: on fewer than 1 worker, more than 1 GPU per worker, a grace under 1 s, a
            negative ttl or an empty image.
    """
    check_workers(workers)
    gpus, device = check_gpus(gpus_per_worker, None)
    if grace < 1:
        raise HpoError(f"--grace {grace}: seconds from SIGTERM to SIGKILL, at least 1")
    if ttl < 0:
        raise HpoError(f"--ttl {ttl}: seconds a finished Job is kept, at least 0")
    if not image:
        raise HpoError("--image: give the worker image built from the Dockerfile, e.g. REGISTRY/hpo-worker:0.1.0")
    study_label = unique_dns_name(study)
    name = f"hpo-worker-{unique_dns_name(study, limit=40)}"
    labels = {"app.kubernetes.io/name": "hpo", "app.kubernetes.io/component": "worker", "hpo/study": study_label}
    resources: dict = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    container = {
        "name": CONTAINER,
        "image": image,
        "args": worker_args(study, device, allow_version_mismatch=allow_version_mismatch),
        "env": [*store_env(store_secret), {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "HPO_ARTIFACTS", "value": ARTIFACTS_MOUNT}],
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod: dict = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job makes a new pod
        "terminationGracePeriodSeconds": grace,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},  # the Dockerfile's user hpo
        "containers": [container],
    }
    wanted = [*([GPU_TOLERATION] if gpus else []), *(tolerations or [])]
    if wanted:
        pod["tolerations"] = [dict(t) for t in {tuple(sorted(t.items())): t for t in wanted}.values()]
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if artifacts_pvc:
        container["volumeMounts"] = [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}]
        pod["volumes"] = [{"name": "artifacts", "persistentVolumeClaim": {"claimName": artifacts_pvc}}]
    metadata: dict = {"name": name, "labels": labels}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "ttlSecondsAfterFinished": ttl,
            "completions": workers,
            "parallelism": workers,
            "backoffLimitPerIndex": RETRIES_PER_WORKER,
            "backoffLimit": RETRIES_PER_WORKER * workers,
            "podFailurePolicy": {"rules": [
                # Eviction, preemption, node drain: not the worker's fault; its trial is re-queued.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Bad input (a wrong study name, a spec refused): every new pod would fail the same way.
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [BAD_INPUT_EXIT]}},
                # A crash (any non-zero exit) counts; the Job replaces the pod up to the limits above.
                {"action": "Count", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
            ]},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
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
