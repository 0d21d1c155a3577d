"""Hostile study names at every command that writes a file: refused with one line and exit 2, and
nothing anywhere under the test's folder changes (the tree is compared before and after).

The store holds a real study named ``..`` (as an hpo that accepted the name would have made it), so a
command that let the name through would act on it: ``export-best --study ..`` once deleted
``storage/`` itself, the store included."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import run_hpo, small_regression_spec

from hpo.cli import main

TINY_SPACE = {"width": {"int": [4, 8]},
              "batch_size": {"int": [16, 32]}, "epochs": {"int": [2, 3]}, "lr": {"float": [1.0e-3, 1.0e-2], "log": True}}


def hostile_names(root: Path) -> list[str]:
    return ["..", ".", "a/../../b", str(root / "outside"), "x" * 255, "../outside"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: kind, size, content time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def rename(db: Path, old: str, new: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE studies SET study_name = ? WHERE study_name = ?", (new, old))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """``root/work`` (the working folder: its ``storage/`` holds the default store, with a trained
    study renamed ``..``, its artifacts and an export) and ``root/outside`` (a file that must survive)."""
    root = tmp_path_factory.mktemp("hostile")
    work = root / "work"
    work.mkdir()
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("not hpo's\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HPO_STORAGE", None)
    env.pop("HPO_ARTIFACTS", None)
    spec = small_regression_spec(root, name="reg", space=TINY_SPACE, budget={"n_trials": 1})
    run_hpo("create-study", str(spec), env=env, cwd=work, check=0)
    run_hpo("worker", "--study", "reg", "--n-trials", "1", env=env, cwd=work, check=0)
    run_hpo("export-best", "--study", "reg", env=env, cwd=work, check=0)
    rename(work / "storage" / "hpo.db", "reg", "..")
    return root


def commands(root: Path, name: str) -> list[list[str]]:
    """Every command taking a study name, writing what it writes."""
    jobs = str(root / "work" / "jobs")
    return [
        ["worker", "--study", name, "--n-trials", "1"],
        ["status", "--study", name],
        ["retrain", "--study", name, "--folds", "2"],
        ["retrain", "--study", name, "--resume"],
        ["report", "--study", name],
        ["report", "--study", name, "--out", "storage/"],
        ["export-best", "--study", name],
        ["export-best", "--study", name, "--force"],
        ["export-best", "--study", name, "--out", "-"],
        ["fleet", "--study", name, "--device", "cpu", "--workers", "1", "--n-trials", "1"],
        ["launch", "slurm", "--study", name, "--workers", "1", "--jobs-dir", jobs, "--allow-sqlite"],
        ["launch", "k8s", "--study", name, "--workers", "1", "--out", jobs],
        ["dashboard", "--study", name, "--port", "1"],
    ]


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_every_command_refuses_hostile_study_names_and_changes_nothing(tree, monkeypatch):
    monkeypatch.chdir(tree / "work")
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_ARTIFACTS", raising=False)
    before = snapshot(tree)
    assert "work/storage/hpo.db" in before and "work/storage/exports/reg/manifest.json" in before
    for name in hostile_names(tree):
        for args in commands(tree, name):
            result = invoke(args)
            assert result.exit_code == 2, (args, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("hpo: error: --study: got "), (args, result.stderr)
            assert "allowed:" in lines[0]
            assert snapshot(tree) == before, args


@pytest.mark.parametrize("name", ["..", ".", "a/../../b", "/tmp/x", "a\0b", "x" * 255, "a b"])
def test_create_study_refuses_hostile_spec_names_and_writes_nothing(tree, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(small_regression_spec(tmp_path, space=TINY_SPACE).read_text())
    raw["name"] = name
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    before = snapshot(tmp_path)
    result = invoke(["create-study", str(spec), "--storage", f"sqlite:///{tmp_path / 'new.db'}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": name: got " in lines[0], result.stderr
    assert snapshot(tmp_path) == before


def test_export_best_of_a_study_named_dot_dot_leaves_the_store_whole(tree):
    """The reported data loss, through the real entry point: the store and its files stay."""
    before = snapshot(tree)
    env = dict(os.environ)
    env.pop("HPO_STORAGE", None)
    env.pop("HPO_ARTIFACTS", None)
    for args in (["export-best", "--study", ".."], ["export-best", "--study", ".", "--force"]):
        proc = run_hpo(*args, env=env, cwd=tree / "work", check=2)
        assert proc.stderr.count("\n") == 1 and "--study: got '" in proc.stderr, proc.stderr
    assert snapshot(tree) == before


def test_export_force_replaces_only_an_export_folder(tree, tmp_path, monkeypatch):
    """``--force`` replaces a folder export-best wrote; never a folder of anything else, never
    '.', '..' or '/', whatever the path's parents."""
    work = tmp_path / "work"
    (work / "storage").mkdir(parents=True)
    (work / "storage" / "hpo.db").write_bytes((tree / "work" / "storage" / "hpo.db").read_bytes())
    rename(work / "storage" / "hpo.db", "..", "reg")
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_ARTIFACTS", raising=False)
    before = snapshot(tmp_path)
    for out in ("mine", ".", "..", "/", "storage/nowhere/..", str(work)):
        result = invoke(["export-best", "--study", "reg", "--out", out, "--force"])
        assert result.exit_code == 2, (out, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and "--out: " in result.stderr, result.stderr
        assert snapshot(tmp_path) == before, out
    assert invoke(["export-best", "--study", "reg", "--out", "exp"]).exit_code == 0
    (work / "exp" / "extra.txt").write_text("from an older export\n")
    assert invoke(["export-best", "--study", "reg", "--out", "exp", "--force"]).exit_code == 0
    assert (work / "exp" / "manifest.json").is_file() and not (work / "exp" / "extra.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["exp", "mine", "storage"]  # no staging left behind
