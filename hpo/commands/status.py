"""``hpo studies`` and ``hpo status``: study statistics from aggregate queries (see ``hpo.store.statistics``)."""

import click

from hpo.commands.options import storage_option, study_option


@click.command("studies")
@storage_option
def studies(storage: str | None) -> None:
    """List the studies in the store with trial counts and best values."""
    from hpo.console import studies_table
    from hpo.store.statistics import summaries
    from hpo.store.storage import open_storage
    click.echo(studies_table(summaries(open_storage(storage, heartbeat=False))))


@click.command()
@study_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def status(study_name: str, storage: str | None, as_json: bool) -> None:
    """Study statistics: finished, pruned, complete, failed trials, best value and parameters."""
    from dataclasses import asdict

    from hpo import console
    from hpo.search.study import study_id
    from hpo.store.statistics import summary
    from hpo.store.storage import open_storage

    store = open_storage(storage, heartbeat=False)
    s = summary(store, study_id(store, study_name))
    click.echo(console.as_json(asdict(s)) if as_json else console.summary_text(s))


COMMANDS = [studies, status]
