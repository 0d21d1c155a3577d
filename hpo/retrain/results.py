"""Retrain results as artifacts of the study: written by ``hpo retrain``, read by report and export.

Each retrain is a set of files uploaded to the artifact store. Optuna refuses artifacts on a
finished trial, so they are attached to the study and linked to the retrained trial under
optuna-dashboard's ``dashboard:artifacts:<trial_id>:<artifact_id>`` key (shown in that trial's view). The study's user attrs record them:
``hpo_retrain:<id>`` holds the record below, ``hpo_retrain_latest`` the newest id. A new retrain
never overwrites an older one.

Files of one retrain (names are the keys of ``RetrainRecord.files``):
- ``metrics.json``: the fields of :class:`RetrainMetrics`, which documents each.
- ``curves.json``: {"folds": [{"epoch": [...], "train_loss": [...], "val_loss": [...], "val_metric": [...]}]}.
- ``predictions.npz``: y_test, fold_outputs (K, N, C), and for regression ensemble_mean, grid_x,
  grid_best, grid_mean; for classification majority_vote, soft_vote.
- ``model.json``: family, in_shape, out_features, task, hyperparams, normalization, classes,
  input_stats (the training inputs' raw min, max, mean, std: ``hpo.data.dataset.raw_input_stats``).
- ``fold_<i>.pt``: each fold model's ``state_dict`` (load with ``weights_only=True``).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from hpo.errors import HpoError
from hpo.store import optuna_private
from hpo.store.paths import name_in

ARTIFACTS_ATTR_PREFIX = "artifacts:"  # optuna.artifacts' study system-attr key
DASHBOARD_TRIAL_PREFIX = "dashboard:artifacts:"  # optuna-dashboard's per-trial link
RECORD_PREFIX = "hpo_retrain:"
LATEST_ATTR = "hpo_retrain_latest"


@dataclass(frozen=True)
class RetrainMetrics:
    """What one retrain measured: the contents of its ``metrics.json``, key for key (JSON order).

    ``val_*`` scores are on each fold's held-out part of the pool, ``test_*`` on the test set;
    ``metric`` names the score behind every ``*_metric`` (``accuracy`` for classification, ``mse``
    otherwise).
    """

    task: str  # "classification" | "regression"
    folds: int  # K
    seed: int  # the spec's seed: the folds' split (``hpo.data.splits.split_folds``)
    trial_number: int  # the trial retrained
    params: dict[str, Any]  # its Optuna parameters
    hyperparams: dict[str, Any]  # the resolved hyperparameters trained with (retrain epochs applied)
    path: str  # "stacked" (K models together, torch.func) or "sequential"
    path_reason: str  # why that path: "requested", "CUDA device", "CPU device", or why the models cannot be stacked
    cuda_graph: bool  # every model trained with its step captured in a CUDA graph
    device: str  # e.g. "cpu", "cuda:0"
    train_seconds: float  # wall time of this run's training (a resumed run: its own part only)
    model_epochs_per_s: float | None  # epochs trained by this run, over all K models, per second
    per_fold: list[dict[str, Any]]  # [{fold, val_loss, val_metric, test_loss, test_metric, epochs_run}]
    best_fold: int  # best on validation (metric, then loss): the tie-breaker of the majority vote
    metric: str  # "accuracy" | "mse"
    classes: list[str]  # class names (classification), else []
    fold_seeds: list[int]  # fold i's seed: initial weights and batch order (``hpo.training.seeds.fold_seed``)
    split: str  # "StratifiedKFold" | "KFold"
    resumed_from: str | None  # where a resumed retrain's checkpoint was taken ("fold 2, epoch 5"), else None
    data: dict[str, Any]  # the pool the folds split: {samples, of (the whole pool), full_data}
    ensemble: dict[str, dict[str, float]]  # {"mean" | "majority_vote" | "soft_vote": {test_loss?, test_metric}}
    confusion: dict[str, list[list[int]]]  # classification: {"best": [[...]], "majority_vote": [[...]]}; else {}
    version_mismatch: str | None = None  # the model family's or source's version differs from the study's (allowed)

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` object (``version_mismatch`` only when there is one)."""
        out = asdict(self)
        if out["version_mismatch"] is None:
            del out["version_mismatch"]
        return out


@dataclass(frozen=True)
class RetrainRecord:
    """One retrain as the study records it (a study user attr): its files in the artifact store
    and headline numbers. ``metrics`` is set on the record ``hpo.retrain.run.run_retrain``
    returns; a record read back from the study has None there (its ``metrics.json`` holds them)."""

    id: str
    trial_number: int
    folds: int
    created: str  # ISO 8601, UTC
    files: dict[str, str]  # file name -> artifact id
    summary: dict[str, Any]  # headline numbers, e.g. {"ensemble_test_metric": 0.91}
    metrics: RetrainMetrics | None = field(default=None, compare=False)

    def stored(self) -> dict[str, Any]:
        """The record as the study's user attr keeps it (without ``metrics``)."""
        return {k: v for k, v in asdict(self).items() if k != "metrics"}


def save_retrain(study: optuna.Study, artifact_store, *, trial_number: int, folds: int, files: dict[str, Path],
                 summary: dict[str, Any], trial_id: int | None = None) -> RetrainRecord:
    """Upload the files of one retrain and record them in the study. Returns the new record.

    Args:
        trial_id: the storage id of trial ``trial_number``, when the caller has it (saves a look-up).
    """
    storage = optuna_private.study_storage(study)
    study_id = optuna_private.study_id(study)
    if trial_id is None:
        trial_id = optuna_private.trial_id(study.get_trials(deepcopy=False)[trial_number])
    artifact_ids = {name: upload_artifact(artifact_store=artifact_store, file_path=str(path), study_or_trial=study)
                    for name, path in files.items()}
    system_attrs = storage.get_study_system_attrs(study_id)
    for artifact_id in artifact_ids.values():
        meta = system_attrs[ARTIFACTS_ATTR_PREFIX + artifact_id]
        storage.set_study_system_attr(study_id, f"{DASHBOARD_TRIAL_PREFIX}{trial_id}:{artifact_id}", meta)
    now = datetime.now(UTC)
    record = RetrainRecord(
        id=now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
        trial_number=trial_number,
        folds=folds,
        created=now.isoformat(timespec="microseconds"),
        files=artifact_ids,
        summary=summary,
    )
    # The record goes in last: a retrain that failed halfway leaves no record pointing at it.
    study.set_user_attr(RECORD_PREFIX + record.id, record.stored())
    study.set_user_attr(LATEST_ATTR, record.id)
    return record


def list_retrains(study: optuna.Study) -> list[RetrainRecord]:
    """Every retrain of the study, oldest first."""
    records = [RetrainRecord(**v) for k, v in study.user_attrs.items() if k.startswith(RECORD_PREFIX)]
    return sorted(records, key=lambda r: r.created + r.id)


def load_retrain(study: optuna.Study, retrain_id: str | None = None) -> RetrainRecord:
    """The retrain with ``retrain_id``, or the latest one.

    Raises:
        HpoError: when the study has no retrain (saying what to run) or no retrain of that id.
    """
    attrs = study.user_attrs
    retrain_id = retrain_id or attrs.get(LATEST_ATTR)
    if retrain_id is None:
        raise HpoError(f"study {study.study_name!r} has no retrain yet; run: hpo retrain --study {study.study_name}")
    raw = attrs.get(RECORD_PREFIX + retrain_id)
    if raw is None:
        known = ", ".join(r.id for r in list_retrains(study)) or "none"
        raise HpoError(f"study {study.study_name!r} has no retrain {retrain_id!r}; retrains: {known}")
    return RetrainRecord(**raw)


def fetch_files(artifact_store, record: RetrainRecord, dest: Path | None = None, *,
                names: Iterable[str] | None = None) -> Path:
    """Download the files of a retrain (all, or those of ``names`` it has) into ``dest`` (a new
    temporary folder by default).

    Raises:
        HpoError: a file is not in ``artifact_store`` (one line: the store looked in, and the fix).
    """
    dest = Path(dest or tempfile.mkdtemp(prefix="hpo-retrain-"))
    dest.mkdir(parents=True, exist_ok=True)
    wanted = None if names is None else set(names)
    for name, artifact_id in record.files.items():
        if wanted is not None and name not in wanted:
            continue
        target = name_in(dest, name, what=f"retrain {record.id!r} in the store: file name")
        if target.exists():
            target.unlink()
        try:
            download_artifact(artifact_store=artifact_store, artifact_id=artifact_id, file_path=str(target))
        except ArtifactNotFound:
            where = getattr(artifact_store, "folder", None)
            raise HpoError(f"retrain {record.id!r}: its file {name} is not in the artifact store"
                           f"{f' {where}' if where else ''}; pass --artifacts with the folder hpo retrain "
                           f"saved it to") from None
    return dest


def read_json(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())

