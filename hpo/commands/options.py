"""Options shared by several commands."""

import click

storage_option = click.option(
    "--storage", envvar="HPO_STORAGE", default=None, metavar="URL",
    help="SQLAlchemy URL of the store (default: $HPO_STORAGE, else sqlite:///storage/hpo.db).")
artifacts_option = click.option(
    "--artifacts", envvar="HPO_ARTIFACTS", default=None, metavar="DIR",
    help="Artifact folder (default: $HPO_ARTIFACTS, else artifacts/ beside a SQLite store, else storage/artifacts).")


def _study_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Checked before anything opens the store or a file: a study name becomes file names.
    from hpo.store.paths import check_study_name

    return value if value is None else check_study_name(value)


study_option = click.option("--study", "study_name", required=True, metavar="NAME", callback=_study_name,
                            help="Study name in the store.")
optional_study_option = click.option("--study", "study_name", default=None, metavar="NAME", callback=_study_name,
                                     help="Print the URL of this study's page first.")
version_mismatch_option = click.option(
    "--allow-version-mismatch", is_flag=True,
    help="Run a study whose model family is installed here at another version than it was created with "
         "(each trial, or a retrain's metrics.json, records the difference).")
gpu_option = click.option("--gpu", type=int, default=None, metavar="K", help="Run on CUDA device K.")
device_option = click.option("--device", default=None, metavar="DEV", help="cpu, cuda or cuda:K (default cpu).")
