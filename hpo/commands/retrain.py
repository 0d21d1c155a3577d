"""``hpo retrain``: the k-fold retrain of a study's best (or a chosen) trial."""

from __future__ import annotations

from statistics import fmean, pstdev

import click

from hpo.commands.options import (
    artifacts_option,
    device_option,
    gpu_option,
    storage_option,
    study_option,
)

ENSEMBLE_LABELS = {"mean": "ensemble mean", "majority_vote": "majority vote", "soft_vote": "soft vote"}


def _sig(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept (0.8900, 0.01234, 1235)."""
    if value is None:
        return "-"
    text = f"{value:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text


def results_table(metrics: dict) -> str:
    """Per-fold and ensemble test results of one retrain as a text table.

    Rows: each fold model (the best on validation starred), the folds' mean ± std, then each
    ensemble's own score (the ensemble-mean model for regression; the votes for classifiers).
    A loss column that repeats the metric's (the MSE loss of a regression) is left out; every
    number has 4 significant digits.
    """
    name, folds = metrics["metric"], metrics["per_fold"]
    ensembles = metrics["ensemble"]
    columns = [("val_loss", "val_loss"), (f"val_{name}", "val_metric"),
               ("test_loss", "test_loss"), (f"test_{name}", "test_metric")]

    def repeats(loss: str, metric: str) -> bool:
        rows = [*folds, *ensembles.values()]
        return all(r.get(loss) is None or r.get(loss) == r.get(metric) for r in rows)

    columns = [(h, k) for h, k in columns
               if not (k.endswith("_loss") and repeats(k, k.replace("_loss", "_metric")))]
    rows = [["model", "epochs", *(h for h, _ in columns)]]
    for f in folds:
        mark = " *" if f["fold"] == metrics["best_fold"] else ""
        rows.append([f"fold {f['fold']}{mark}", str(f["epochs_run"]), *(_sig(f[k]) for _, k in columns)])
    if len(folds) > 1:
        spread = [f"{_sig(fmean(v))} ± {_sig(pstdev(v))}"
                  for v in ([f[k] for f in folds] for _, k in columns)]
        rows.append(["folds: mean ± std", "", *spread])
    for ens, e in ensembles.items():
        rows.append([ENSEMBLE_LABELS.get(ens, ens), "", *("" if k.startswith("val_") else _sig(e.get(k)) for _, k in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    tie_note = " (breaks majority-vote ties)" if "majority_vote" in ensembles else ""
    lines.append(f"* best fold on validation{tie_note}")
    return "\n".join(lines)


def trained_line(metrics: dict) -> str:
    """How many models trained, how, how long, and at how many model-epochs per second (3 significant
    digits: a slow CPU retrain's 0.0333 is not 0.0)."""
    rate = metrics["model_epochs_per_s"]
    return (f"trained {metrics['folds']} models ({metrics['path']}) in {metrics['train_seconds']:.1f}s"
            + (f", {_sig(rate, 3)} model-epochs/s" if rate else ""))


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
@click.option("--allow-version-mismatch", is_flag=True,
              help="Retrain with the study's model family installed here at another version (recorded in metrics.json).")
@storage_option
@artifacts_option
def retrain(study_name: str, folds: int | None, trial_number: int | None, gpu: int | None, device: str | None,
            stacked: bool | None, full_data: bool | None, epochs: int | None, data_dir: str | None, resume: bool,
            allow_version_mismatch: bool, storage: str | None, artifacts: str | None) -> None:
    """Retrain a trial on K folds of the data the search used (or all of it with --full-data); save
    fold models, predictions and ensembles.

    The retrain checkpoints as it goes (the spec's checkpoint settings): after a kill, or a stop by
    SIGINT/SIGTERM, continue it with --resume."""
    from hpo.retrain.checkpoint import RetrainInterrupted
    from hpo.retrain.run import run_retrain
    from hpo.running.devices import resolve_device
    from hpo.running.progress import Progress

    saved: list[dict] = []
    try:
        record = run_retrain(study_name, storage_url=storage, artifacts=artifacts, folds=folds,
                             trial_number=trial_number, device=resolve_device(gpu=gpu, device=device),
                             data_dir=data_dir, stacked=stacked, resume=resume, full_data=full_data,
                             epochs=epochs, echo=click.echo, on_metrics=saved.append, progress=Progress(),
                             allow_version_mismatch=allow_version_mismatch)
    except RetrainInterrupted as e:
        click.echo(f"retrain {e}; continue it with: hpo retrain --study {study_name} --resume", err=True)
        raise
    metrics = saved[0]
    click.echo(results_table(metrics))
    click.echo(trained_line(metrics))
    click.echo(f"saved retrain {record.id} (trial #{record.trial_number}); see: hpo report --study {study_name}")


COMMANDS = [retrain]
