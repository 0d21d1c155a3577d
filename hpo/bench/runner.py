"""``hpo bench``: every measurement in one run, as rows of one table (and JSON).

Sections, in order: the step's operator counts (CPU profiler), the seeds' DataLoader loop against
the hpo trainer, graph against eager for eight training features, N workers on one device (with
and without MPS), and the stacked against the sequential 10-fold retrain. A section that fails is
reported as a problem with its rows marked, and the others still run.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpo.bench import data as bench_data
from hpo.bench import ops, retrain, trainer, workers


@dataclass(frozen=True)
class Plan:
    trainer_images: int | None  # None: all 60,000
    test_images: int | None
    trainer_epochs: int
    case_images: int
    case_epochs: int
    worker_counts: tuple[int, ...]
    worker_seconds: float
    folds: int
    retrain_images: int | None
    stacked_epochs: int
    sequential_epochs: int


PLANS = {
    # estimated at about 5 minutes on one H200 (not yet run on a GPU)
    "full": Plan(trainer_images=None, test_images=None, trainer_epochs=3, case_images=10000, case_epochs=3,
                 worker_counts=(1, 2, 4, 8), worker_seconds=15, folds=10, retrain_images=None,
                 stacked_epochs=5, sequential_epochs=1),
    # under 2 minutes on 2 shared CPU cores
    "quick": Plan(trainer_images=1024, test_images=1000, trainer_epochs=2, case_images=256, case_epochs=2,
                  worker_counts=(1, 2), worker_seconds=6, folds=10, retrain_images=300,
                  stacked_epochs=1, sequential_epochs=1),
}


def _row(section: str, name: str, *, s_per_epoch=None, model_epochs_per_s=None, speedup=None, test_accuracy=None,
         path: str = "", why: str = "", **extra: Any) -> dict[str, Any]:
    return {"section": section, "name": name, "s_per_epoch": s_per_epoch, "model_epochs_per_s": model_epochs_per_s,
            "speedup": speedup, "test_accuracy": test_accuracy, "path": path, "why": why, **extra}


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / abs(b):+.1f} %" if b else "n/a"


def _rates_of(run: dict) -> dict:
    keep = ("s_per_epoch", "model_epochs_per_s", "test_accuracy", "epoch_s", "first_epoch_s")
    return {k: run[k] for k in keep if k in run}


def _trainer_rows(data, dev: torch.device, plan: Plan) -> list[dict]:
    ds = trainer.bench_dataset(data, dev, train_images=plan.trainer_images, test_images=plan.test_images)
    n = len(ds.train_idx)
    section = f"trainer: LeNet-5, {n} images, batch {trainer.BATCH}, {plan.trainer_epochs} epochs"
    loop = trainer.dataloader_loop(data, ds, device=dev, epochs=plan.trainer_epochs, images=n)
    rows = [_row(section, "DataLoader loop (the seeds')", speedup=1.0, path="DataLoader",
                 why="torchvision Dataset, ToTensor + Normalize per sample", **_rates_of(loop))]
    eager = trainer.hpo_trainer(ds, epochs=plan.trainer_epochs, cuda_graph=False)
    rows.append(_row(section, "hpo trainer, eager", speedup=loop["s_per_epoch"] / eager["s_per_epoch"],
                     path="eager", why="data on the device, batches by index; + validation each epoch", **_rates_of(eager)))
    if dev.type == "cuda":
        graph = trainer.hpo_trainer(ds, epochs=plan.trainer_epochs, cuda_graph=True)
        rows.append(_row(section, "hpo trainer, graph", speedup=loop["s_per_epoch"] / graph["s_per_epoch"],
                         path=graph["path"], why=graph["path_reason"] or "whole step replayed from one CUDA graph",
                         **_rates_of(graph)))
    else:
        rows.append(_row(section, "hpo trainer, graph", path="", why="graph: cuda only"))
    return rows


def _case_rows(data, dev: torch.device, plan: Plan) -> list[dict]:
    ds = trainer.bench_dataset(data, dev, train_images=plan.case_images, test_images=plan.test_images)
    section = (f"graph vs eager: same weights and seed, {len(ds.train_idx)} images, {plan.case_epochs} epochs "
               "(eager twice: the run-to-run spread)")
    rows = []
    for name, case in trainer.CASES.items():
        runs = trainer.graph_vs_eager(ds, epochs=plan.case_epochs, case=case)
        eager, again, graph = runs["eager"], runs["eager_again"], runs["graph"]
        spread = (f"eager again: train loss {_pct(again['train_loss'], eager['train_loss'])}, "
                  f"val acc {eager['val_accuracy']:.3f} / {again['val_accuracy']:.3f}")
        if graph is None:
            rows.append(_row(section, name, path="eager", why=f"graph: cuda only; {spread}", runs=runs,
                             **_rates_of(eager)))
            continue
        why = (f"graph: train loss {_pct(graph['train_loss'], eager['train_loss'])}, val acc "
               f"{graph['val_accuracy']:.3f}; {spread}" + (f"; {graph['path_reason']}" if graph["path_reason"] else ""))
        rows.append(_row(section, name, speedup=eager["s_per_epoch"] / graph["s_per_epoch"], path=graph["path"],
                         why=why, runs=runs, **_rates_of(graph)))
    return rows


def _worker_rows(data, dev: torch.device, plan: Plan, scratch: Path, *, quick: bool) -> list[dict]:
    spec = workers.write_spec(scratch, quick=quick)
    on_gpu = dev.type == "cuda"
    where = f"one GPU ({dev})" if on_gpu else f"the CPU ({os.cpu_count()} cores: the workers share them)"
    section = (f"workers: N `hpo worker` on {where}, study fmnist{' (cut down)' if quick else ''}, "
               f"{plan.worker_seconds:.0f} s each")
    already = on_gpu and workers.mps_running()
    rows: list[dict] = []
    base = None

    def add(n: int, sharing: str, extra_env: dict | None) -> None:
        nonlocal base
        r = workers.run_round(n, spec=spec, storage=f"sqlite:///{scratch}/workers-{sharing}-{n}.db", device=str(dev),
                              seconds=plan.worker_seconds, data_dir=str(data.folder), extra_env=extra_env)
        rate = r["model_epochs_per_s"]
        base = rate if base is None else base
        best = f"{r['best_val']:.3f}" if r["best_val"] is not None else "-"
        why = (f"{r['finished']} trials ({r['pruned']} pruned, {r['failed']} failed) in {r['span_s']:.0f} s "
               f"after {r['startup_s'] or 0:.0f} s start-up; best val {best}"
               + ("" if r["steady"] else "; rate includes the first trials (too few for a steady rate)"))
        if already and sharing == "time-slice":
            why += "; an MPS daemon was already running on this machine"
        if r["errors"]:
            why += "; " + "; ".join(r["errors"][:2])
        rows.append(_row(section, f"{n} worker{'s' if n > 1 else ''}" + (" + MPS" if sharing == "mps" else ""),
                         model_epochs_per_s=rate, speedup=rate / base if rate and base else None,
                         path=sharing, why=why, round=r))

    for n in plan.worker_counts:
        add(n, "time-slice" if on_gpu else "cpu", None)
    shared = [n for n in plan.worker_counts if n > 1]
    if not on_gpu:
        rows += [_row(section, f"{n} workers + MPS", path="mps", why="skipped: MPS: cuda only") for n in shared]
        return rows
    with workers.mps_daemon(scratch, str(dev)) as (env, reason):
        for n in shared:
            if env is None:
                rows.append(_row(section, f"{n} workers + MPS", path="mps", why=f"skipped: {reason}"))
            else:
                add(n, "mps", env)
    return rows


def _retrain_rows(data, dev: torch.device, plan: Plan) -> list[dict]:
    r = retrain.stacked_vs_sequential(data, device=dev, folds=plan.folds, images=plan.retrain_images,
                                      stacked_epochs=plan.stacked_epochs, sequential_epochs=plan.sequential_epochs)
    images = f"{plan.retrain_images} images" if plan.retrain_images else "all images"
    section = f"retrain: {plan.folds} folds of {images}, LeNet-5, batch 64"
    rows = []
    for name in ("sequential", "stacked"):
        x = r[name]
        speedup = x["model_epochs_per_s"] / r["sequential"]["model_epochs_per_s"]
        why = (f"{x['epochs']} epoch{'s' if x['epochs'] > 1 else ''} per fold; test acc best fold {x['best_fold']:.3f}, "
               f"majority vote {x['majority_vote']:.3f}, soft vote {x['soft_vote']:.3f}")
        if x["notes"]:
            why += "; " + "; ".join(x["notes"])
        rows.append(_row(section, f"{plan.folds} folds, {name}", s_per_epoch=x["s_per_epoch"],
                         model_epochs_per_s=x["model_epochs_per_s"], speedup=speedup, test_accuracy=x["majority_vote"],
                         path=x["path"], why=why, retrain=x))
    return rows


def _problems(rows: list[dict], dev: torch.device) -> list[str]:
    problems = []
    for r in rows:
        what = f"{r['section'].split(':')[0]}: {r['name']}"
        for key in ("s_per_epoch", "model_epochs_per_s", "test_accuracy"):
            if r[key] is not None and not math.isfinite(r[key]):
                problems.append(f"{what}: {key} is {r[key]}")
        if r.get("error"):
            problems.append(f"{what}: {r['error']}")
        rnd = r.get("round")
        if rnd and (rnd["errors"] or rnd["failed"] or not rnd["finished"]):
            problems.append(f"{what}: {rnd['finished']} trials finished, {rnd['failed']} failed, "
                            f"worker errors: {rnd['errors'] or 'none'}")
        # On CUDA every step but the deliberately eager trainer row should replay a graph.
        if dev.type == "cuda" and "eager" in r["path"] and r["name"] != "hpo trainer, eager":
            problems.append(f"{what}: ran eager on CUDA ({r['why']})")
        if dev.type == "cuda" and rnd and "eager" in rnd["paths"]:
            problems.append(f"{what}: some trials ran eager on CUDA")
    return problems


def run_bench(*, device: torch.device, data_dir: str | None = None, quick: bool = False,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every part of the bench on ``device`` and return the report.

    Args:
        data_dir: where the Fashion-MNIST IDX files are (default: hpo's usual places); synthetic
            images are used when none are found, and the report says so.
        quick: the smaller plan (under 2 minutes on two CPU cores).
        echo: where progress lines go.

    Returns:
        ``{"rows": [...], "problems": [...], "step_operators": {...}, "data": ..., ...}``; each row
        has ``section``, ``name``, ``s_per_epoch``, ``model_epochs_per_s``, ``speedup``,
        ``test_accuracy`` (None where it does not apply), ``path`` and ``why``.
    """
    plan = PLANS["quick" if quick else "full"]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as hpo's CPU workers run these small models (hpo.data.sources.on_device)
    report: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": 1 if device.type == "cpu" else threads,
        "quick": quick, "plan": plan.__dict__, "load_average_start": os.getloadavg()[0], "rows": [],
    }
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as scratch:
        scratch_path = Path(scratch)
        data = bench_data.prepare(scratch_path, data_dir=data_dir, quick=quick)
        report["data"], report["synthetic"] = data.source, data.synthetic
        echo(f"data: {data.source}")
        echo("step operators (CPU profiler) ...")
        report["step_operators"] = ops.step_report()
        sections = [("trainer", lambda: _trainer_rows(data, device, plan)),
                    ("graph vs eager", lambda: _case_rows(data, device, plan)),
                    ("workers", lambda: _worker_rows(data, device, plan, scratch_path, quick=quick)),
                    ("retrain", lambda: _retrain_rows(data, device, plan))]
        for name, run in sections:
            echo(f"{name} ...")
            t = time.perf_counter()
            try:
                report["rows"] += run()
            except Exception as e:  # one broken part must not hide the others' numbers
                report["rows"].append(_row(name, "(failed)", path="error", why=f"{type(e).__name__}: {e}"[:300],
                                           error=traceback.format_exc(limit=3)[-600:]))
            echo(f"{name}: {time.perf_counter() - t:.0f} s")
    torch.set_num_threads(threads)
    report["problems"] = _problems(report["rows"], device)
    report["seconds"] = time.perf_counter() - start
    report["load_average_end"] = os.getloadavg()[0]
    return report


def _num(value: float | None, fmt: str) -> str:
    return format("-", f">{fmt.split('.')[0]}") if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table, one section after another, with the step counts and problems."""
    lines = [f"hpo bench on {report['device']}, torch {report['torch']}, {report['cpu_count']} CPU cores "
             f"(load average {report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} at the end)",
             f"data: {report['data']}"]
    head = f"  {'what':<30} {'s/epoch':>8} {'m-ep/s':>8} {'speed-up':>8} {'test acc':>8}  {'path':<20} why"
    section = None
    for r in report["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines += ["", section, head]
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(f"  {r['name']:<30} {_num(r['s_per_epoch'], '8.3f')} {_num(r['model_epochs_per_s'], '8.2f')} "
                     f"{speedup:>8} {_num(r['test_accuracy'], '8.3f')}  {r['path'] or '-':<20} {r['why']}")
    s = report.get("step_operators")
    if s:
        syncs = s["host_syncs_per_epoch"]
        lines += ["", f"step operators (CPU profiler, {s['models']} LeNet-5, batch {s['batch']}): stacked step "
                  f"{s['stacked_step_operators']} ({s['stacked_step_kernels']} kernels), reference step (anchors' "
                  f"gpu_limit.py) {s['reference_step_operators']} ({s['reference_step_kernels']} kernels); host syncs "
                  f"per epoch of {s['models']} folds: stacked {syncs['stacked']}, sequential {syncs['sequential']}"]
    lines.append("")
    lines.append(f"{len(report['rows'])} rows in {report['seconds']:.0f} s; "
                 + ("no problems" if not report["problems"] else f"{len(report['problems'])} problems:"))
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
