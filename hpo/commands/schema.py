"""``hpo schema``: the JSON Schema of a spec, for editors (and ``studies/spec.schema.json``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("schema")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write the schema to FILE instead of printing it.")
@click.option("--builtin", is_flag=True,
              help="hpo's own model families and data sources only (what studies/spec.schema.json holds).")
def schema(out: Path | None, builtin: bool) -> None:
    """Print the JSON Schema of a spec, for the families and data sources installed here.

    Point an editor at it for completion and checks as you type, e.g. with the first line
    `# yaml-language-server: $schema=spec.schema.json` in a spec beside the file."""
    from hpo.spec.json_schema import installed_schema, render, spec_schema

    text = render(spec_schema() if builtin else installed_schema())
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    click.echo(f"wrote {out}")


COMMANDS = [schema]
