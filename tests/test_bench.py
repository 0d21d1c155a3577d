"""``hpo bench``: the quick CPU run end to end, the stacked step's operator budget written in
benchmarks/README.md, one host sync per stacked epoch, and the synthetic stand-in data."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_hpo

README = REPO / "benchmarks" / "README.md"


def readme_operator_budget() -> int:
    """The stacked step's operator count as benchmarks/README.md records it."""
    match = re.search(r"\*\*hpo stacked step\*\*[^|]*\|\s*\*\*(\d+)\*\*", README.read_text())
    assert match, "benchmarks/README.md lost its row '| **hpo stacked step** ... | **N** |'"
    return int(match.group(1))


def test_stacked_step_operators_do_not_grow_past_the_readme(one_torch_thread):
    from hpo.bench.ops import reference_step_operators, stacked_step_operators

    stacked = stacked_step_operators()
    assert sum(stacked.values()) <= readme_operator_budget(), dict(stacked)
    # The count is of real work: forward, backward and the optimizer are all in it.
    assert stacked["aten::conv2d"] == 2 and stacked["aten::convolution_backward"] == 2
    assert stacked["aten::lerp_"] == 2 and stacked["aten::addcdiv_"] == 1  # Adam's moments and update
    assert sum(reference_step_operators().values()) < sum(stacked.values())


def test_stacked_epoch_reads_the_device_once(one_torch_thread):
    from hpo.bench.ops import host_syncs_per_epoch

    syncs = host_syncs_per_epoch(k=4)
    assert syncs == {"stacked": 1, "sequential": 3 * 4}  # train(): the epoch's loss and two validation metrics


def test_missing_data_set_gives_clearly_labelled_synthetic_images(tmp_path: Path):
    from hpo.bench.data import prepare
    from hpo.bench.trainer import bench_dataset

    data = prepare(tmp_path / "scratch", data_dir=str(tmp_path / "nowhere"), quick=True)
    assert data.synthetic and data.source.startswith("SYNTHETIC") and str(tmp_path / "nowhere") in data.source
    ds = bench_dataset(data, torch.device("cpu"), train_images=500, test_images=100)
    assert tuple(ds.x.shape[1:]) == (1, 28, 28) and len(ds.train_idx) == 500 and len(ds.x_test) == 100
    assert set(ds.y.tolist()) == set(range(10))


def test_bad_device_or_json_path_is_refused_before_anything_runs(tmp_path: Path):
    proc = run_hpo("bench", "--device", "tpu", "--json", str(tmp_path / "out.json"), check=2)
    assert "--device: 'tpu'" in proc.stderr and not (tmp_path / "out.json").exists()
    proc = run_hpo("bench", "--device", "cpu", "--json", str(tmp_path / "no" / "out.json"), check=2)
    assert proc.stderr.startswith("hpo: error: --json:") and "does not exist" in proc.stderr
    assert "data:" not in proc.stderr  # refused before the bench began


QUICK_CPU_ROWS = [
    ("trainer", "DataLoader loop (the seeds')"), ("trainer", "hpo trainer, eager"), ("trainer", "hpo trainer, graph"),
    *[("graph vs eager", case) for case in ("Adam", "RMSprop + exponential", "SGD + momentum", "Adam + plateau",
                                            "batch-norm", "dropout", "augmentation", "early stopping")],
    ("workers", "1 worker"), ("workers", "2 workers"), ("workers", "2 workers + MPS"),
    ("retrain", "10 folds, sequential"), ("retrain", "10 folds, stacked"),
]


@pytest.mark.slow
def test_quick_cpu_bench_has_every_row_within_two_minutes(tmp_path: Path, cli_env):
    out = tmp_path / "bench.json"
    start = time.monotonic()
    proc = run_hpo("bench", "--device", "cpu", "--quick", "--json", str(out), env=cli_env, check=0, timeout=600)
    seconds = time.monotonic() - start
    report = json.loads(out.read_text())
    assert [(r["section"].split(":")[0], r["name"]) for r in report["rows"]] == QUICK_CPU_ROWS
    assert report["problems"] == [] and "no problems" in proc.stdout
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("DataLoader loop (the seeds')", "hpo trainer, eager", "10 folds, sequential", "10 folds, stacked"):
        r = rows[name]
        assert r["s_per_epoch"] > 0 and r["model_epochs_per_s"] > 0 and 0 <= r["test_accuracy"] <= 1, name
    assert rows["hpo trainer, graph"]["why"] == "graph: cuda only"
    assert all(rows[c]["why"].startswith("graph: cuda only; eager again") for _, c in QUICK_CPU_ROWS[3:11])
    assert rows["1 worker"]["model_epochs_per_s"] > 0 and rows["2 workers"]["round"]["finished"] > 0
    assert rows["2 workers + MPS"]["why"] == "skipped: MPS: cuda only"
    assert report["step_operators"]["stacked_step_operators"] <= readme_operator_budget()
    assert report["step_operators"]["host_syncs_per_epoch"]["stacked"] == 1
    # Under two minutes on 2 CPU cores however loaded the machine is by other runs (the report
    # records the load average it saw).
    assert seconds < 120, f"{seconds:.0f} s at load average {report['load_average_start']:.1f}"


FAKE_MPS_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {log}; exit {start_code}; fi
read command
echo "$command" >> {log}
if [ "$command" = get_server_list ]; then echo {servers}; fi
"""


def fake_mps_control(tmp_path: Path, monkeypatch, *, start_code: int = 0, servers: str = "4242") -> Path:
    """An nvidia-cuda-mps-control on PATH that records its calls."""
    log = tmp_path / "calls.log"
    binary = tmp_path / "bin" / "nvidia-cuda-mps-control"
    binary.parent.mkdir()
    binary.write_text(FAKE_MPS_CONTROL.format(log=log, start_code=start_code, servers=servers))
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    return log


def test_bench_mps_daemon_runs_in_its_own_folder_and_is_stopped(tmp_path: Path, monkeypatch):
    from hpo.bench.workers import mps_daemon

    log = fake_mps_control(tmp_path, monkeypatch)
    with mps_daemon(tmp_path / "scratch", "cpu") as (env, reason):
        assert reason == "" and env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "scratch" / "mps-pipe")
        assert log.read_text().splitlines() == [f"start {tmp_path / 'scratch' / 'mps-pipe'}", "get_server_list"]
    assert log.read_text().splitlines()[-1] == "quit"


@pytest.mark.parametrize("start_code,servers,reason", [(1, "4242", "nvidia-cuda-mps-control -d failed"),
                                                       (0, "", "no MPS server came up")])
def test_bench_mps_daemon_that_cannot_serve_is_skipped_with_the_reason(tmp_path: Path, monkeypatch, start_code,
                                                                      servers, reason):
    from hpo.bench.workers import mps_daemon

    log = fake_mps_control(tmp_path, monkeypatch, start_code=start_code, servers=servers)
    with mps_daemon(tmp_path / "scratch", "cpu") as (env, why):
        assert env is None and why.startswith(reason)
    assert log.read_text().splitlines()[-1] == ("quit" if start_code == 0 else f"start {tmp_path / 'scratch' / 'mps-pipe'}")


@pytest.mark.slow
@pytest.mark.parametrize("argv, says", [
    (["bench_cv.py", "mlp", "--epochs", "2", "--repeat", "1"], '"stacked_over_sequential"'),
    (["bench_scale.py", "--sizes", "10", "--backends", "sqlite", "--worker-trials", "1"], "| sqlite | 10 |"),
    (["bench_data.py", "--mb", "0.2", "sqlite:///{tmp}/data.db"], "sqlite"),
])
def test_the_benchmark_scripts_still_run_against_the_code(tmp_path, argv, says):
    """The scripts under benchmarks/ call hpo's modules directly: run each at its smallest so a
    renamed function or a new field breaks a test, not the next measurement (it did, twice)."""
    import subprocess
    import sys

    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert says in proc.stdout, proc.stdout[-2000:]
