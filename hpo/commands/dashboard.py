"""``hpo dashboard``: optuna-dashboard on the study store."""

import click

from hpo.commands.options import artifacts_option, optional_study_option, storage_option


@click.command()
@optional_study_option
@storage_option
@artifacts_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback is reachable by others.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
def dashboard(study_name: str | None, storage: str | None, artifacts: str | None, host: str, port: int) -> None:
    """Browse the studies, their trials and retrain artifacts in optuna-dashboard."""
    from hpo.report.dashboard import serve

    serve(storage_url=storage, artifacts=artifacts, host=host, port=port, study_name=study_name, echo=click.echo)


COMMANDS = [dashboard]
