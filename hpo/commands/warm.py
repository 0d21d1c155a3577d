"""``hpo enqueue``: parameter sets to run first (``hpo.search.warm``)."""

import click

from hpo.commands.options import storage_option, study_option


@click.command()
@study_option
@storage_option
@click.option("--params", "path", required=True, metavar="FILE",
              help="A YAML or JSON list of parameter sets ({lr: 0.001, n_layers: 2, ...}); left-out parameters are sampled.")
def enqueue(study_name: str, storage: str | None, path: str) -> None:
    """Queue parameter sets: the next workers run each exactly once, before new trials, within the budget."""
    from hpo.search.warm import enqueue_file

    n = enqueue_file(study_name, path, storage_url=storage)
    click.echo(f"queued {n} parameter set(s) in study {study_name!r}; they run first: hpo worker --study {study_name}")


COMMANDS = [enqueue]
