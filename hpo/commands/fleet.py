"""``hpo fleet``: start several workers on one machine (pinned to GPUs, or on the CPU) and supervise them."""

from __future__ import annotations

import click

from hpo.commands.options import artifacts_option, storage_option, study_option, version_mismatch_option


@click.command("fleet")
@study_option
@storage_option
@click.option("--gpus", default=None, metavar="LIST", help="GPU indices, e.g. 0,1; each worker is pinned to one.")
@click.option("--per-gpu", type=click.IntRange(min=1), default=1, show_default=True, help="Workers per GPU.")
@click.option("--device", default=None, metavar="DEV", help="Device of every worker without --gpus (default cpu).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Number of workers without --gpus.")
@click.option("--mps/--no-mps", default=None,
              help="Share each GPU through CUDA MPS (default: when two or more workers use one GPU). "
                   "--mps forces it, whatever the workers' devices.")
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="At most N trials per worker.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S", help="Stop starting trials after S seconds.")
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Restart a crashed worker at most this many times.")
@version_mismatch_option
@artifacts_option
def fleet(study_name: str, storage: str | None, gpus: str | None, per_gpu: int, device: str | None,
          workers: int | None, mps: bool | None, n_trials: int | None, timeout: float | None, data_dir: str | None,
          max_restarts: int, allow_version_mismatch: bool, artifacts: str | None) -> None:
    """Start several `hpo worker` processes on this machine and supervise them.

    Ctrl-C or SIGTERM stops them all cleanly (running trials are re-queued); a second one kills them.
    A worker that crashes or loses the store (exit 75) is restarted (--max-restarts). With several workers on one GPU the fleet
    starts the CUDA MPS daemon unless one runs, and stops it at the end.
    """
    from hpo.console import summary_text
    from hpo.running.fleet import check_study, exit_text, plan, run_fleet, worker_command
    from hpo.search.study import open_study
    from hpo.store.statistics import summarize

    members = plan(gpus=gpus, per_gpu=per_gpu, device=device, workers=workers)
    check_study(study_name, storage)  # fail fast, once, on a bad store or name
    click.echo(f"fleet: {len(members)} workers on study {study_name!r}")
    command = worker_command(study_name, n_trials=n_trials, timeout=timeout, data_dir=data_dir, artifacts=artifacts,
                             allow_version_mismatch=allow_version_mismatch)
    result = run_fleet(members, command, mps=mps, max_restarts=max_restarts, echo=click.echo, storage=storage)
    failed = [f"w{i}={exit_text(c)}" for i, c in enumerate(result.codes) if c != 0]
    restarted = [f"w{i} {n}x" for i, n in enumerate(result.restarts) if n]
    click.echo(f"fleet: all workers stopped ({'exit codes ' + ' '.join(failed) if failed else 'all exit 0'}"
               + (f"; restarted: {' '.join(restarted)}" if restarted else "") + ")")
    study, _ = open_study(study_name, storage)
    click.echo(summary_text(summarize(study)))  # once for the fleet, not once per worker
    if result.failed:
        raise SystemExit(1)


COMMANDS: list = [fleet]
