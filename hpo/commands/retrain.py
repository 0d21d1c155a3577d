"""``hpo retrain``: the k-fold retrain of a study's best (or a chosen) trial."""

from __future__ import annotations

import click

from hpo.commands.options import (
    artifacts_option,
    device_option,
    gpu_option,
    storage_option,
    study_option,
    version_mismatch_option,
)


@click.command()
@study_option
@click.option("--folds", type=click.IntRange(min=2), default=None, metavar="K",
              help="Number of folds (default: the spec's retrain.folds).")
@click.option("--trial", "trial_number", type=click.IntRange(min=0), default=None, metavar="N",
              help="Retrain trial N (default: the best complete trial).")
@gpu_option
@device_option
@click.option("--stacked/--sequential", default=None,
              help="Train the K models together (torch.func) or one after another (default: stacked on a GPU).")
@click.option("--full-data/--search-data", "full_data", default=None,
              help="Train on the whole training pool, or on the data the search used (default: the search's: "
                   "the spec's train_subset and val_subset).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Epochs per fold model (default: the spec's retrain.epochs, else the trial's).")
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@click.option("--resume", is_flag=True,
              help="Continue the study's latest unfinished retrain from its checkpoint (finished folds are kept).")
@version_mismatch_option
@click.option("--reuse-cv", is_flag=True,
              help="A cross-validated study: take the trial's own fold models (kept for the study's best trial) "
                   "instead of training them again; refused when its folds or epochs differ.")
@storage_option
@artifacts_option
def retrain(study_name: str, folds: int | None, trial_number: int | None, gpu: int | None, device: str | None,
            stacked: bool | None, full_data: bool | None, epochs: int | None, data_dir: str | None, resume: bool,
            allow_version_mismatch: bool, reuse_cv: bool, storage: str | None, artifacts: str | None) -> None:
    """Retrain a trial on K folds of the data the search used (or all of it with --full-data); save
    fold models, predictions and ensembles.

    The retrain checkpoints as it goes (the spec's checkpoint settings): after a kill, or a stop by
    SIGINT/SIGTERM, continue it with --resume."""
    from hpo.console import retrain_table, trained_line
    from hpo.retrain.run import run_retrain
    from hpo.running.devices import resolve_device
    from hpo.running.progress import Progress
    from hpo.training.boundary import Interrupted

    try:
        record = run_retrain(study_name, storage_url=storage, artifacts=artifacts, folds=folds,
                             trial_number=trial_number, device=resolve_device(gpu=gpu, device=device),
                             data_dir=data_dir, stacked=stacked, resume=resume, full_data=full_data,
                             epochs=epochs, echo=click.echo, progress=Progress(),
                             allow_version_mismatch=allow_version_mismatch, reuse_cv=reuse_cv)
    except Interrupted as e:
        click.echo(f"retrain {e}; continue it with: hpo retrain --study {study_name} --resume" if e.saved
                   else f"retrain {e}; nothing to resume", err=True)
        raise
    click.echo(retrain_table(record.metrics.to_dict()))
    click.echo(trained_line(record.metrics.to_dict()))
    click.echo(f"saved retrain {record.id} (trial #{record.trial_number}); see: hpo report --study {study_name}")


COMMANDS = [retrain]
