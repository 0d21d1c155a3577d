"""``hpo retrain --reuse-cv``: a cross-validated trial's own K fold models as the retrain's folds,
instead of training them again.

A worker keeps the fold models of the CV trial that ends as the study's best so far
(``hpo.search.cv.keep_fold_models``, in the study's checkpoint folder). The retrain reuses them
when they match what it would train: the trial's folds (the same K, the same rows: the digest the
trial recorded, recomputed from the data here), its epochs, and the study's spec; the test
predictions, ensembles and files are then made as for a trained retrain. The models were trained on
the study's folds of its training pool, seeded from the trial's own seed (a retry's: its original's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from hpo.data.dataset import Dataset
from hpo.data.splits import folds_digest
from hpo.errors import HpoError
from hpo.search.cv import cv_pool, cv_splits, kept_key, kept_meta
from hpo.spec.schema import StudySpec
from hpo.training.checkpoint import CheckpointStore, fingerprint
from hpo.training.trainer import TrainResult

RETRAIN_AGAIN = "leave --reuse-cv out to train them again"


@dataclass
class Reused:
    """A CV trial's kept fold models: their weights (``state_dict`` each), training results and seeds,
    the rows of the pool the folds split, and how the trial trained them (stacked | sequential)."""

    states: list[dict[str, Any]]
    results: list[TrainResult]
    fold_seeds: list[int]
    pool: np.ndarray
    path: str


def check_flags(*, resume: bool, full_data: bool | None, stacked: bool | None) -> None:
    """Refuse the flags that --reuse-cv cannot honour (one line each).

    Raises:
        HpoError: naming the flag.
    """
    for flag, given in (("--resume", resume or None), ("--full-data/--search-data", full_data),
                        ("--stacked/--sequential", stacked)):
        if given is not None:
            raise HpoError(f"{flag}: not with --reuse-cv (the fold models exist already; {RETRAIN_AGAIN})")


def reused_folds(store: CheckpointStore | None, spec: StudySpec, trial: optuna.trial.FrozenTrial, data: Dataset,
                 *, folds: int | None, epochs: int) -> Reused:
    """The kept fold models of CV trial ``trial``, checked against what a retrain of it here would
    train: ``data`` (the study's data as a worker loads it), ``folds`` (--folds, or None) and
    ``epochs`` (the retrain's epochs per fold model).

    Raises:
        HpoError: one line, when the study has no CV trials, K or the epochs differ, the trial kept
            no models (or not in this checkpoint folder), or the folds of the data here differ
            from the trial's.
    """
    name, n = spec.name, trial.number
    if spec.cv is None:
        raise HpoError(f"--reuse-cv: study {name!r} has no cross-validated trials (no cv: in its spec)")
    if folds is not None and folds != spec.cv.folds:
        raise HpoError(f"--folds: got {folds}; --reuse-cv reuses the trial's {spec.cv.folds} fold models "
                       f"(or {RETRAIN_AGAIN})")
    if trial.state != optuna.trial.TrialState.COMPLETE or "cv_folds_sha256" not in trial.user_attrs:
        raise HpoError(f"--reuse-cv: trial {n} is {trial.state.name} with no fold models to reuse; {RETRAIN_AGAIN}")
    if store is None:
        raise HpoError(f"--reuse-cv: study {name!r} keeps no fold models (checkpoint: false); {RETRAIN_AGAIN}")
    found = store.read(kept_key(n), expect=kept_meta(spec, n))
    if found is None:
        raise HpoError(f"--reuse-cv: the fold models of trial {n} are not in {store.folder} (a worker keeps those "
                       f"of the trial that was the study's best when it ended, in its machine's checkpoint folder: "
                       f"pass --artifacts with that folder, or {RETRAIN_AGAIN})")
    payload, meta = found
    if meta.get("spec") != fingerprint(spec.to_dict()):
        raise HpoError(f"--reuse-cv: the kept fold models of trial {n} were trained for another spec of study "
                       f"{name!r} (the study was replaced); {RETRAIN_AGAIN}")
    if int(meta["epochs"]) != epochs:
        raise HpoError(f"--epochs: the fold models of trial {n} trained {meta['epochs']} epochs, the retrain "
                       f"asks {epochs} (--epochs or the spec's retrain.epochs); {RETRAIN_AGAIN}")
    splits = cv_splits(spec, data)
    here = folds_digest(splits)
    if here != meta["folds_sha256"] or here != trial.user_attrs["cv_folds_sha256"]:
        raise HpoError(f"--reuse-cv: the folds of the data here differ from those trial {n} trained on "
                       f"(sha256 {here[:12]}... against {trial.user_attrs['cv_folds_sha256'][:12]}...); {RETRAIN_AGAIN}")
    return Reused(states=list(payload["models"]), results=[TrainResult(**r) for r in payload["results"]],
                  fold_seeds=[int(s) for s in meta["fold_seeds"]], pool=cv_pool(spec, data),
                  path=str(trial.user_attrs.get("cv_path", "stacked")))
