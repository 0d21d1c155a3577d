"""The ``hpo`` command line: parses, calls the library, prints. No logic of its own.

Errors the user can fix (``HpoError``, and the file system's refusals of a named file) are printed
on one line with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from hpo.commands.options import artifacts_option, device_option, gpu_option, storage_option, study_option
from hpo.errors import HpoError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpoError as e:
            if ctx.meta.get("hpo_debug"):
                raise
            click.echo(f"hpo: error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:
            # A file the command reads or writes (a report, an export, predictions, artifacts): the
            # file system refused it (no space, no permission, a name too long). One line, as above.
            if ctx.meta.get("hpo_debug") or e.filename is None:
                raise
            click.echo(f"hpo: error: {e.filename}: {e.strerror or e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("hpo: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="hpo")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Hyperparameter studies for PyTorch on Optuna."""
    import optuna

    ctx.meta["hpo_debug"] = debug
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@main.command("create-study")
@click.argument("spec")
@storage_option
@click.option("--force", is_flag=True, help="Delete an existing study of the same name first.")
@click.option("--heartbeat-interval", type=int, default=None, metavar="S",
              help="Seconds between a running trial's heartbeats, for every worker of the study "
                   "(default: $HPO_HEARTBEAT_INTERVAL, else 10).")
@click.option("--grace-period", type=int, default=None, metavar="S",
              help="Seconds without a heartbeat after which a trial's worker counts as dead and the trial is "
                   "re-queued (default: $HPO_GRACE_PERIOD, else 30; longer than the interval).")
def create_study(spec: str, storage: str | None, force: bool, heartbeat_interval: int | None,
                 grace_period: int | None) -> None:
    """Create a study from SPEC: a name in studies/ (e.g. regression) or a YAML path."""
    from dataclasses import replace

    from hpo import study as studies
    from hpo.tables import embed_csv, size_text
    from hpo.spec import find_spec_file, load_spec_file
    from hpo.store import Heartbeat, mask_url, open_storage, resolve_url

    heartbeat = Heartbeat.from_env()
    if heartbeat_interval is not None or grace_period is not None:
        heartbeat = replace(heartbeat, **{k: v for k, v in (("interval", heartbeat_interval),
                                                             ("grace", grace_period)) if v is not None})
    path = find_spec_file(spec)
    parsed = embed_csv(load_spec_file(path))
    studies.check_buildable(parsed, source=str(path))  # before the store is opened: a refusal leaves nothing
    warning = None
    if parsed.model == "cnn":
        from hpo.cnn import check_cnn_spec

        warning = check_cnn_spec(parsed)  # raises when no configuration fits the images
    created = studies.create(parsed, open_storage(storage, heartbeat=False), force=force, heartbeat=heartbeat,
                             source=str(path))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"created study {created.study_name!r} in {mask_url(resolve_url(storage))} "
               f"({parsed.model}, {parsed.metric}, budget {parsed.budget.n_trials} trials)")
    if parsed.data.files:
        click.echo("data in the store: " + ", ".join(
            f"{ref['name']} ({ref['rows']} rows, {size_text(ref['size'])}, sha256 {ref['sha256'][:12]})"
            for ref in parsed.data.files.values()))
    click.echo(f"next: hpo worker --study {created.study_name}")


@main.command()
@study_option
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="At most N trials from this worker.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S", help="Stop starting trials after S seconds.")
@gpu_option
@device_option
@click.option("--worker-index", type=click.IntRange(min=0), default=0, help="Extra sampler-seed offset; workers already get distinct seeds from the store.")
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@artifacts_option
def worker(study_name: str, storage: str | None, n_trials: int | None, timeout: float | None, gpu: int | None,
           device: str | None, worker_index: int, data_dir: str | None, artifacts: str | None) -> None:
    """Run trials of a study; any number of workers may share one store.

    Running trials are checkpointed under the artifact folder (checkpoints/STUDY/): a trial whose
    worker is stopped or dies resumes there on any worker that shares the folder."""
    from hpo.console import summary_text
    from hpo.devices import resolve_device
    from hpo.progress import Progress
    from hpo.worker import run_worker

    summary = run_worker(study_name, storage_url=storage, device=resolve_device(gpu=gpu, device=device),
                         n_trials=n_trials, timeout=timeout, worker_index=worker_index, data_dir=data_dir,
                         artifacts=artifacts, echo=click.echo, progress=Progress())
    click.echo(summary_text(summary))


def _register_stage_commands() -> None:
    from hpo.commands import bench, dashboard, export, fleet, launch, report, retrain, status

    for module in (status, retrain, report, export, dashboard, fleet, launch, bench):
        for command in module.COMMANDS:
            main.add_command(command)


_register_stage_commands()

if __name__ == "__main__":
    sys.exit(main())
