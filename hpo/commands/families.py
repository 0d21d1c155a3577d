"""``hpo families``: the installed model families and data sources, with their hyperparameters."""

import click


@click.command()
def families() -> None:
    """List the installed model families (with their hyperparameters) and data sources."""
    from hpo.data import registry as sources
    from hpo.nn import registry
    from hpo.spec.domains import show

    click.echo("model families (model: NAME; every family also takes the training settings: "
               "epochs, batch_size, lr, optimizer, ...):")
    for name, e in registry.installed().items():
        click.echo(f"  {name}  ({e.distribution} {e.version}, {e.value})")
        if e.obj is None:
            click.echo(f"    cannot be used: {e.problem}")
            continue
        fam = e.obj
        flags = [f for f, on in (("images", fam.image_input), ("not stackable", not fam.stackable)) if on]
        if fam.description or flags:
            click.echo(f"    {fam.description}{' [' + ', '.join(flags) + ']' if flags else ''}")
        for hp_name, p in fam.hyperparameters.items():
            layers = f", one per layer of {p.per_layer}" if p.per_layer else ""
            click.echo(f"    {hp_name}: {p.domain}{layers} (default {show(p.default)})")
    click.echo("data sources (data.source: NAME):")
    click.echo(f"  {', '.join(sources.LEGACY)}  (hpo, built in)")
    for name in sources.names()[len(sources.LEGACY):]:
        try:
            e = sources.entry(name)
        except Exception as err:  # a broken plugin: listed with its reason, like a broken family
            click.echo(f"  {name}  cannot be used: {err}")
            continue
        click.echo(f"  {name}  ({e.distribution} {e.version}): {e.obj.description}")


COMMANDS = [families]
