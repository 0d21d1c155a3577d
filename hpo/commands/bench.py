"""``hpo bench``: the trainer, graph vs eager, workers sharing a device, and the stacked retrain, measured in one run."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--device", default=None, metavar="DEV",
              help="cuda:K or cpu (default: cuda:0 when a GPU is visible, else cpu).")
@click.option("--data-dir", default=None, metavar="DIR",
              help="Folder with the Fashion-MNIST IDX files (default: hpo's usual places; synthetic images when none).")
@click.option("--quick", is_flag=True, help="Smaller sizes: under 2 minutes on two CPU cores.")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Also write the report as JSON to OUT.")
@click.pass_context
def bench(ctx: click.Context, device: str | None, data_dir: str | None, quick: bool, json_out: str | None) -> None:
    """Measure this machine: DataLoader loop vs hpo trainer, graph vs eager, N workers, stacked retrain.

    Exits 1 when a check fails (a part that crashed, failed trials, a CUDA step that ran eagerly).
    """
    import torch

    from hpo.bench import format_table, run_bench
    from hpo.errors import HpoError
    from hpo.running.devices import resolve_device

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device=device)
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise HpoError(f"--json: {json_out!r} is in a folder that does not exist; give a path in an existing folder")
    report = run_bench(device=dev, data_dir=data_dir, quick=quick,
                       echo=lambda line: click.echo(line, err=True))
    click.echo(format_table(report))
    if json_out:
        from hpo.export.json_text import strict_dumps

        Path(json_out).write_text(strict_dumps(report, indent=1, default=str))
        click.echo(f"wrote {json_out}")
    if report["problems"]:
        ctx.exit(1)


COMMANDS = [bench]
