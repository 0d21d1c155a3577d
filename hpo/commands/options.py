"""Options shared by several commands."""

import click

storage_option = click.option(
    "--storage", envvar="HPO_STORAGE", default=None, metavar="URL",
    help="SQLAlchemy URL of the store (default: $HPO_STORAGE, else sqlite:///storage/hpo.db).")
artifacts_option = click.option(
    "--artifacts", envvar="HPO_ARTIFACTS", default=None, metavar="DIR",
    help="Artifact folder (default: $HPO_ARTIFACTS, else artifacts/ beside a SQLite store, else storage/artifacts).")
study_option = click.option("--study", "study_name", required=True, metavar="NAME", help="Study name in the store.")
gpu_option = click.option("--gpu", type=int, default=None, metavar="K", help="Run on CUDA device K.")
device_option = click.option("--device", default=None, metavar="DEV", help="cpu, cuda or cuda:K (default cpu).")
