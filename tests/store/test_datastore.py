"""CSV data kept in the store (hpo.store.data_tables) and cached where workers run (hpo.data.cache), on the
real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import sqlalchemy as sa
import torch
import yaml
from conftest import HPO, REPO, run_hpo, small_regression_spec
from race_helpers import ensure_tables_rounds

from hpo.data.cache import local_copy
from hpo.data.checksum import sha256_file
from hpo.data.sources import load_dataset
from hpo.data.tables import embed_csv, read_csv_table
from hpo.errors import DataError
from hpo.retrain.run import run_retrain
from hpo.running.worker import run_worker
from hpo.search.study import SPEC_ATTR, create, open_study
from hpo.spec.schema import load_spec_file
from hpo.store import data_tables as datastore
from hpo.store.data_tables import CHUNKS
from hpo.store.storage import open_storage

MARKER = 4242.424242  # a value only the training CSV holds


def write_csv(path: Path, rows: int, *, seed: int = 0) -> Path:
    """A regression table of 4 columns (a, b, c -> y); its first value is MARKER."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=rows)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y})
    frame.iloc[0, 0] = MARKER
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


def csv_spec(folder: Path, name: str, train: Path, test: Path, **data) -> Path:
    raw = {
        "name": name, "direction": "minimize", "metric": "val_mse",
        "data": {"source": "csv", "train": str(train), "test": str(test), "features": ["a", "b", "c"],
                 "target": "y", **data},
        "model": "mlp",
        "space": {"lr": {"float": [1e-3, 1e-2], "log": True}},
        "fixed": {"n_layers": 1, "width": 8, "epochs": 2, "batch_size": 256, "optimizer": "Adam"},
        "report_every": 1, "sampler": {"kind": "random"}, "pruner": {"kind": "none"},
        "budget": {"n_trials": 4}, "retrain": {"folds": 2},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tables(tmp_path) -> tuple[Path, Path]:
    """A 6,000-row training CSV (about 240 kB) and a 1,000-row test CSV."""
    folder = tmp_path / "csv"
    folder.mkdir()
    return write_csv(folder / "train.csv", 6000), write_csv(folder / "test.csv", 1000, seed=1)


@contextlib.contextmanager
def chunk_reads():
    """The SELECTs of stored chunks that any engine in this process sends while the block runs."""
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and CHUNKS.name in statement:
            seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", count)


def study_attrs_bytes(url: str, name: str) -> int:
    storage = open_storage(url, heartbeat=False)
    return len(json.dumps(storage.get_study_user_attrs(storage.get_study_id_from_name(name))))


def optuna_studies_output(url: str) -> str:
    optuna_cli = Path(sys.executable).parent / "optuna"
    proc = subprocess.run([str(optuna_cli), "studies", "--storage", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


@pytest.mark.slow
def test_csv_study_runs_two_workers_and_retrains_from_the_store_alone(tmp_path, any_url, cli_env, tables, data_cache):
    env = dict(cli_env, HPO_STORAGE=any_url)
    train, test = tables
    shas = {sha256_file(train), sha256_file(test)}
    run_hpo("create-study", str(csv_spec(tmp_path, "own", train, test)), env=env, check=0)
    shutil.rmtree(train.parent)  # from here on the data exist only in the store
    workers = [subprocess.Popen([*HPO, "worker", "--study", "own", "--n-trials", "2"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    wait_all(workers)
    out = run_hpo("retrain", "--study", "own", "--artifacts", str(tmp_path / "artifacts"), env=env, check=0).stdout
    assert "saved retrain" in out

    study, spec = open_study("own", open_storage(any_url, heartbeat=False))
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 4
    assert spec.data.files["train"]["rows"] == 6000 and spec.data.files["train"]["columns"] == 4
    assert study_attrs_bytes(any_url, "own") < 10_000
    listing = optuna_studies_output(any_url)
    row = next(line for line in listing.splitlines() if line.startswith("| own "))
    # One row of attrs (the spec, its text, the retrain record), however large the data (228 KB here).
    assert str(MARKER) not in listing and len(row) < 10_000
    assert set(datastore.stored(open_storage(any_url, heartbeat=False).engine)) == shas
    assert {p.name for p in data_cache.iterdir()} == shas  # each machine keeps one verified copy


@pytest.mark.slow
def test_a_20_mb_csv_is_stored_in_chunks_and_fetched_whole(tmp_path, any_url, cli_env, data_cache):
    env = dict(cli_env, HPO_STORAGE=any_url)
    folder = tmp_path / "csv"
    folder.mkdir()
    train, test = write_csv(folder / "train.csv", 540_000), write_csv(folder / "test.csv", 1000, seed=1)
    size = train.stat().st_size
    assert size > 20e6
    spec = csv_spec(tmp_path, "large", train, test, train_subset=2000, val_subset=500)
    run_hpo("create-study", str(spec), env=env, check=0)
    stored = datastore.stored(open_storage(any_url, heartbeat=False).engine)[sha256_file(train)]
    assert stored["size"] == size and stored["chunks"] == math.ceil(size / datastore.CHUNK_BYTES) >= 38
    assert study_attrs_bytes(any_url, "large") < 10_000
    run_hpo("worker", "--study", "large", "--n-trials", "1", env=env, check=0)
    copy = data_cache / sha256_file(train)
    assert copy.stat().st_size == size and copy.read_bytes() == train.read_bytes()


def test_second_worker_reads_no_data_from_the_store_and_a_damaged_copy_is_fetched_again(
        tmp_path, any_url, tables, data_cache, monkeypatch, caplog):
    monkeypatch.setattr(datastore, "CHUNK_BYTES", 64 * 1024)  # several chunks per file
    train, test = tables
    create(embed_csv(load_spec_file(csv_spec(tmp_path, "cached", train, test))), open_storage(any_url, heartbeat=False))
    expected = sum(math.ceil(p.stat().st_size / (64 * 1024)) for p in (train, test))
    assert expected >= 5
    with chunk_reads() as first:
        run_worker("cached", storage_url=any_url, n_trials=1, echo=lambda line: None)
    with chunk_reads() as second:
        run_worker("cached", storage_url=any_url, n_trials=1, echo=lambda line: None)
    assert (len(first), len(second)) == (expected, 0)

    copy = data_cache / sha256_file(train)
    damaged = bytearray(copy.read_bytes())
    damaged[100] ^= 1  # one bit: same size, other checksum
    copy.write_bytes(bytes(damaged))
    storage = open_storage(any_url, heartbeat=False)
    _, spec = open_study("cached", storage)
    with caplog.at_level(logging.WARNING, logger="hpo.data.sources"), chunk_reads() as again:
        data = load_dataset(spec, storage=storage)
    assert len(again) == math.ceil(train.stat().st_size / (64 * 1024))
    assert "does not match its sha256" in caplog.text
    assert copy.read_bytes() == train.read_bytes()
    assert float(data.normalization["mean"][0]) == pytest.approx(float(pd.read_csv(train)["a"].mean()), rel=1e-5)
    copy.write_bytes(b"a,b,c,y\n")
    assert len(load_dataset(spec).x) == 6000  # no store: the file it was created from, same checksum
    train.write_text(train.read_text().replace(str(MARKER), "1.0"))
    copy.write_bytes(b"a,b,c,y\n")
    with pytest.raises(DataError, match="no local copy"):
        load_dataset(spec)  # no store to fetch from, and the original changed


def test_studies_share_data_and_force_keeps_what_another_study_uses(tmp_path, any_url, tables, data_cache):
    storage = open_storage(any_url, heartbeat=False)
    train, test = tables
    other = write_csv(tmp_path / "other.csv", 500, seed=2)
    x, t, o = sha256_file(train), sha256_file(test), sha256_file(other)
    for name in ("one", "two"):
        create(embed_csv(load_spec_file(csv_spec(tmp_path, name, train, test))), storage)
    ids = {name: storage.get_study_id_from_name(name) for name in ("one", "two")}
    stored = datastore.stored(storage.engine)
    assert set(stored) == {x, t} and sorted(stored[x]["refs"]) == sorted(ids.values())

    # --force of "one" with other training data: "two" still uses x, so x stays.
    create(embed_csv(load_spec_file(csv_spec(tmp_path, "one", other, test))), storage, force=True)
    stored = datastore.stored(storage.engine)
    assert set(stored) == {x, t, o} and stored[x]["refs"] == [ids["two"]]
    shutil.rmtree(data_cache, ignore_errors=True)
    train.unlink()
    _, spec = open_study("two", storage)
    assert len(load_dataset(spec, storage=storage).x) == 6000  # fetched afresh from the store

    # --force of "two" too: nobody uses x any more, and every chunk of it is gone.
    create(embed_csv(load_spec_file(csv_spec(tmp_path, "two", other, test))), storage, force=True)
    assert set(datastore.stored(storage.engine)) == {t, o}
    with storage.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CHUNKS).where(CHUNKS.c.sha256 == x)).scalar() == 0

    # --force with the same data stores nothing again.
    inserts: list[str] = []
    listen = lambda conn, cursor, statement, *rest: inserts.append(statement) if "INSERT INTO hpo_data_chunks" in statement else None
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", listen)
    try:
        create(embed_csv(load_spec_file(csv_spec(tmp_path, "two", other, test))), storage, force=True)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", listen)
    assert inserts == [] and set(datastore.stored(storage.engine)) == {t, o}


def _create_at(start: float, spec: Path) -> list[str]:
    """The real CLI entry point, started at ``start`` (imports done) so two runs overlap."""
    code = ("import sys, time; import hpo.search.study, hpo.data.tables, hpo.store; from hpo.cli import main; "
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
            "sys.argv = ['hpo', 'create-study', sys.argv[2]]; main()")
    return [sys.executable, "-c", code, str(start), str(spec)]


@pytest.mark.slow
def test_two_create_study_at_once_store_one_copy(tmp_path, any_url, cli_env):
    env = dict(cli_env, HPO_STORAGE=any_url)
    open_storage(any_url, heartbeat=False).engine.dispose()  # Optuna's schema (its own creation is not race-safe)
    folder = tmp_path / "csv"
    folder.mkdir()
    train, test = write_csv(folder / "train.csv", 50_000), write_csv(folder / "test.csv", 1000, seed=1)
    specs = [csv_spec(tmp_path, name, train, test) for name in ("left", "right")]
    start = time.time() + 8
    procs = [subprocess.Popen(_create_at(start, s), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in specs]
    wait_all(procs)
    storage = open_storage(any_url, heartbeat=False)
    stored = datastore.stored(storage.engine)
    assert set(stored) == {sha256_file(train), sha256_file(test)}
    assert all(len(s["refs"]) == 2 for s in stored.values())
    with storage.engine.connect() as conn:
        chunks = conn.execute(sa.select(sa.func.count()).select_from(CHUNKS)).scalar()
    assert chunks == sum(s["chunks"] for s in stored.values())


@pytest.mark.slow
def test_hpo_tables_are_created_safely_by_processes_racing_on_a_fresh_store(any_url):
    storage = open_storage(any_url, heartbeat=False)  # Optuna's tables, which hpo's refer to
    ctx = multiprocessing.get_context("spawn")
    rounds, n = 4, 3
    barrier, failures = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=ensure_tables_rounds, args=(any_url, rounds, barrier, failures)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for _ in range(rounds):
            datastore.METADATA.drop_all(storage.engine)
            barrier.wait(timeout=120)  # go
            barrier.wait(timeout=120)  # all done
            assert set(sa.inspect(storage.engine).get_table_names()) >= {t.name for t in datastore.METADATA.sorted_tables}
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == []


def _stored_study(storage, tmp_path, name: str, train: Path, test: Path) -> int:
    create(embed_csv(load_spec_file(csv_spec(tmp_path, name, train, test))), storage)
    return storage.get_study_id_from_name(name)


def test_a_reference_added_while_its_data_are_deleted_is_never_left_dangling(tmp_path, any_url, tables, data_cache):
    """Both orders of a delete of unreferenced data racing a new reference to them."""
    storage = open_storage(any_url, heartbeat=False)
    train, test = tables
    sha = sha256_file(train)
    first = _stored_study(storage, tmp_path, "first", train, test)
    optuna.delete_study(study_name="first", storage=storage)
    datastore.release(storage.engine, first, sweep=False)  # unreferenced now, not yet deleted
    optuna.create_study(study_name="second", storage=storage)
    second_id = storage.get_study_id_from_name("second")

    # 1. The reference is being added (uncommitted) when the delete runs: the delete must keep the data.
    result: list = []
    with storage.engine.connect() as conn:
        tx = conn.begin()
        assert datastore.refer(conn, second_id, sha)
        sweeper = threading.Thread(target=lambda: result.append(datastore.delete_unreferenced(storage.engine)))
        sweeper.start()
        time.sleep(1.0)
        assert sweeper.is_alive()  # it waits for the reference's transaction
        tx.commit()
    sweeper.join(timeout=60)
    assert sha not in result[0] and datastore.stored(storage.engine)[sha]["refs"] == [second_id]

    # 2. The delete is under way (uncommitted) when a study refers to the data: the new reference
    # must end up with a whole copy, stored again.
    datastore.release(storage.engine, second_id, sweep=False)
    optuna.create_study(study_name="third", storage=storage)
    third_id = storage.get_study_id_from_name("third")
    errors: list = []

    def attach():
        try:
            datastore.attach(storage.engine, third_id, [(sha, train)])
        except Exception as e:
            errors.append(e)

    with storage.engine.connect() as conn:
        tx = conn.begin()
        assert datastore.drop_content(conn, sha)
        attacher = threading.Thread(target=attach)
        attacher.start()
        time.sleep(1.0)
        assert attacher.is_alive()
        tx.commit()
    attacher.join(timeout=60)
    assert errors == []
    stored = datastore.stored(storage.engine)
    assert stored[sha]["refs"] == [third_id]
    shutil.rmtree(data_cache, ignore_errors=True)
    assert local_copy({"sha256": sha, "name": "train.csv"}, storage.engine).read_bytes() == train.read_bytes()


def test_a_study_created_with_its_data_inside_the_spec_still_loads_runs_and_retrains(tmp_path, any_url):
    """Stores written before hpo kept data in its own tables: the tables sit in the spec attr."""
    spec = load_spec_file(small_regression_spec(tmp_path, budget={"n_trials": 2}))
    columns = (*spec.data.features, spec.data.target)
    old = spec.to_dict()
    old["data"]["inline"] = {part: read_csv_table(getattr(spec.data, part), columns) for part in ("train", "test")}
    storage = open_storage(any_url, heartbeat=False)
    study = optuna.create_study(study_name="regression", storage=storage, direction="minimize")
    study.set_user_attr(SPEC_ATTR, old)

    _, loaded = open_study("regression", storage)
    assert loaded.data.files is None and len(loaded.data.inline["train"]["rows"]) == 100
    summary = run_worker("regression", storage_url=any_url, n_trials=2, echo=lambda line: None)
    assert summary.counts["COMPLETE"] + summary.counts["PRUNED"] == 2
    record = run_retrain("regression", storage_url=any_url, artifacts=str(tmp_path / "artifacts"), folds=2,
                         device=torch.device("cpu"), stacked=False)
    assert record.trial_number == study.best_trial.number and record.folds == 2
    # Replacing it with a study of today's form works on a store without hpo's data tables.
    create(embed_csv(spec), storage, force=True)
    assert len(datastore.stored(storage.engine)) == 2


def test_create_study_refuses_data_over_the_limit_before_writing_anything(tmp_path, cli_env, tables, store_url):
    spec = csv_spec(tmp_path, "limited", *tables)
    proc = run_hpo("create-study", str(spec), env=dict(cli_env, HPO_MAX_DATA_BYTES="100000"), check=2)
    line = proc.stderr.strip()
    assert "\n" not in line and "data.train" in line and "HPO_MAX_DATA_BYTES=100000" in line, line
    assert not Path(store_url.removeprefix("sqlite:///")).exists()
    proc = run_hpo("create-study", str(spec), env=dict(cli_env, HPO_MAX_DATA_BYTES="1GB"), check=2)
    assert "HPO_MAX_DATA_BYTES='1GB'" in proc.stderr and "positive number of bytes" in proc.stderr


def test_a_file_that_differs_from_its_checksum_is_not_stored_and_missing_data_are_named(tmp_path, any_url, tables):
    storage = open_storage(any_url, heartbeat=False)
    train, _ = tables
    study = optuna.create_study(study_name="plain", storage=storage)
    wrong = "0" * 64  # as if the file changed after create-study read it
    with pytest.raises(DataError, match="changed while it was stored"):
        datastore.attach(storage.engine, storage.get_study_id_from_name(study.study_name), [(wrong, train)])
    assert wrong not in datastore.stored(storage.engine)
    with pytest.raises(DataError, match="the store holds no data for train.csv"):
        local_copy({"sha256": wrong, "name": "train.csv"}, storage.engine)
