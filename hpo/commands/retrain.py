"""``hpo retrain``: the k-fold retrain of a study's best (or a chosen) trial."""

from __future__ import annotations

import click

from hpo.commands.options import artifacts_option, device_option, gpu_option, storage_option, study_option


def results_table(metrics: dict) -> str:
    """Per-fold and ensemble test results of one retrain as a text table."""
    name = metrics["metric"]
    lines = [f"{'model':16s} {'epochs':>6s} {'val_loss':>10s} {'val_' + name:>12s} {'test_loss':>10s} {'test_' + name:>13s}"]
    for f in metrics["per_fold"]:
        mark = " *" if f["fold"] == metrics["best_fold"] else ""
        lines.append(f"{'fold ' + str(f['fold']) + mark:16s} {f['epochs_run']:6d} {f['val_loss']:10.4g} "
                     f"{f['val_metric']:12.4g} {f['test_loss']:10.4g} {f['test_metric']:13.4g}")
    for ens, e in metrics["ensemble"].items():
        loss = f"{e['test_loss']:10.4g}" if "test_loss" in e else f"{'-':>10s}"
        lines.append(f"{ens:16s} {'':6s} {'':10s} {'':12s} {loss} {e['test_metric']:13.4g}")
    tie_note = " (breaks majority-vote ties)" if "majority_vote" in metrics["ensemble"] else ""
    lines.append(f"* best fold on validation{tie_note}")
    return "\n".join(lines)


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
@click.option("--data-dir", default=None, metavar="DIR", help="Folder holding the data set files (image studies).")
@storage_option
@artifacts_option
def retrain(study_name: str, folds: int | None, trial_number: int | None, gpu: int | None, device: str | None,
            stacked: bool | None, data_dir: str | None, storage: str | None, artifacts: str | None) -> None:
    """Retrain a trial on K folds of all training data; save fold models, predictions and ensembles."""
    from hpo.devices import resolve_device
    from hpo.retrain import run_retrain

    saved: list[dict] = []
    record = run_retrain(study_name, storage_url=storage, artifacts=artifacts, folds=folds, trial_number=trial_number,
                         device=resolve_device(gpu=gpu, device=device), data_dir=data_dir,
                         stacked=stacked, echo=click.echo, on_metrics=saved.append)
    metrics = saved[0]
    click.echo(results_table(metrics))
    rate = metrics["model_epochs_per_s"]
    click.echo(f"trained {metrics['folds']} models ({metrics['path']}) in {metrics['train_seconds']:.1f}s"
               + (f", {rate:.1f} model-epochs/s" if rate else ""))
    click.echo(f"saved retrain {record.id} (trial #{record.trial_number}); see: hpo report --study {study_name}")


COMMANDS = [retrain]
