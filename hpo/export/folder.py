"""Export a study's best result as a self-contained folder that ``hpo.load`` turns into a module.

The folder holds:
- ``params.<fmt>``: the exported trial's number, value and parameters (and the resolved
  hyperparameters): the best trial's, or the retrained trial's when a retrain is exported;
- ``spec.<fmt>``: the full study spec; ``study.<fmt>``: the study statistics;
- when a retrain of the best trial exists: ``fold_<i>.pt`` (state dicts), ``metrics.json`` (the
  retrain's numbers) and ``model.json`` (family, shapes, hyperparameters, normalisation, classes,
  feature names, the ensemble rule and, for retrains since they are recorded, the training inputs'
  raw statistics ``input_stats`` that ``hpo predict`` checks inputs against);
- ``manifest.json``: versions of hpo, torch and optuna, and the sha256 of every other file.

The folder is written under a temporary name beside ``out`` and renamed at the end, so a failed
export leaves nothing half-written.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hpo.data.checksum import sha256_file
from hpo.errors import HpoError

if TYPE_CHECKING:  # optuna stays out of ``hpo.load``'s imports
    import optuna

    from hpo.retrain.results import RetrainRecord
    from hpo.spec.schema import StudySpec

FORMATS = ("json", "yaml")
ENSEMBLE_RULES = {"regression": ("mean",), "classification": ("soft_vote", "majority_vote")}
MANIFEST = "manifest.json"
MODEL = "model.json"
EXPORT_FORMAT = "hpo-export/1"


def dumps(data: Any, fmt: str) -> str:
    """``data`` as JSON (indented) or YAML (in key order)."""
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    from hpo.export.json_text import strict_dumps

    return strict_dumps(data) + "\n"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("hpo", "torch", "optuna"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def default_export_dir(study_name: str) -> Path:
    """``storage/exports/<study>``.

    Raises:
        HpoError: a study name that would leave that folder (``hpo.store.paths``).
    """
    from hpo.store.config import STORAGE_ROOT
    from hpo.store.paths import name_in

    return name_in(STORAGE_ROOT / "exports", study_name, what="study name")


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is a real folder (not a link) that ``export-best`` wrote (it holds a
    ``manifest.json``), or an empty one: the only things ``--force`` replaces."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return (folder / MANIFEST).is_file() or not any(folder.iterdir())


def _check_out(out: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that names no folder of its own, or one that ``--force`` may not replace."""
    if out.name in ("", ".", ".."):
        raise HpoError(f"--out: got {str(out)!r}; name the folder to create (not '.', '..' or a root)")
    try:
        taken = out.exists() or out.is_symlink()
    except OSError as e:  # e.g. a name too long for the file system
        raise _cannot_write(out, e) from e
    if taken and not force:
        raise HpoError(f"--out: {out} already exists; pass --force to replace it")
    if taken and not is_export(out):
        raise HpoError(f"--out: {out} exists and is not an export folder (no {MANIFEST}); --force replaces only "
                       f"a folder that hpo export-best wrote: remove it yourself or choose another --out")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise HpoError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")


def study_and_trial(study_name: str, storage_url: str | None,
                    trial_number: int | None = None) -> tuple[optuna.Study, StudySpec, optuna.trial.FrozenTrial]:
    """The study, its spec and its best trial (or trial ``trial_number``, COMPLETE).

    Raises:
        StoreError: no such study. HpoError: the study has no complete trial yet; it has several
            objectives and no ``trial_number`` (listing its Pareto trials); ``trial_number`` is not
            a COMPLETE trial of it.
    """
    import optuna

    from hpo.search.pareto import needs_trial
    from hpo.search.study import open_study
    from hpo.store.budget import more_trials_hint

    study, spec = open_study(study_name, storage_url)
    if trial_number is not None:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials) or trials[trial_number].state != optuna.trial.TrialState.COMPLETE:
            complete = [t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            raise HpoError(f"--trial: got {trial_number}; allowed: a COMPLETE trial of study {study_name!r} "
                           f"({', '.join(map(str, complete[:20])) or 'none yet'}{' ...' if len(complete) > 20 else ''})")
        return study, spec, trials[trial_number]
    if spec.multi_objective:
        raise needs_trial(study, "hpo export-best")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise HpoError(f"study {study_name!r} has no complete trial yet, so there is no best trial to export; "
                       f"{more_trials_hint(study, spec.budget.n_trials)}")
    return study, spec, study.best_trial


def best_params(study: optuna.Study, spec: StudySpec, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
    from hpo.search.space import hyperparams_from_params

    return {
        "study": study.study_name,
        "trial_number": best.number,
        **({"metric": spec.metric, "direction": spec.direction, "value": best.value} if not spec.multi_objective else
           {"metrics": spec.metric_names, "directions": spec.directions, "values": list(best.values)}),
        "params": dict(best.params),
        "hyperparams": hyperparams_from_params(spec, best.params),
    }


def best_params_text(study_name: str, *, storage_url: str | None = None, fmt: str = "json",
                     trial_number: int | None = None) -> str:
    """The best trial's (or trial ``trial_number``'s) parameters alone, as JSON or YAML (for ``--out -``)."""
    _check_format(fmt)
    _, _, best = study_and_trial(study_name, storage_url, trial_number)
    return dumps(dict(best.params), fmt)


def _pick_retrain(study: optuna.Study, best_number: int, retrain_id: str | None) -> tuple[RetrainRecord | None, str]:
    """The retrain to export and, when there is none, the sentence saying why and what to run."""
    from hpo.retrain.results import list_retrains, load_retrain

    if retrain_id is not None:
        return load_retrain(study, retrain_id), ""
    retrains = list_retrains(study)
    of_best = [r for r in retrains if r.trial_number == best_number]
    if of_best:
        return of_best[-1], ""
    others = sorted({r.trial_number for r in retrains})
    why = (f"the retrains are of trial(s) {', '.join(map(str, others))}, not of the best trial {best_number}"
           if others else "the study has no retrain yet")
    chosen = f" --trial {best_number}" if len(study.directions) > 1 else ""
    return None, f"{why}; weights come from: hpo retrain --study {study.study_name}{chosen}"


def _model_description(folder: Path, record: RetrainRecord, spec: StudySpec, ensemble: str | None) -> dict:
    from hpo.retrain.results import read_json

    model = read_json(folder, MODEL)
    task = model.get("task", spec.task)
    rules = ENSEMBLE_RULES[task]
    rule = ensemble or rules[0]
    if rule not in rules:
        raise HpoError(f"--ensemble: got {rule!r}; a {task} model allows: {', '.join(rules)}")
    model.update(
        task=task,
        ensemble=rule,
        ensemble_rules=list(rules),
        folds=record.folds,
        weights=[f"fold_{i}.pt" for i in range(record.folds)],
        retrain_id=record.id,
        trial_number=record.trial_number,
        data_source=spec.data.source,
    )
    if (folder / "metrics.json").is_file():
        model["tie_breaker"] = int(read_json(folder, "metrics.json").get("best_fold", 0))
    if spec.data.source == "csv":
        model.update(features=list(spec.data.features), target=spec.data.target)
    return model


def _write_weights(staging: Path, record: RetrainRecord, artifact_store, spec: StudySpec, ensemble: str | None) -> dict:
    needed = [MODEL, *(f"fold_{i}.pt" for i in range(record.folds))]
    from hpo.retrain.results import fetch_files

    missing = [name for name in needed if name not in record.files]
    if missing:
        raise HpoError(f"retrain {record.id} lacks {', '.join(missing)}; run hpo retrain again")
    with tempfile.TemporaryDirectory(prefix="hpo-export-") as tmp:
        fetched = fetch_files(artifact_store, record, Path(tmp), names=[*needed, "metrics.json"])
        model = _model_description(fetched, record, spec, ensemble)
        for name in model["weights"] + (["metrics.json"] if "metrics.json" in record.files else []):
            shutil.copyfile(fetched / name, staging / name)
    (staging / MODEL).write_text(dumps(model, "json"))
    return model


def export_best(study_name: str, *, storage_url: str | None = None, artifacts: str | None = None, out: Path,
                fmt: str = "json", force: bool = False, retrain_id: str | None = None,
                ensemble: str | None = None, trial_number: int | None = None) -> Path:
    """Write the export folder of a study's best trial.

    Args:
        out: the folder to create.
        fmt: ``json`` or ``yaml`` for the params, spec and statistics files.
        force: replace ``out`` when it exists and is an export folder (or an empty folder): never
            anything else.
        retrain_id: export this retrain (default: the newest retrain of the best trial).
        ensemble: the ensemble rule of a classifier (``soft_vote`` by default, or ``majority_vote``).
        trial_number: export this COMPLETE trial instead of the best (required with several
            objectives: there is no single best).

    Returns:
        The folder. Its ``manifest.json`` says ``"weights": false`` with a ``note`` naming the
        command to run when the best trial has no retrain.

    Raises:
        HpoError: unknown study, no complete trial, ``out`` exists without ``force`` (or is not an
            export folder), names no folder of its own (``.``, ``..``, ``/``), a bad format
            or ensemble rule, a retrain whose files are missing, or ``out`` cannot be written
            (naming the file and the file system's reason).
    """
    from hpo.store.artifacts import open_artifact_store
    _check_format(fmt)
    out = Path(out)
    _check_out(out, force=force)
    study, spec, best = study_and_trial(study_name, storage_url, trial_number)
    record, note = _pick_retrain(study, best.number, retrain_id)
    # The params file describes the trial whose weights are exported (``--retrain`` may name another trial's).
    trial = best if record is None or record.trial_number == best.number \
        else study.get_trials(deepcopy=False)[record.trial_number]

    try:
        return _write_export(out, study, spec, trial, record, note, fmt=fmt, ensemble=ensemble,
                             artifact_store=lambda: open_artifact_store(storage_url, artifacts))
    except OSError as e:
        raise _cannot_write(out, e) from e


def _family_of(folder: Path) -> dict[str, str] | None:
    """The model family of the exported weights, with the distribution and version that trained
    them (what ``hpo.load`` needs installed); None without weights."""
    if not (folder / MODEL).is_file():
        return None
    d = json.loads((folder / MODEL).read_text())
    return {"name": d["family"], "distribution": d.get("distribution", "hpo"), "version": d.get("version", "?")}


def _cannot_write(out: Path, e: OSError) -> HpoError:
    where = "" if e.filename in (None, str(out)) else f"{e.filename}: "
    return HpoError(f"--out: cannot write the export {out}: {where}{e.strerror or e}")


def _write_export(out: Path, study: optuna.Study, spec: StudySpec, trial: optuna.trial.FrozenTrial,
                  record: RetrainRecord | None, note: str, *, fmt: str, ensemble: str | None, artifact_store) -> Path:
    from hpo.store.statistics import summarize

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / f"params.{fmt}").write_text(dumps(best_params(study, spec, trial), fmt))
        (staging / f"spec.{fmt}").write_text(dumps(spec.to_dict(), fmt))
        (staging / f"study.{fmt}").write_text(dumps(asdict(summarize(study)), fmt))
        model = None
        if record is not None:
            model = _write_weights(staging, record, artifact_store(), spec, ensemble)
        manifest = {
            "format": EXPORT_FORMAT,
            "study": study.study_name,
            "trial_number": trial.number,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "weights": record is not None,
            "retrain_id": record.id if record else None,
            "ensemble": model["ensemble"] if model else None,
            "note": note,
            "versions": versions(),
            "model_family": _family_of(staging),
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(staging.iterdir())},
        }
        (staging / MANIFEST).write_text(dumps(manifest, "json"))
        _check_out(out, force=True)  # again: something may have appeared there meanwhile
        if out.exists():
            # The old export moves aside in one rename and goes only once the new one is in place.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
