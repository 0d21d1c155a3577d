"""A k-fold retrain killed (SIGKILL) or stopped (SIGTERM) in the middle and continued with
``hpo retrain --resume`` gives the same fold metrics, curves and ensemble as the same retrain
run without interruption, on the sequential and the stacked paths; finished folds are not
trained again, and the checkpoint is gone once the retrain is saved."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import HPO, REPO, run_hpo
from test_checkpoint import spec_file
from test_parallel import create

from hpo.retrain.results import fetch_files, load_retrain, read_json
from hpo.retrain.run import run_retrain
from hpo.running.worker import run_worker
from hpo.search.study import open_study
from hpo.store.artifacts import open_artifact_store
from hpo.store.storage import open_storage
from hpo.training.checkpoint import RETRAIN_KEY, CheckpointStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def latest(url: str, artifacts: str) -> tuple[dict, dict, dict]:
    study, _ = open_study("ck", open_storage(url, heartbeat=False))
    folder = fetch_files(open_artifact_store(url, artifacts), load_retrain(study))
    return read_json(folder, "metrics.json"), read_json(folder, "curves.json"), dict(np.load(folder / "predictions.npz"))


def wait_until(store: CheckpointStore, proc: subprocess.Popen, reached, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = store.meta(RETRAIN_KEY)
        if meta is not None and reached(meta["at"]):
            return meta["at"]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.003)
    raise AssertionError("the retrain never reached that point")


@pytest.mark.slow
@pytest.mark.parametrize("path, how", [("sequential", "sigkill"), ("stacked", "sigterm")])
def test_a_stopped_retrain_resumed_gives_the_same_folds_and_ensemble(tmp_path, store_url, path, how):
    spec = spec_file(tmp_path, "mlp", every_seconds=0)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=120, batch_size=8, early_stopping=40)  # folds of about a second, some stop early
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    artifacts = str(tmp_path / "artifacts")
    store = CheckpointStore.for_study("ck", artifacts=artifacts)

    run_retrain("ck", storage_url=store_url, artifacts=artifacts, folds=5, device=CPU, stacked=path == "stacked")
    whole = latest(store_url, artifacts)
    assert store.keys() == [] and whole[0]["resumed_from"] is None

    env = dict(os.environ, HPO_STORAGE=store_url, HPO_ARTIFACTS=artifacts, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*HPO, "retrain", "--study", "ck", "--folds", "5", f"--{path}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if path == "sequential":  # in the middle of the third fold: two finished folds are kept
            at = wait_until(store, proc, lambda at: at.startswith("fold 2, epoch") and int(at.rsplit(" ", 1)[1]) >= 10)
        else:
            at = wait_until(store, proc, lambda at: at.startswith("epoch") and int(at.split()[1]) >= 30)
        proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if how == "sigterm":
        assert proc.returncode == 130 and "continue it with: hpo retrain --study ck --resume" in out, out
    else:
        assert proc.returncode == -signal.SIGKILL
    left = store.meta(RETRAIN_KEY)["at"]
    assert left == at if how == "sigkill" else left.startswith("epoch")

    proc = run_hpo("retrain", "--study", "ck", "--resume", env=env, check=0)
    assert f"resuming from its checkpoint ({left})" in proc.stdout, proc.stdout
    resumed = latest(store_url, artifacts)
    assert resumed[0]["resumed_from"] == left and resumed[0]["path"] == path and resumed[0]["folds"] == 5
    assert resumed[0]["per_fold"] == whole[0]["per_fold"]
    assert resumed[0]["ensemble"] == whole[0]["ensemble"] and resumed[0]["best_fold"] == whole[0]["best_fold"]
    assert resumed[1] == whole[1]  # every fold's learning curve, the epochs before the stop included
    assert all(np.array_equal(resumed[2][name], whole[2][name]) for name in whole[2])
    if path == "sequential":  # the two folds finished before the kill were not trained again
        assert "fold 0:" not in proc.stdout and "fold 1:" not in proc.stdout and "fold 2:" in proc.stdout
    assert store.keys() == []
    proc = run_hpo("retrain", "--study", "ck", "--resume", env=env, check=2)
    assert "--resume: study 'ck' has no unfinished retrain in " in proc.stderr


def test_resume_refuses_other_folds_and_a_new_retrain_replaces_an_unfinished_one(tmp_path, store_url):
    spec = spec_file(tmp_path, "mlp", every_seconds=0)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=4, early_stopping=0)
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    artifacts = str(tmp_path / "artifacts")
    store = CheckpointStore.for_study("ck", artifacts=artifacts)
    store.save(RETRAIN_KEY, {"done": []}, meta={"kind": "retrain", "trial": 0, "folds": 3, "path": "sequential",
                                                 "at": "fold 0, epoch 1"})
    from hpo.errors import HpoError
    with pytest.raises(HpoError, match=r"--folds: got 4, but the unfinished retrain has 3; leave it out to resume"):
        run_retrain("ck", storage_url=store_url, artifacts=artifacts, folds=4, device=CPU, resume=True)
    # a checkpoint of another retrain (its meta differs): ignored with a warning, the retrain starts over
    lines = []
    run_retrain("ck", storage_url=store_url, artifacts=artifacts, device=CPU, resume=True, echo=lines.append)
    assert "  its checkpoint could not be used: starting over" in lines and store.keys() == []
    store.save(RETRAIN_KEY, {"done": []}, meta={"kind": "retrain", "trial": 0, "folds": 3, "path": "sequential",
                                                 "at": "fold 0, epoch 1"})
    run_retrain("ck", storage_url=store_url, artifacts=artifacts, folds=2, device=CPU)
    assert store.keys() == []  # replaced by the new retrain, then deleted once it was saved


class _Killed(BaseException):
    """Stands in for SIGKILL right after a checkpoint was written."""


@pytest.mark.parametrize("path, where", [("sequential", "fold 0, epoch 2"), ("sequential", "fold 1 done"),
                                         ("sequential", "fold 2, epoch 4"), ("stacked", "epoch 1 of all folds"),
                                         ("stacked", "epoch 4 of all folds")])
def test_cnn_retrain_resumed_in_process_at_several_points(tmp_path, store_url, monkeypatch, path, where):
    """Dropout, batch-norm and augmentation draw from torch's generators: a resumed fold (or all
    K stacked models) continues their streams exactly, and folds after it start where they would."""
    from hpo.retrain import checkpoint as retrain_checkpoint
    spec = spec_file(tmp_path, "cnn", every_seconds=0)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=6)
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    artifacts = str(tmp_path / "artifacts")
    options = dict(storage_url=store_url, artifacts=artifacts, device=CPU)
    run_retrain("ck", folds=3, stacked=path == "stacked", **options)
    whole = latest(store_url, artifacts)

    real_save = retrain_checkpoint.RetrainCheckpoint.save

    def killing(self, payload, *, where: str):
        real_save(self, payload, where=where)
        if where == killing.at:
            raise _Killed

    killing.at = where
    monkeypatch.setattr(retrain_checkpoint.RetrainCheckpoint, "save", killing)
    with pytest.raises(_Killed):
        run_retrain("ck", folds=3, stacked=path == "stacked", **options)
    killing.at = None
    lines = []
    run_retrain("ck", resume=True, echo=lines.append, **options)
    assert f"  resuming from its checkpoint ({where})" in lines
    resumed = latest(store_url, artifacts)
    assert resumed[0]["per_fold"] == whole[0]["per_fold"] and resumed[0]["ensemble"] == whole[0]["ensemble"]
    assert resumed[1] == whole[1] and all(np.array_equal(resumed[2][n], whole[2][n]) for n in whole[2])


def test_a_retrain_without_checkpoints_still_stops_on_sigterm(tmp_path, store_url):
    """``checkpoint: false``: the stop signal is still the retrain's (the same boundary as a trial's):
    SIGTERM stops it at the next epoch boundary, with nothing to resume."""
    spec = spec_file(tmp_path, "mlp", checkpoint=False)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=6, early_stopping=0)
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    artifacts = str(tmp_path / "artifacts")

    def echo(line: str) -> None:
        if line.startswith("  fold 0:"):  # inside the retrain's StopSignal: the first signal is a request
            os.kill(os.getpid(), signal.SIGTERM)

    from hpo.training.boundary import Interrupted
    with pytest.raises(Interrupted) as e:
        run_retrain("ck", storage_url=store_url, artifacts=artifacts, folds=3, device=CPU, stacked=False, echo=echo)
    assert (e.value.where, e.value.saved) == ("fold 1, epoch 1", None)
    assert CheckpointStore.for_study("ck", artifacts=artifacts).keys() == []


def test_a_retrain_whose_checkpoint_writes_fail_warns_once_and_finishes(tmp_path, store_url, monkeypatch, capsys):
    """A failed checkpoint write (here: a full disk) costs the retrain its resumability, not its run:
    one warning, then the retrain finishes and is saved (as a trial does)."""
    spec = spec_file(tmp_path, "mlp", every_seconds=0)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=4, early_stopping=0)
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    artifacts = str(tmp_path / "artifacts")

    def disk_full(self, key, payload, *, meta):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CheckpointStore, "save", disk_full)
    capsys.readouterr()
    record = run_retrain("ck", storage_url=store_url, artifacts=artifacts, folds=2, device=CPU, stacked=False)
    err = capsys.readouterr().err
    assert err.count("warning: retrain: checkpoint not written (No space left on device); training goes on") == 1, err
    metrics = latest(store_url, artifacts)[0]
    assert record.trial_number == 0 and len(metrics["per_fold"]) == 2
