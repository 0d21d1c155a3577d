"""``hpo worker``: run trials of a study (any number of workers may share one store)."""

import click

from hpo.commands.options import (
    artifacts_option,
    device_option,
    gpu_option,
    storage_option,
    study_option,
    version_mismatch_option,
)


@click.command()
@study_option
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="At most N trials from this worker.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Stop starting trials after S seconds.")
@gpu_option
@device_option
@click.option("--worker-index", type=click.IntRange(min=0), default=0,
              help="Extra sampler-seed offset; workers already get distinct seeds from the store.")
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@artifacts_option
@version_mismatch_option
@click.option("--summary/--no-summary", default=True, hidden=True,
              help="Print the study's statistics at the end (hpo fleet prints them once for all its workers).")
def worker(study_name: str, storage: str | None, n_trials: int | None, timeout: float | None, gpu: int | None,
           device: str | None, worker_index: int, data_dir: str | None, artifacts: str | None,
           allow_version_mismatch: bool, summary: bool) -> None:
    """Run trials of a study; any number of workers may share one store.

    Running trials are checkpointed under the artifact folder (checkpoints/STUDY/): a trial whose
    worker is stopped or dies resumes there on any worker that shares the folder."""
    from hpo.console import summary_text
    from hpo.running.devices import resolve_device
    from hpo.running.progress import Progress
    from hpo.running.worker import run_worker

    stats = run_worker(study_name, storage_url=storage, device=resolve_device(gpu=gpu, device=device),
                       n_trials=n_trials, timeout=timeout, worker_index=worker_index, data_dir=data_dir,
                       artifacts=artifacts, echo=click.echo, progress=Progress(),
                       allow_version_mismatch=allow_version_mismatch)
    if summary and stats is not None:  # None: the study was deleted or replaced under the worker
        click.echo(summary_text(stats))


COMMANDS = [worker]
