"""The k-fold retrain stage: the chosen trial's hyperparameters, K models on K folds of the data the
search used (the spec's ``train_subset``/``val_subset``, or all of it with ``full_data``), their test
predictions and ensembles, saved as artifacts of the study.

The files follow the contract in ``hpo.retrain.results``; ``hpo.retrain.outputs`` makes them (and gives
the shapes in ``predictions.npz``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from optuna.trial import TrialState

from hpo.data.dataset import Dataset
from hpo.data.sources import load_dataset, on_device
from hpo.data.splits import split_folds
from hpo.errors import HpoError
from hpo.nn import registry
from hpo.report.dashboard import save_retrain_note
from hpo.retrain import outputs as retrain_outputs
from hpo.retrain import reuse
from hpo.retrain.checkpoint import RetrainCheckpoint
from hpo.retrain.results import RetrainMetrics, RetrainRecord
from hpo.running.progress import QUIET, Progress
from hpo.running.signals import StopSignal
from hpo.search import provenance
from hpo.search.pareto import needs_trial
from hpo.search.space import hyperparams_from_params
from hpo.search.study import open_study, study_id
from hpo.spec.domains import domain_of
from hpo.spec.schema import StudySpec
from hpo.store.artifacts import open_artifact_store
from hpo.store.storage import open_storage
from hpo.training.boundary import EpochBoundary
from hpo.training.checkpoint import RETRAIN_KEY, CheckpointStore, fingerprint
from hpo.training.folds import device_folds, fold_models, train_sequential, train_stacked_folds
from hpo.training.seeds import trial_seed
from hpo.training.stacked import Fold, stack_problem
from hpo.training.state import load_model_in_place
from hpo.training.trainer import TrainResult, predict


def _choose_trial(study, trial_number: int | None, budget: int | None = None):
    from hpo.store.budget import more_trials_hint

    trials = study.get_trials(deepcopy=False)
    name = study.study_name
    if trial_number is None:
        if len(study.directions) > 1:
            raise needs_trial(study, "hpo retrain")
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise HpoError(f"study {name!r} has no complete trial; {more_trials_hint(study, budget)}")
        return study.best_trial
    if not 0 <= trial_number < len(trials):
        raise HpoError(f"--trial: study {name!r} has no trial {trial_number}; trials are 0..{len(trials) - 1}")
    trial = trials[trial_number]
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise HpoError(f"--trial: trial {trial_number} is {trial.state.name}; choose a COMPLETE or PRUNED trial")
    return trial


def run_retrain(
    study_name: str,
    *,
    storage_url: str | None = None,
    artifacts: str | None = None,
    folds: int | None = None,
    trial_number: int | None = None,
    device: torch.device,
    data_dir: str | None = None,
    stacked: bool | None = None,
    resume: bool = False,
    full_data: bool | None = None,
    epochs: int | None = None,
    echo: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    allow_version_mismatch: bool = False,
    reuse_cv: bool = False,
) -> RetrainRecord:
    """Retrain a trial's configuration on K folds and save the results as artifacts of the study.

    Args:
        folds: K (default: the spec's ``retrain.folds``).
        trial_number: the trial to retrain (default: the best complete trial).
        stacked: train the K models together (True), one after another (False), or decide (None:
            stacked on a CUDA device whenever the models can be stacked, else sequential).
        resume: continue the study's latest unfinished retrain from its checkpoint (its trial,
            folds and path; finished folds are not trained again). Without it, a new retrain
            replaces any unfinished one. Checkpoints follow the spec's ``checkpoint`` settings
            (``hpo.retrain.checkpoint``); SIGINT/SIGTERM checkpoint and stop at the next epoch.
        full_data: train on the whole training pool (True) instead of the search's data (None or
            False: the spec's ``train_subset`` and ``val_subset`` together, which is the whole pool
            when the spec sets neither).
        epochs: epochs per fold model (default: the spec's ``retrain.epochs``, else the trial's).
        echo: where progress lines go (default: nowhere).
        progress: shows the folds x epochs done, the latest fold's validation value and the time
            left (default: nothing).
        allow_version_mismatch: go on with the study's model family at another version here
            (``metrics.json`` records the difference as ``version_mismatch``).
        reuse_cv: take a cross-validated trial's own fold models instead of training them again
            (``hpo.retrain.reuse``: the trial's folds, epochs and spec must match).

    Returns:
        The new record, with its :class:`~hpo.retrain.results.RetrainMetrics` (the run's ``metrics.json``) in ``metrics`` (``hpo.retrain.results.load_retrain`` reads it back); a re-run makes a new one.

    Raises:
        HpoError: no such study, no complete trial, bad fold count, training failed, or
            ``resume`` without an unfinished retrain (or with --trial/--folds/--stacked/--full-data/
            --epochs that differ from it), or ``reuse_cv`` without fold models to reuse.
        hpo.training.boundary.Interrupted: told to stop (SIGINT/SIGTERM) at an epoch boundary, after
            the checkpoint was saved (its ``saved`` says whether; None when checkpoints are off).
    """
    echo = echo or (lambda line: None)
    storage = open_storage(storage_url, heartbeat=False)
    mismatches = provenance.mismatches(storage.get_study_system_attrs(study_id(storage, study_name)).get(provenance.ATTR),
                                       study=study_name, allow=allow_version_mismatch)
    study, spec = open_study(study_name, storage)
    store = CheckpointStore.for_spec(spec, storage_url=storage_url, artifacts=artifacts)
    if reuse_cv:
        reuse.check_flags(resume=resume, full_data=full_data, stacked=stacked)
    if resume:
        trial_number, folds, stacked, full_data, epochs = _unfinished_retrain(
            store, study_name, trial_number=trial_number, folds=folds, stacked=stacked, full_data=full_data,
            epochs=epochs)
    trial = _choose_trial(study, trial_number, spec.budget.n_trials)
    k = int(folds or spec.retrain.folds)
    if folds is not None and not domain_of("retrain.folds").contains(k):
        raise HpoError(f"--folds: got {k}; allowed: {domain_of('retrain.folds')}")
    hp = _retrain_hyperparams(spec, trial.params, epochs=epochs)
    artifact_store = open_artifact_store(storage_url, artifacts)
    if reuse_cv:
        return _finish(study, spec, trial, hp, _reused(store, spec, trial, hp, storage, folds=folds, data_dir=data_dir,
                                                       device=device, echo=echo),
                       artifact_store=artifact_store, device=device, mismatches=mismatches)

    data, pool = _training_pool(spec, storage, full_data=bool(full_data), data_dir=data_dir, device=device)
    fold_list = make_folds(data, folds=k, seed=spec.seed, base_seed=trial_seed(spec.seed, trial.number), device=device)
    family = spec.family_of(hp)
    models = fold_models(family, hp, data, seeds=[f.seed for f in fold_list], device=device)
    unstackable = None if registry.family(family).stackable else \
        f"model family {family!r} declares its modules unstackable (Family.stackable=False)"
    use_stacked, reason = _choose_path(models, stacked, device, unstackable=unstackable)
    path = "stacked" if use_stacked else "sequential"
    echo(f"retrain of trial #{trial.number} of {study_name!r}: {k} folds, {hp['epochs']} epochs, "
         f"{path} on {device}")
    echo(f"  data: {pool['says']}")
    meta = {"kind": "retrain", "study": study_name, "trial": trial.number, "folds": k, "path": path,
            "params": dict(trial.params), "hyperparams": hp, "spec": fingerprint(spec.to_dict()),
            "full_data": bool(full_data)}
    ckpt, saved, resumed_from = _open_checkpoint(store, meta, resume=resume, echo=echo)

    # The stop signal is the retrain's, with checkpoints or without: SIGINT/SIGTERM stop it at the
    # next epoch boundary (hpo.training.boundary), as they stop a worker's trial.
    with StopSignal("checkpointing the retrain after the current epoch" if ckpt is not None
                    else "stopping the retrain after the current epoch (checkpoint: false, nothing to resume)") as stop:
        boundary = EpochBoundary(should_stop=lambda: stop.requested, every_seconds=spec.checkpoint.every_seconds,
                                 label="retrain", **({"warn": store.warn} if store is not None else {}))
        trained = _train_folds(models, data, hp, fold_list, stacked=use_stacked, checkpoint=ckpt, boundary=boundary,
                               saved=saved, device=device, progress=progress or QUIET, echo=echo)
    for note in trained.notes:
        echo(f"  note: {note}")
    folds_done = _Folds(data=data, pool=pool, fold_seeds=[f.seed for f in fold_list], models=models, trained=trained,
                        path=path, reason=reason, resumed_from=resumed_from)
    record = _finish(study, spec, trial, hp, folds_done, artifact_store=artifact_store, device=device,
                     mismatches=mismatches)
    if ckpt is not None:
        ckpt.discard()  # saved: nothing left to resume
    return record


@dataclass
class _Folds:
    """The K fold models of a retrain, trained or reused, with what ``metrics.json`` says of them."""

    data: Dataset
    pool: dict[str, Any]  # samples, of, full_data, says
    fold_seeds: list[int]
    models: list[torch.nn.Module]
    trained: _Trained
    path: str
    reason: str
    resumed_from: str | None


def _reused(store: CheckpointStore | None, spec: StudySpec, trial, hp: dict[str, Any], storage, *, folds: int | None,
            data_dir: str | None, device: torch.device, echo: Callable[[str], None]) -> _Folds:
    """The fold models of CV trial ``trial``, loaded instead of trained (``hpo.retrain.reuse``)."""
    data = on_device(load_dataset(spec, storage=storage, data_dir=data_dir), device)
    reused = reuse.reused_folds(store, spec, trial, data, folds=folds, epochs=int(hp["epochs"]))
    models = fold_models(spec.family_of(hp), hp, data, seeds=reused.fold_seeds, device=device)
    for model, state in zip(models, reused.states, strict=True):
        load_model_in_place(model, state)
    total, samples = len(data.x), len(reused.pool)
    says = f"the {samples:,} training samples trial #{trial.number}'s {len(models)} folds split (--reuse-cv)"
    echo(f"retrain of trial #{trial.number} of {spec.name!r}: its {len(models)} fold models reused, "
         f"{hp['epochs']} epochs each")
    echo(f"  data: {says}")
    return _Folds(data=data, pool={"samples": samples, "of": total, "full_data": samples == total, "says": says},
                  fold_seeds=reused.fold_seeds, models=models, trained=_Trained(reused.results, False, [], 0.0),
                  path=reused.path, reason=f"reused trial #{trial.number}'s fold models (--reuse-cv)", resumed_from=None)


def _finish(study, spec: StudySpec, trial, hp: dict[str, Any], folds: _Folds, *, artifact_store,
            device: torch.device, mismatches: list[str]) -> RetrainRecord:
    """Test predictions, ensembles and ``metrics.json`` of the fold models, saved as a retrain."""
    data, models, trained, k = folds.data, folds.models, folds.trained, len(folds.models)
    outputs = torch.stack([predict(m, data.x_test) for m in models])  # (K, N, C)
    per_fold, best = retrain_outputs.fold_scores(data, outputs, trained.results)
    metrics = {
        "task": data.task, "folds": k, "seed": spec.seed, "trial_number": trial.number,
        "params": dict(trial.params), "hyperparams": hp, "path": folds.path, "path_reason": folds.reason,
        "cuda_graph": trained.cuda_graph, "device": str(device), **_speed(trained),
        "per_fold": per_fold, "best_fold": best, "metric": retrain_outputs.metric_name(data.task),
        "classes": list(data.classes), "fold_seeds": folds.fold_seeds,
        "split": "StratifiedKFold" if data.task == "classification" else "KFold",
        "resumed_from": folds.resumed_from,  # where a resumed retrain's checkpoint was taken, else None
        "data": {key: v for key, v in folds.pool.items() if key != "says"},  # samples, of, full_data
    }
    arrays = retrain_outputs.ensembles(data, outputs, best, metrics, models)
    # RetrainMetrics is the documented metrics.json: a key missing or extra fails here, not in a reader.
    measured = RetrainMetrics(**metrics, version_mismatch="; ".join(mismatches) or None)
    record = retrain_outputs.save(study, artifact_store, trial, spec=spec, data=data, hp=hp, metrics=measured,
                                  curves=retrain_outputs.curves(trained.results, measured.metric), arrays=arrays,
                                  models=models)
    save_retrain_note(study, metrics, record)  # fold scores and votes, readable in optuna-dashboard
    return replace(record, metrics=measured)


def _speed(trained: _Trained) -> dict[str, float | None]:
    """``train_seconds`` and ``model_epochs_per_s`` of this run (a resumed run: the epochs it trained)."""
    epochs = sum(r.epochs_run - r.resumed_from_epoch for r in trained.results)
    return {"train_seconds": trained.seconds,
            "model_epochs_per_s": epochs / trained.seconds if trained.seconds > 0 else None}


def _unfinished_retrain(store: CheckpointStore | None, study_name: str, *, trial_number: int | None,
                        folds: int | None, stacked: bool | None, full_data: bool | None,
                        epochs: int | None) -> tuple[int, int, bool, bool, int | None]:
    """The trial, K, path (stacked or not), data (full or the search's) and epochs of the study's
    unfinished retrain, which --resume continues.

    Raises:
        HpoError: when there is none, or a flag given differs from it.
    """
    asked = RetrainCheckpoint.unfinished(store, study_name)
    # A checkpoint from before retrains used the search's data trained on the whole pool.
    saved_full = bool(asked.get("full_data", True))
    # A checkpoint that does not say its epochs (another retrain's meta) is refused later, when its meta
    # is compared with this retrain's; here it only cannot contradict --epochs.
    saved_epochs = (asked.get("hyperparams") or {}).get("epochs")
    for flag, given, saved in (("--trial", trial_number, asked["trial"]), ("--folds", folds, asked["folds"]),
                               ("--stacked/--sequential", stacked, asked["path"] == "stacked"),
                               ("--full-data", full_data, saved_full), ("--epochs", epochs, saved_epochs)):
        if given is not None and saved is not None and given != saved:
            raise HpoError(f"{flag}: got {given}, but the unfinished retrain has {saved}; leave it out to resume")
    return (asked["trial"], asked["folds"], asked["path"] == "stacked", saved_full,
            int(saved_epochs) if saved_epochs is not None else epochs)


def _retrain_hyperparams(spec: StudySpec, params: dict[str, Any], *, epochs: int | None = None) -> dict[str, Any]:
    """The trial's hyperparameters, with ``epochs`` or else the spec's ``retrain.epochs`` when given."""
    hp = hyperparams_from_params(spec, params)
    if epochs or spec.retrain.epochs:
        hp["epochs"] = int(epochs or spec.retrain.epochs)
    return hp


def _training_pool(spec: StudySpec, storage, *, full_data: bool, data_dir: str | None,
                   device: torch.device) -> tuple[Dataset, dict[str, Any]]:
    """The pool the folds split, on the device, and what it is.

    Without ``full_data`` it is the data the search trained and validated on (the spec's
    ``train_subset`` and ``val_subset`` together); a model retrained on other data than the search
    saw is no longer the model the search chose. The dict holds ``samples``, ``of`` (the whole
    pool), ``full_data`` (whether all of it is used) and ``says`` (one line for the user).
    """
    d = spec.data
    full = replace(d, train_subset=None, val_subset=None)
    data = load_dataset(spec.with_data(full if full_data else d), storage=storage, data_dir=data_dir)
    total = len(data.x)
    if full_data:
        says = f"all {total:,} training samples (--full-data)"
    else:
        searched = torch.cat([data.train_idx, data.val_idx]).sort().values
        data = replace(data, x=data.x[searched], y=data.y[searched], train_idx=torch.arange(len(searched)),
                       val_idx=torch.arange(0))
        if len(searched) == total:
            says = f"all {total:,} training samples, as the search"
        else:
            subsets = " and ".join(f"data.{k}: {getattr(d, k)}" for k in ("train_subset", "val_subset")
                                   if getattr(d, k) is not None)
            says = (f"the search's {len(searched):,} of {total:,} training samples ({subsets}); "
                    f"--full-data trains on all")
    data = on_device(data, device)
    return data, {"samples": len(data.x), "of": total, "full_data": len(data.x) == total, "says": says}


def make_folds(data: Dataset, *, folds: int, seed: int, base_seed: int, device: torch.device) -> list[Fold]:
    """``split_folds`` as index tensors on the device, fold i seeded ``fold_seed(base_seed, i)``.

    Raises:
        HpoError: as ``split_folds``.
    """
    labels = data.y.cpu().numpy() if data.task == "classification" else None
    splits = split_folds(len(data.x), folds=folds, seed=seed, labels=labels)
    return device_folds(splits, base_seed=base_seed, device=device)


def _choose_path(models: list[torch.nn.Module], stacked: bool | None, device: torch.device, *,
                 unstackable: str | None = None) -> tuple[bool, str]:
    """Whether to train the fold models stacked, and why: as asked, else stacked on a CUDA device
    when they can be (``unstackable``: the family's own reason why they cannot).

    Raises:
        HpoError: when stacked is asked for models that cannot be stacked.
    """
    problem = unstackable or stack_problem(models)
    if stacked and problem:
        raise HpoError(f"cannot train stacked: {problem}")
    if stacked is not None:
        return stacked, "requested"
    if problem is not None:
        return False, problem
    # On the CPU both paths run at about the same speed; the plain one is easier to follow.
    use_stacked = device.type == "cuda"
    return use_stacked, "CUDA device" if use_stacked else "CPU device"


def _open_checkpoint(store: CheckpointStore | None, meta: dict[str, Any], *, resume: bool,
                     echo: Callable[[str], None]) -> tuple[RetrainCheckpoint | None, dict[str, Any] | None, str | None]:
    """The retrain's checkpoint (None when checkpoints are off), the saved state to resume from
    (None: start over) and when it was taken. Without ``resume``, an unfinished retrain's
    checkpoint is discarded: --resume continues the latest retrain."""
    if store is None:
        return None, None, None
    ckpt = RetrainCheckpoint(store, meta)
    if not resume:
        ckpt.discard()
        return ckpt, None, None
    saved = ckpt.read()
    resumed_from = store.meta(RETRAIN_KEY)["at"] if saved is not None else None
    echo(f"  resuming from its checkpoint ({resumed_from})" if saved is not None
         else "  its checkpoint could not be used: starting over")
    return ckpt, saved, resumed_from


@dataclass
class _Trained:
    results: list[TrainResult]
    cuda_graph: bool  # every model trained with its step in a CUDA graph
    notes: list[str]
    seconds: float


def _train_folds(models: list[torch.nn.Module], data: Dataset, hp: dict[str, Any], folds: list[Fold], *,
                 stacked: bool, checkpoint: RetrainCheckpoint | None, boundary: EpochBoundary,
                 saved: dict[str, Any] | None, device: torch.device, progress: Progress,
                 echo: Callable[[str], None]) -> _Trained:
    """Train the fold models, stacked or one after another, with a progress bar over folds x
    epochs, checkpointing and stopping at epoch boundaries as ``boundary`` says."""
    k, epochs, metric = len(models), int(hp["epochs"]), retrain_outputs.metric_name(data.task)
    bar = progress.bar(total=k * epochs, desc=f"retrain ({k} folds x {epochs} epochs)")

    def record(fold: int, epoch: int, stats: dict[str, float]) -> None:
        bar.set_postfix_str(f"fold {fold} val_{metric}={stats[f'val_{metric}']:.4g}", refresh=False)
        bar.update()

    def fold_done(i: int, result: TrainResult) -> None:
        bar.total -= epochs - result.epochs_run  # early stopping: the time left shrinks
        with progress.printing():
            echo(f"  fold {i}: {result.epochs_run} epochs, val {metric} {result.metrics[f'val_{metric}']:.4g}")

    start = time.perf_counter()
    cuda_graph, notes = False, []
    with bar:
        if stacked:
            outcome = train_stacked_folds(models, data, hp, folds, on_epoch=record, checkpoint=checkpoint,
                                          boundary=boundary, saved=saved, bar=bar)
            results, cuda_graph, notes = outcome.results, outcome.cuda_graph, outcome.notes
        else:
            results = train_sequential(models, data, hp, folds, on_epoch=record, on_fold=fold_done,
                                       checkpoint=checkpoint, boundary=boundary, saved=saved, bar=bar)
            cuda_graph = all(r.path == "cuda_graph" for r in results)
            if device.type == "cuda":
                notes = list(dict.fromkeys(f"eager path: {r.path_reason}" for r in results if r.path_reason))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _Trained(results, cuda_graph, notes, time.perf_counter() - start)

