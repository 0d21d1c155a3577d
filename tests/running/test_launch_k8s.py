"""`hpo launch k8s` and deploy/kubernetes/: every manifest against the official Kubernetes schema.

No cluster runs on these machines, and none is faked: the manifests are validated offline with
kubernetes-validate (the API server's OpenAPI schemas, strict: unknown fields are errors), and what
the schema cannot say (the worker's command, where secrets come from, GPU limits) is checked here.
"""

from __future__ import annotations

import copy
import os

import click
import pytest
import yaml
from conftest import REPO, run_hpo

from hpo.cli import main
from hpo.store.config import mask_url

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = REPO / "deploy" / "kubernetes"
PASSWORD = "pw-K8s-secret"
VERSIONS = ["1.30", kubernetes_validate.latest_version()]  # the oldest supported upstream, and the newest known


def validate(doc: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


IMAGE = "registry.example/hpo-worker:0.1.0"


def launch_k8s(*args: str, check: int = 0, image: str | None = IMAGE):
    # A store URL with a password in the environment: the manifests must not pick it up.
    env = dict(os.environ, HPO_STORAGE=f"postgresql://hpo:{PASSWORD}@db.example:5432/hpo", PYTHONUNBUFFERED="1")
    if image is not None and "--image" not in args:
        args = (*args, "--image", image)
    return run_hpo("launch", "k8s", *args, env=env, check=check)


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"] if "template" in doc.get("spec", {}) else {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def parse_hpo(args: list[str]) -> tuple[str, dict]:
    """(subcommand, parsed parameters) of ``hpo ARGS`` by hpo's own click parser; raises on bad args."""
    name, *rest = args
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"no hpo command {name!r}"
    return name, command.make_context(name, rest).params


def check_no_secret_inline(doc: dict) -> None:
    """The store and passwords only ever come from a Secret; no value anywhere carries a password."""
    assert PASSWORD not in yaml.safe_dump(doc)
    for c in containers(doc):
        for var in c.get("env", []):
            if var["name"] in ("HPO_STORAGE", "PGPASSWORD", "POSTGRES_PASSWORD") or "PASSWORD" in var["name"]:
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
            else:
                assert "://" not in str(var.get("value", "")), var


def test_the_validator_rejects_a_broken_manifest():
    # The checks below mean something only if the schema can fail.
    job = yaml.safe_load(launch_k8s("--study", "regression", "--workers", "2").stdout)
    validate(job)
    for path, bad in ((("spec", "completions"), "two"), (("spec", "completionMod"), "Indexed")):
        broken = copy.deepcopy(job)
        broken[path[0]][path[1]] = bad
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)


@pytest.mark.parametrize("gpus", [None, 1])
def test_worker_job(tmp_path, gpus):
    args = ["--study", "regression", "--workers", "4", "--namespace", "ml", "--store-secret", "my-store",
            "--image", "registry.example/hpo-worker:1.0", "--grace", "300"]
    if gpus:
        args += ["--gpus-per-worker", str(gpus), "--allow-version-mismatch"]
    proc = launch_k8s(*args)
    docs = list(yaml.safe_load_all(proc.stdout))
    assert len(docs) == 1 and proc.stderr == ""
    (job,) = docs
    validate(job)
    print(f"\nhpo launch k8s (gpus={gpus}): {job['kind']}/{job['metadata']['name']} valid against "
          f"Kubernetes {' and '.join(VERSIONS)} (strict)")
    spec = job["spec"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "ml"
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    # Preemption and eviction are not the worker's fault and do not count; bad input (exit 2) fails
    # the Job at once, any other crash counts. Kubernetes applies the first rule that matches.
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1] == {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}}
    assert rules[2]["action"] == "Count" and rules[2]["onExitCodes"]["operator"] == "NotIn"
    assert rules[2]["onExitCodes"]["values"] == [0]
    assert spec["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    assert spec["backoffLimitPerIndex"] >= 1 and spec["backoffLimit"] >= spec["backoffLimitPerIndex"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # what the API server demands of a podFailurePolicy
    assert pod["terminationGracePeriodSeconds"] == 300
    (worker,) = pod["containers"]
    assert rules[1]["onExitCodes"]["containerName"] == rules[2]["onExitCodes"]["containerName"] == worker["name"]
    assert worker["image"] == "registry.example/hpo-worker:1.0"
    name, params = parse_hpo(worker["args"])
    assert name == "worker" and params["study_name"] == "regression"
    assert params["device"] == ("cuda" if gpus else "cpu") and params["storage"] is None
    assert params["allow_version_mismatch"] is bool(gpus)  # passed on to every worker when given
    store = next(v for v in worker["env"] if v["name"] == "HPO_STORAGE")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "my-store", "key": "url"}
    check_no_secret_inline(job)
    if gpus:
        assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        assert "nvidia.com/gpu" not in proc.stdout and "tolerations" not in pod
    assert "volumes" not in pod and "nodeSelector" not in pod


def test_gpu_job_with_tolerations_node_selector_and_an_artifacts_claim_validates():
    proc = launch_k8s("--study", "fmnist", "--workers", "2", "--gpus-per-worker", "1", "--ttl", "3600",
                      "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "pool=gpu-spot:NoExecute",
                      "--toleration", "dedicated", "--node-selector", "cloud.google.com/gke-accelerator=nvidia-l4",
                      "--node-selector", "pool=gpu", "--artifacts-pvc", "hpo-artifacts")
    job = yaml.safe_load(proc.stdout)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [  # the GPU taint once, though asked for twice
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "gpu-spot", "effect": "NoExecute"},
        {"key": "dedicated", "operator": "Exists"}]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "gpu"}
    assert pod["volumes"] == [{"name": "artifacts", "persistentVolumeClaim": {"claimName": "hpo-artifacts"}}]
    (worker,) = pod["containers"]
    # The worker checkpoints into the claim: a replaced pod finds its trial's checkpoint there.
    assert worker["volumeMounts"] == [{"name": "artifacts", "mountPath": "/artifacts"}]
    assert {"name": "HPO_ARTIFACTS", "value": "/artifacts"} in worker["env"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # the claim is writable
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_worker_job_to_a_folder(tmp_path):
    proc = launch_k8s("--study", "My_Study.v2", "--workers", "1", "--out", str(tmp_path / "k8s"))
    (path,) = (tmp_path / "k8s").iterdir()
    job = yaml.safe_load(path.read_text())
    validate(job)
    assert job["metadata"]["name"].startswith("hpo-worker-my-study-v2-") and f"kubectl apply -f {path}" in proc.stdout
    assert parse_hpo(job["spec"]["template"]["spec"]["containers"][0]["args"])[1]["study_name"] == "My_Study.v2"


def test_studies_that_differ_by_case_or_underscore_get_jobs_of_their_own():
    from hpo.running.launch.k8s import worker_job

    studies = ["my-study", "My-Study", "my_study", "my.study", "x" * 80, "x" * 81]
    jobs = [worker_job(study=s, workers=1, image=IMAGE) for s in studies]
    names = [j["metadata"]["name"] for j in jobs]
    labels = [j["metadata"]["labels"]["hpo/study"] for j in jobs]
    assert names[0] == "hpo-worker-my-study" and labels[0] == "my-study"  # a name that is already a DNS label stays
    assert len(set(names)) == len(set(labels)) == len(studies), names
    for job in jobs:
        validate(job)
        assert len(job["metadata"]["name"]) <= 63 - 11  # room for the pods' "-<index>-<suffix>"


def test_no_image_no_manifest():
    proc = launch_k8s("--study", "regression", "--workers", "1", image=None, check=2)
    assert proc.stdout == "" and "--image" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers 0: need at least 1 worker"),
    (["--workers", "2", "--gpus-per-worker", "2"], "--gpus-per-worker 2"),
    (["--workers", "2", "--grace", "0"], "--grace 0"),
    (["--workers", "2", "--toleration", "gpu:NoSchedul"], "--toleration 'gpu:NoSchedul': use KEY[=VALUE][:EFFECT]"),
    (["--workers", "2", "--node-selector", "pool"], "--node-selector 'pool': use KEY=VALUE"),
    (["--workers", "2", "--ttl", "-1"], "--ttl -1"),
])
def test_refusals(args, message):
    proc = launch_k8s("--study", "regression", *args, check=2)
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def deploy_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(DEPLOY.glob("*.yaml")) if p.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_deploy_manifests_validate():
    docs = deploy_docs()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in docs)
    assert kinds == ["Deployment/hpo-dashboard", "Job/hpo-create-study", "Secret/hpo-store", "Service/hpo-dashboard",
                     "Service/hpo-postgres", "StatefulSet/hpo-postgres"]
    for _, doc in docs:
        validate(doc)
    print(f"\ndeploy/kubernetes: {', '.join(kinds)} valid against Kubernetes {' and '.join(VERSIONS)} (strict)")


def test_kustomization_applies_every_manifest_but_the_secret_template():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kust["resources"]) == sorted(files)
    assert {i["name"] for i in kust["images"]} == {"hpo-worker"}


def test_deploy_keeps_secrets_out_and_runs_valid_hpo_commands():
    docs = dict((f"{d['kind']}/{d['metadata']['name']}", d) for _, d in deploy_docs())
    for doc in docs.values():
        check_no_secret_inline(doc)
        for c in containers(doc):
            if c["image"].split(":")[0] == "hpo-worker":
                parse_hpo(c["args"])
    secret = docs["Secret/hpo-store"]["stringData"]
    assert secret["password"] == "" and mask_url(secret["url"]) == secret["url"]  # a template: no password in it
    # The dashboard is not published outside the cluster.
    assert docs["Service/hpo-dashboard"]["spec"]["type"] == "ClusterIP"
    assert docs["Service/hpo-postgres"]["spec"]["type"] == "ClusterIP"
    pvc = docs["StatefulSet/hpo-postgres"]["spec"]["volumeClaimTemplates"][0]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    name, params = parse_hpo(docs["Job/hpo-create-study"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert name == "create-study" and params["spec"] == "regression"
    # The workers hpo launch k8s makes read the Secret that this folder's PostgreSQL uses.
    job = yaml.safe_load(launch_k8s("--study", "regression", "--workers", "1").stdout)
    refs = {v["valueFrom"]["secretKeyRef"]["name"] for v in job["spec"]["template"]["spec"]["containers"][0]["env"]
            if "valueFrom" in v}
    assert refs == {docs["Secret/hpo-store"]["metadata"]["name"]}
