"""The ``hpo`` command line: parses, calls the library, prints. No logic of its own.

Errors the user can fix (``HpoError``, and the file system's refusals of a named file) are printed
on one line with exit code 2; a store that stays unreachable longer than ``HPO_STORE_RETRY`` exits
75, a full store 74 (``hpo.errors``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import warnings

import click

from hpo.errors import HpoError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpoError as e:
            if ctx.meta.get("hpo_debug"):
                raise
            click.echo(f"hpo: error: {e}", err=True)
            ctx.exit(e.exit_code)
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
    # A per-layer choice is a list (filters: {choice: [[6, 16], [32, 64]]}): Optuna warns that it
    # may not persist, but its JSON storage gives such a choice back equal (tests/search/test_space.py).
    warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be a tuple",
                            category=UserWarning)


def _register_commands() -> None:
    from hpo.commands import (
        bench,
        control,
        create_study,
        dashboard,
        export,
        families,
        fleet,
        launch,
        report,
        retrain,
        schema,
        status,
        warm,
        worker,
    )

    for module in (create_study, worker, status, control, retrain, report, export, dashboard, fleet, launch, bench,
                   families, warm, schema):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    sys.exit(main())
