"""``hpo export-best`` and ``hpo predict``: the best trial as a folder, and that folder put to use."""

from pathlib import Path

import click

from hpo.commands.options import artifacts_option, storage_option, study_option


@click.command("export-best")
@study_option
@storage_option
@artifacts_option
@click.option("--out", default=None, metavar="DIR|-",
              help="Folder to write (default: storage/exports/<study>); '-' prints the best parameters alone.")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True,
              help="Format of the params, spec and statistics files (and of '--out -').")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--retrain", "retrain_id", default=None, metavar="ID", help="Export this retrain (default: the newest of the best trial).")
@click.option("--ensemble", type=click.Choice(["soft_vote", "majority_vote"]), default=None,
              help="Ensemble rule of a classifier (default soft_vote; regression always averages).")
@click.option("--trial", "trial_number", type=int, default=None, metavar="N",
              help="Export trial N (a study of several objectives needs it: one of its Pareto trials).")
def export_best(study_name: str, storage: str | None, artifacts: str | None, out: str | None, fmt: str,
                force: bool, retrain_id: str | None, ensemble: str | None, trial_number: int | None) -> None:
    """Export the best trial: parameters, spec, statistics and, after a retrain, the fold models."""
    import json

    from hpo.export.folder import MANIFEST, best_params_text
    from hpo.export.folder import export_best as export

    if out == "-":
        click.echo(best_params_text(study_name, storage_url=storage, fmt=fmt, trial_number=trial_number), nl=False)
        return
    from hpo.export.folder import default_export_dir

    out_dir = Path(out) if out else default_export_dir(study_name)
    folder = export(study_name, storage_url=storage, artifacts=artifacts, out=out_dir,
                    fmt=fmt, force=force, retrain_id=retrain_id, ensemble=ensemble, trial_number=trial_number)
    manifest = json.loads((folder / MANIFEST).read_text())
    click.echo(f"exported trial {manifest['trial_number']} of study {study_name!r} to {folder} "
               f"({len(manifest['files'])} files)")
    if manifest["weights"]:
        click.echo(f"weights of retrain {manifest['retrain_id']} ({manifest['ensemble']} ensemble); "
                   f"load with: hpo.load({str(folder)!r}) or hpo predict --model {folder} --input FILE")
    else:
        click.echo(f"no weights: {manifest['note']}")


@click.command()
@click.option("--model", "model_dir", required=True, metavar="DIR", help="A folder written by hpo export-best.")
@click.option("--input", "input_path", required=True, metavar="FILE", help="CSV (feature columns by name), .npy or IDX file, an image or a folder of images.")
@click.option("--output", "output_path", default=None, metavar="FILE|-",
              help="Where to write the predictions: .csv or .npy, or '-' for a CSV on standard output "
                   "(default: storage/predictions/<study>/<input name>.csv).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists, and predict on inputs clearly "
                                            "on another scale than the training inputs (refused otherwise).")
@click.option("--fold", type=click.IntRange(min=0), default=None, metavar="K", help="Use fold K's model alone instead of the ensemble.")
@click.option("--proba", is_flag=True, help="Also write a classifier's class probabilities (proba_<class> columns; "
                                            "each row sums to 1).")
def predict(model_dir: str, input_path: str, output_path: str | None, force: bool, fold: int | None,
            proba: bool) -> None:
    """Predict with an exported model on a file of raw inputs (in the training data's units)."""
    import warnings

    from hpo.export.loading import InputScaleWarning, predict_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputScaleWarning)
        written = predict_file(model_dir, input_path, output_path, fold=fold, force=force, proba=proba)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if written is not None:
        click.echo(f"wrote predictions to {written}")


COMMANDS = [export_best, predict]
