"""``hpo report``: one self-contained HTML file per study."""

import click

from hpo.commands.options import artifacts_option, storage_option, study_option


@click.command()
@study_option
@storage_option
@artifacts_option
@click.option("--out", default=None, metavar="PATH", help="HTML file to write (default: storage/reports/<study>.html).")
def report(study_name: str, storage: str | None, artifacts: str | None, out: str | None) -> None:
    """Write the study's HTML report: statistics, Optuna's figures, the latest retrain, model insight."""
    import time

    from hpo.report.html import write_report

    start = time.perf_counter()
    path = write_report(study_name, storage_url=storage, artifacts=artifacts, out=out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s); "
               f"open it in a browser, no network needed")


COMMANDS = [report]
