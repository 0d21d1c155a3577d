"""Preemption-safe trials: a trial stopped (SIGTERM) or killed (SIGKILL) in the middle, resumed by
another worker process from its checkpoint, ends with exactly the value and the intermediate
values of the same trial run without interruption; checkpoint files are checked, replaced
atomically and gone once the trial's lineage ends.

Real workers (``hpo worker`` processes) on real stores (SQLite, and the real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import HPO, REPO, STUDIES
from optuna.trial import TrialState
from test_images import write_idx_set
from test_parallel import create, start_worker

from hpo.running.worker import run_worker
from hpo.store import budget
from hpo.store.config import Heartbeat
from hpo.store.storage import open_storage
from hpo.training.checkpoint import CheckpointStore, trial_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST_HEARTBEAT = {"HPO_HEARTBEAT_INTERVAL": "1", "HPO_GRACE_PERIOD": "2", "PYTHONUNBUFFERED": "1"}

# The regression MLP with early stopping and ReduceLROnPlateau: ~160 epochs of ~15 ms, stopped early.
MLP_FIXED = {"n_layers": 2, "width": [64, 64], "epochs": 300, "batch_size": 4, "lr": 1.0e-3, "weight_decay": 1.0e-6,
             "scheduler": "plateau", "plateau_factor": 0.5, "plateau_patience": 10, "early_stopping": 60}
# A small CNN with dropout, batch-norm and on-device augmentation on tiny synthetic images.
CNN_FIXED = {"n_conv": 2, "filters": [4, 8], "kernel_size": 3, "padding": 1, "n_dense": 1, "dense_width": 16,
             "dropout": 0.3, "conv_dropout": 0.2, "batch_norm": True, "augment": True, "epochs": 30, "batch_size": 16,
             "momentum": 0.9, "lr": 0.05, "scheduler": "exponential", "lr_decay": 0.95}


def spec_file(folder: Path, family: str, *, every_seconds: float = 0.05, n_trials: int = 1, **overrides) -> Path:
    if family == "mlp":
        raw = {"name": "ck", "model": "mlp", "metric": "val_mse", "seed": 3,
               "data": {"source": "csv", "train": str(STUDIES / "data" / "regression_train.csv"),
                        "test": str(STUDIES / "data" / "regression_test.csv"), "features": ["x"], "target": "y"},
               "fixed": dict(MLP_FIXED), "space": {"optimizer": {"choice": ["Adam"]}}, "report_every": 5}
    else:
        images = folder / "idx"
        if not images.is_dir():
            write_idx_set(images, n_train=200, n_test=20)
        raw = {"name": "ck", "model": "cnn", "metric": "val_loss", "seed": 3,
               "data": {"source": "fashion_mnist", "data_dir": str(images)},
               "fixed": dict(CNN_FIXED), "space": {"optimizer": {"choice": ["SGD"]}}, "report_every": 1}
    raw.update({"pruner": {"kind": "median", "n_startup_trials": 5}, "budget": {"n_trials": n_trials},
                "checkpoint": {"every_seconds": every_seconds}, **overrides})
    path = folder / f"ck-{family}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trials_of(url: str, name: str = "ck") -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url, heartbeat=False)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same trial, run once without interruption: its value and intermediate values, per family."""
    cache = {}

    def get(family: str) -> optuna.trial.FrozenTrial:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{family}")
            url = f"sqlite:///{folder / 'hpo.db'}"
            create(spec_file(folder, family), url)
            run_worker("ck", storage_url=url, echo=lambda line: None)
            (trial,) = trials_of(url)
            assert trial.state == TrialState.COMPLETE and "resumed_from_epoch" not in trial.user_attrs
            cache[family] = trial
        return cache[family]

    return get


def wait_for_checkpoint(store: CheckpointStore, proc, epoch: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = store.meta(trial_key(0))
        if meta is not None and meta["epoch"] >= epoch:
            return meta["epoch"]
        assert proc.poll() is None, "the worker ended before the checkpoint"
        time.sleep(0.003)
    raise AssertionError(f"no checkpoint at epoch {epoch}")


def interrupt_and_resume(tmp_path: Path, url: str, family: str, how: str, k: int) -> tuple[list, int, Path]:
    """Start a worker, stop it (SIGTERM) or kill it (SIGKILL) once its trial has checkpointed
    epoch k, then let a second worker process finish the study. Returns the trials, the epoch of
    the checkpoint left behind, and the second worker's log."""
    artifacts = tmp_path / "artifacts"
    env = dict(os.environ, HPO_STORAGE=url, HPO_ARTIFACTS=str(artifacts), **FAST_HEARTBEAT)
    create(spec_file(tmp_path, family), url, heartbeat=Heartbeat(interval=1, grace=2))
    store = CheckpointStore.for_study("ck", artifacts=str(artifacts))
    first = start_worker(env, "ck", tmp_path / "first.log")
    try:
        wait_for_checkpoint(store, first, k)
        first.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = first.wait(timeout=60)
    finally:
        first.kill()
    assert code == (0 if how == "sigterm" else -signal.SIGKILL), (tmp_path / "first.log").read_text()
    left = store.meta(trial_key(0))["epoch"]
    second = start_worker(env, "ck", tmp_path / "second.log")
    assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()
    assert store.keys() == []  # the lineage ended: its checkpoint is gone
    return trials_of(url), left, tmp_path / "second.log"


def check_resumed(trials, left: int, k: int, reference: optuna.trial.FrozenTrial, how: str) -> None:
    original, retry = trials
    assert original.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert original.user_attrs["fail_reason"] == ("interrupted" if how == "sigterm" else "worker lost: no heartbeat for 2s")
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == reference.params
    # resumed from the checkpoint the first worker left: a killed worker lost only what came after it
    assert retry.user_attrs["resumed_from_epoch"] == left >= k
    if how == "sigterm":  # stopped at an epoch boundary, checkpointed there, re-queued
        assert original.user_attrs["epochs_run"] == left
    assert left < reference.user_attrs["epochs_run"]  # interrupted before the end
    assert retry.value == reference.value
    assert retry.intermediate_values == reference.intermediate_values
    assert retry.user_attrs["epochs_run"] == reference.user_attrs["epochs_run"]
    assert retry.user_attrs.get("stopped_early") == reference.user_attrs.get("stopped_early")


CASES = [("mlp", "sigterm", 1), ("mlp", "sigterm", 60), ("mlp", "sigkill", 110), ("cnn", "sigterm", 12),
         ("cnn", "sigkill", 6)]


@pytest.mark.slow
@pytest.mark.parametrize("family, how, k", CASES)
def test_interrupted_trial_resumes_bit_for_bit_on_sqlite(tmp_path, store_url, uninterrupted, family, how, k):
    trials, left, _ = interrupt_and_resume(tmp_path, store_url, family, how, k)
    check_resumed(trials, left, k, uninterrupted(family), how)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("family, how, k", [("mlp", "sigkill", 80), ("cnn", "sigterm", 4)])
def test_interrupted_trial_resumes_bit_for_bit_on_postgres(tmp_path, pg_url, uninterrupted, family, how, k):
    trials, left, _ = interrupt_and_resume(tmp_path, pg_url, family, how, k)
    check_resumed(trials, left, k, uninterrupted(family), how)


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_ignored_with_a_warning_and_the_trial_starts_over(tmp_path, store_url, uninterrupted):
    """A checkpoint damaged after it was written: the retry warns, starts over (same seed, so the
    same result again), and reports every step once."""
    artifacts = tmp_path / "artifacts"
    env = dict(os.environ, HPO_STORAGE=store_url, HPO_ARTIFACTS=str(artifacts), **FAST_HEARTBEAT)
    create(spec_file(tmp_path, "mlp"), store_url)
    store = CheckpointStore.for_study("ck", artifacts=str(artifacts))
    first = start_worker(env, "ck", tmp_path / "first.log")
    wait_for_checkpoint(store, first, 20)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    path = store.path(trial_key(0))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    second = start_worker(env, "ck", tmp_path / "second.log")
    assert second.wait(timeout=180) == 0
    log = (tmp_path / "second.log").read_text()
    assert f"warning: checkpoint {path} ignored: checksum mismatch; training starts over" in log, log
    original, retry = trials_of(store_url)
    reference = uninterrupted("mlp")
    assert "resumed_from_epoch" not in retry.user_attrs and retry.state == TrialState.COMPLETE
    assert retry.value == reference.value and retry.intermediate_values == reference.intermediate_values
    assert store.keys() == []


def test_checkpoints_of_finished_trials_are_deleted(tmp_path, store_url, monkeypatch):
    """A study of complete and pruned trials checkpointing at every epoch leaves no file behind."""
    from hpo.training import checkpoint
    saved = []
    real_save = checkpoint.CheckpointStore.save
    monkeypatch.setattr(checkpoint.CheckpointStore, "save",
                        lambda self, key, *a, **kw: saved.append(key) or real_save(self, key, *a, **kw))
    spec = spec_file(tmp_path, "mlp", every_seconds=0, n_trials=6,
                     space={"optimizer": {"choice": ["Adam", "SGD"]}, "lr": {"float": [1e-4, 1e-2], "log": True}},
                     pruner={"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=40, momentum=0.5)
    del raw["fixed"]["lr"]
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    states = {t.state for t in trials_of(store_url)}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED} and len(set(saved)) == 6, (states, set(saved))
    assert CheckpointStore.for_study("ck", storage_url=store_url).keys() == []
    assert not list((tmp_path / "store" / "artifacts" / "checkpoints" / "ck").iterdir())


def test_checkpoint_false_writes_none(tmp_path, store_url, monkeypatch):
    from hpo.training import checkpoint
    monkeypatch.setattr(checkpoint.CheckpointStore, "save", lambda *a, **kw: pytest.fail("checkpoint written"))
    spec = spec_file(tmp_path, "mlp", checkpoint=False)
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=5, early_stopping=0)
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url)
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    assert [t.state for t in trials_of(store_url)] == [TrialState.COMPLETE]


def test_a_lineage_failed_for_good_as_stale_loses_its_checkpoint(tmp_path, store_url, monkeypatch):
    """A trial whose worker died, with no retry left (HPO_MAX_RETRY): the worker that fails it
    ends its lineage and deletes its checkpoint."""
    monkeypatch.setenv("HPO_MAX_RETRY", "0")
    create(spec_file(tmp_path, "mlp"), store_url, heartbeat=Heartbeat(interval=1, grace=2))
    storage = open_storage(store_url)
    study_id = storage.get_study_id_from_name("ck")
    orphan = budget.start_trial(storage, study_id, budget=2)  # what a worker killed mid-trial leaves
    store = CheckpointStore.for_study("ck", storage_url=store_url)
    store.save(trial_key(orphan.number), {"train": {}}, meta={"trial": orphan.number})
    storage.engine.dispose()
    run_worker("ck", storage_url=store_url, echo=lambda line: None)
    (trial,) = trials_of(store_url)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"].startswith("worker lost")
    assert store.keys() == []


def test_checkpoint_file_round_trip_replace_and_refusals(tmp_path):
    warnings = []
    store = CheckpointStore(tmp_path / "ck", warn=warnings.append)
    meta = {"study": "s", "trial": 3, "params": {"lr": 0.001, "optimizer": "Adam"}}
    payload = {"train": {"w": torch.arange(5.0), "epoch": 4, "history": [{"loss": float("inf")}]}}
    assert store.read("trial-3", expect=meta) is None and warnings == []  # none yet: no warning
    store.save("trial-3", payload, meta={**meta, "epoch": 4})
    payload["train"]["epoch"] = 5
    path = store.save("trial-3", payload, meta={**meta, "epoch": 5})  # replaces: one file, no temporary left
    assert sorted(p.name for p in path.parent.iterdir()) == ["trial-3.ckpt"] and store.keys() == ["trial-3"]
    loaded, stored_meta = store.read("trial-3", expect=meta)
    assert torch.equal(loaded["train"]["w"], torch.arange(5.0)) and loaded["train"]["epoch"] == 5
    assert stored_meta["epoch"] == 5 and store.meta("trial-3")["epoch"] == 5
    good = path.read_bytes()

    def refused(raw: bytes, expect=meta) -> str:
        path.write_bytes(raw)
        warnings.clear()
        assert store.read("trial-3", expect=expect) is None
        assert not path.exists()  # removed: the next save starts clean
        (message,) = warnings
        assert message.startswith(f"checkpoint {path} ignored: ") and message.endswith("; training starts over")
        return message

    assert "checksum mismatch" in refused(good[:-10] + bytes(b ^ 1 for b in good[-10:]))
    assert "bytes of payload, the header says" in refused(good[:-1])
    assert "not an hpo checkpoint" in refused(b"PK\x03\x04" + good)
    assert "damaged header" in refused(good.replace(b'"sha256"', b'"sha257"', 1))
    assert "written for params" in refused(good, {**meta, "params": {"lr": 0.002, "optimizer": "Adam"}})
    assert "written for study 's', not 't'" in refused(good, {**meta, "study": "t"})
    # a writer killed mid-write leaves a temporary file: gone with the lineage's checkpoint
    path.write_bytes(good)
    (path.parent / ".trial-3.ckpt.999.abcd.tmp").write_bytes(good[:10])
    store.delete("trial-3")
    assert list(path.parent.iterdir()) == [] and store.keys() == []


@pytest.mark.slow
def test_a_fleet_stopped_twice_trains_no_more_than_an_uninterrupted_one(tmp_path, store_url):
    """``hpo fleet`` stopped twice (SIGINT, as Ctrl-C or a scheduler does) and started again
    finishes its budget having trained, over all trials and retries, exactly the epochs of an
    uninterrupted run: each stop checkpoints the running trials at an epoch boundary, so an
    interruption costs less than one checkpoint interval of training (here: none). Epochs are
    counted through ``epochs_run`` (FAIL trials: where they were stopped) less ``resumed_from_epoch``."""
    import subprocess

    # Trials long enough (~6 s each here) that both workers are seen mid-trial at once, also after the
    # first stop, when the resumed retries start part-way (CI saw four 150-epoch trials finish first).
    epochs, n_trials = 500, 4
    spec = spec_file(tmp_path, "mlp", every_seconds=3600, n_trials=n_trials, pruner={"kind": "none"})
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"].update(epochs=epochs, early_stopping=0)  # every trial trains exactly `epochs` epochs
    spec.write_text(yaml.safe_dump(raw))
    create(spec, store_url, heartbeat=Heartbeat(interval=1, grace=2))
    artifacts = tmp_path / "artifacts"
    env = dict(os.environ, HPO_STORAGE=store_url, HPO_ARTIFACTS=str(artifacts), **FAST_HEARTBEAT)

    def fleet() -> subprocess.Popen:
        return subprocess.Popen([*HPO, "fleet", "--study", "ck", "--device", "cpu", "--workers", "2"], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running_twice() -> bool:
        return sum(t.state == TrialState.RUNNING and bool(t.intermediate_values) for t in trials_of(store_url)) == 2

    for _ in range(2):
        proc = fleet()
        deadline = time.monotonic() + 120
        while not running_twice():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.count("interrupted: the running trial is re-queued") == 2, out
    proc = fleet()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    trials = trials_of(store_url)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials and all(t.user_attrs["epochs_run"] == epochs for t in complete)
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 4 and all(t.user_attrs["fail_reason"] == "interrupted" for t in stopped)
    assert sum(t.user_attrs.get("resumed_from_epoch", 0) > 0 for t in trials) == 4  # every retry resumed
    trained = sum(t.user_attrs["epochs_run"] - t.user_attrs.get("resumed_from_epoch", 0) for t in trials)
    assert trained == n_trials * epochs  # the uninterrupted run's epochs: nothing trained twice
    assert CheckpointStore.for_study("ck", artifacts=str(artifacts)).keys() == []
