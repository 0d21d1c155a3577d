"""hpo.store.paths: the one rule for names that become paths, and the callers that use it for names
read from the store (retrain file names, data checksums) rather than typed by the user."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.errors import DataError, HpoError
from hpo.store.paths import check_study_name, component_problem, name_in

HOSTILE = ["", ".", "..", "a/../../b", "/etc", "a\\b", "a\0b", "x" * 256]


@pytest.mark.parametrize("name", HOSTILE)
def test_name_in_refuses_anything_but_one_plain_component(tmp_path, name):
    with pytest.raises(HpoError) as e:
        name_in(tmp_path, name, what="--study")
    assert str(e.value).startswith("--study: got ") and "\n" not in str(e.value)
    assert component_problem(name) is not None


def test_name_in_joins_plain_names_and_counts_the_suffix():
    assert name_in("root", "a.b", what="x") == Path("root/a.b")
    assert name_in("root", "...", what="x", suffix=".html") == Path("root/....html")
    assert name_in("root", "é" * 125, what="x") == Path("root") / ("é" * 125)  # 250 bytes
    with pytest.raises(HpoError, match="256 bytes"):
        name_in("root", "x" * 251, what="x", suffix=".html")


@pytest.mark.parametrize("name", [".", "..", "a/b", "a b", "x" * 201, "a\ud800b", "a\x7fb"])
def test_study_names_refused(name):
    with pytest.raises(HpoError, match=r"^--study: got .*allowed: a name of 1 to 200 bytes"):
        check_study_name(name)


def test_checkpoint_folder_of_a_hostile_name_from_the_store_is_refused(tmp_path):
    from hpo.training.checkpoint import CheckpointStore

    for name in ("..", ".", "a/../../b"):
        with pytest.raises(HpoError, match="study name: got"):
            CheckpointStore.for_study(name, artifacts=str(tmp_path))
    assert CheckpointStore.for_study("ok", artifacts=str(tmp_path)).folder == tmp_path / "checkpoints" / "ok"


def test_retrain_file_names_read_from_the_store_cannot_leave_the_download_folder(tmp_path):
    from hpo.retrain.results import RetrainRecord, fetch_files

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    record = RetrainRecord(id="../../x", trial_number=0, folds=2, created="", files={"../victim.txt": "id"}, summary={})
    dest = tmp_path / "dest"
    with pytest.raises(HpoError, match=r"file name: got '../victim.txt'"):
        fetch_files(None, record, dest)
    assert victim.read_text() == "keep"


def test_data_checksum_read_from_the_store_cannot_name_a_path(tmp_path, monkeypatch):
    from hpo.data.cache import local_copy

    monkeypatch.setenv("HPO_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "victim").write_text("keep")
    with pytest.raises(DataError, match="not 64 hex digits"):
        local_copy({"sha256": "../victim", "name": "train.csv"}, None)
    assert (tmp_path / "victim").read_text() == "keep"
