"""``hpo launch slurm`` and ``hpo launch k8s``: workers as a SLURM job array or a Kubernetes Indexed Job."""

from __future__ import annotations

from pathlib import Path

import click

from hpo.commands.options import artifacts_option, storage_option, study_option, version_mismatch_option
from hpo.running.launch import GRACE

workers_option = click.option("--workers", type=int, required=True, metavar="N", help="Number of workers.")
gpus_option = click.option("--gpus-per-worker", type=int, default=None, metavar="1",
                           help="Give each worker one GPU (default: CPU workers).")
grace_option = click.option("--grace", type=int, default=GRACE, show_default=True, metavar="S",
                            help="Seconds a stopped worker gets to end its epoch and re-queue its trial.")


@click.group()
def launch() -> None:
    """Start workers on a cluster engine (SLURM, Kubernetes); the engine places and restarts them."""


@launch.command("slurm")
@study_option
@workers_option
@gpus_option
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="cpu (default) or cuda (with --gpus-per-worker 1).")
@click.option("--workers-per-gpu", type=int, default=1, show_default=True, metavar="K",
              help="K workers share each task's GPU (hpo fleet inside the task); N/K tasks.")
@click.option("--partition", default=None, metavar="P")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS", help="Time limit of each task.")
@click.option("--account", default=None, metavar="A")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="Another sbatch option, e.g. --sbatch-arg=--mem=8G (repeatable).")
@grace_option
@click.option("--python", default=None, metavar="PATH", help="Python that runs hpo in the tasks (default: this one).")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Folder for the job script and the tasks' logs (default storage/jobs).")
@click.option("--allow-sqlite", is_flag=True, help="Accept a SQLite store (only on a filesystem all nodes share).")
@click.option("--dry-run", is_flag=True, help="Print the job script; write and submit nothing.")
@version_mismatch_option
@storage_option
@artifacts_option
def slurm(study_name: str, workers: int, gpus_per_worker: int | None, device: str | None, workers_per_gpu: int,
          partition: str | None, time_limit: str | None, account: str | None, sbatch_args: tuple[str, ...],
          grace: int, python: str | None, jobs_dir: Path | None, allow_sqlite: bool, dry_run: bool,
          allow_version_mismatch: bool, storage: str | None, artifacts: str | None) -> None:
    """Submit N workers of a study as a SLURM job array (sbatch).

    Give --artifacts a folder every node shares: the tasks checkpoint their running trials there,
    so a requeued task resumes them (default: as a worker's, relative to where the task runs)."""
    from hpo.running.launch import slurm as sl
    p = sl.plan(study=study_name, workers=workers, gpus_per_worker=gpus_per_worker, device=device,
                workers_per_gpu=workers_per_gpu, partition=partition, time=time_limit, account=account,
                sbatch_args=sbatch_args, grace=grace, python=python, artifacts=artifacts,
                allow_version_mismatch=allow_version_mismatch)
    done = sl.launch(p, storage_url=storage, jobs_dir=jobs_dir, allow_sqlite=allow_sqlite, dry_run=dry_run)
    if dry_run:
        click.echo(done.script, nl=False)
        click.echo(f"# dry run: {done.what}; nothing submitted", err=True)
        return
    click.echo(f"submitted job {done.job}: {done.what}")
    click.echo(f"script: {done.path}")
    click.echo(f"logs:   {done.logs}")
    click.echo(f"follow: squeue -j {done.job}   (and: hpo status --study {study_name})")
    click.echo(f"stop:   scancel {done.job}   (running trials end after their epoch and are re-queued)")


@launch.command("k8s")
@study_option
@workers_option
@gpus_option
@click.option("--image", required=True, metavar="IMG",
              help="Worker image built from the Dockerfile, with its tag (e.g. REGISTRY/hpo-worker:0.1.0).")
@click.option("--namespace", default=None, metavar="NS")
@click.option("--store-secret", default=None, metavar="NAME",
              help="Secret holding the store URL (key url; optional key password). Default hpo-store.")
@grace_option
@click.option("--toleration", "tolerations", multiple=True, metavar="KEY[=VALUE][:EFFECT]",
              help="Let the pods run on nodes with this taint (repeatable). GPU workers already tolerate "
                   "nvidia.com/gpu:NoSchedule.")
@click.option("--node-selector", "node_selectors", multiple=True, metavar="KEY=VALUE",
              help="Run the pods only on nodes with this label (repeatable), e.g. cloud.google.com/gke-accelerator=nvidia-l4.")
@click.option("--artifacts-pvc", default=None, metavar="CLAIM",
              help="PersistentVolumeClaim mounted as the artifact folder (/artifacts), so a replaced pod resumes "
                   "its trial's checkpoint; ReadWriteMany for pods on several nodes (default: none, a replaced "
                   "pod starts its trial over).")
@click.option("--ttl", type=int, default=None, metavar="S",
              help="Seconds Kubernetes keeps the finished Job and its pods (ttlSecondsAfterFinished; default 7 days).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Write the manifest to DIR instead of printing it.")
@version_mismatch_option
def k8s(study_name: str, workers: int, gpus_per_worker: int | None, image: str, namespace: str | None,
        store_secret: str | None, grace: int, tolerations: tuple[str, ...], node_selectors: tuple[str, ...],
        artifacts_pvc: str | None, ttl: int | None, out: Path | None, allow_version_mismatch: bool) -> None:
    """Print a Kubernetes Indexed Job of N workers (pipe it to kubectl apply -f -)."""
    from hpo.running.launch import k8s as kube

    job = kube.worker_job(study=study_name, workers=workers, gpus_per_worker=gpus_per_worker,
                          image=image, namespace=namespace, store_secret=store_secret or kube.STORE_SECRET,
                          grace=grace, tolerations=[kube.toleration(t) for t in tolerations],
                          node_selector=kube.node_selector(node_selectors), artifacts_pvc=artifacts_pvc,
                          ttl=kube.TTL_AFTER_FINISHED if ttl is None else ttl,
                          allow_version_mismatch=allow_version_mismatch)
    if out is None:
        click.echo(kube.render([job]), nl=False)
        return
    path = kube.write([job], out)
    click.echo(f"wrote {path}: Indexed Job {job['metadata']['name']} of {workers} workers")
    click.echo(f"next: kubectl apply -f {path}")


COMMANDS = [launch]
