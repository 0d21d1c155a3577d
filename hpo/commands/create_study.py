"""``hpo create-study``: validate a spec, put its data in the store, create the study."""

import click

from hpo.commands.options import storage_option


@click.command("create-study")
@click.argument("spec")
@storage_option
@click.option("--force", is_flag=True, help="Delete an existing study of the same name first.")
@click.option("--heartbeat-interval", type=int, default=None, metavar="S",
              help="Seconds between a running trial's heartbeats, for every worker of the study "
                   "(default: $HPO_HEARTBEAT_INTERVAL, else 10).")
@click.option("--grace-period", type=int, default=None, metavar="S",
              help="Seconds without a heartbeat after which a trial's worker counts as dead and the trial is "
                   "re-queued (default: $HPO_GRACE_PERIOD, else 30; longer than the interval).")
@click.option("--warm-start", "warm_start", default=None, metavar="OTHER",
              help="Queue the best configurations of study OTHER (same store) that fit this space, to run first.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, metavar="K",
              help="With --warm-start: how many of OTHER's best complete trials.")
def create_study(spec: str, storage: str | None, force: bool, heartbeat_interval: int | None,
                 grace_period: int | None, warm_start: str | None, top: int) -> None:
    """Create a study from SPEC: a name in studies/ (e.g. regression) or a YAML path."""
    from hpo.data.tables import size_text
    from hpo.search.grid import grid_note
    from hpo.search.study import create_from_file
    from hpo.store.config import Heartbeat, mask_url, resolve_url

    heartbeat = Heartbeat.from_env(interval=heartbeat_interval, grace=grace_period)
    other = None
    if warm_start is not None:
        from hpo.search.warm import open_other

        other = open_other(warm_start, storage)  # before anything is written: an unknown study is refused
    created, parsed, warnings = create_from_file(spec, storage_url=storage, force=force, heartbeat=heartbeat)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"created study {created.study_name!r} in {mask_url(resolve_url(storage))} "
               f"({parsed.model}, {'/'.join(parsed.metric_names)}, budget {parsed.budget.n_trials} trials)")
    note = grid_note(parsed)
    if note:
        click.echo(f"note: {note}")
    if parsed.data.files:
        click.echo("data in the store: " + ", ".join(
            f"{ref['name']} ({ref['rows']} rows, {size_text(ref['size'])}, sha256 {ref['sha256'][:12]})"
            for ref in parsed.data.files.values()))
    if other is not None:
        from hpo.search.warm import best_sets, enqueue

        sets, skipped = best_sets(other, parsed, top)
        for line in skipped:
            click.echo(f"warm start: skipped {line}")
        click.echo(f"warm start: queued {enqueue(created, sets)} of the best {top} trials of {warm_start!r}")
    click.echo(f"next: hpo worker --study {created.study_name}")


COMMANDS = [create_study]
