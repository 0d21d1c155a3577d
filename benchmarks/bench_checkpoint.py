"""What checkpoints cost: the same trials trained with checkpoints (the spec's default, every 60 s)
and without (``checkpoint: false``), in one run, through the real worker on a SQLite store.

    python benchmarks/bench_checkpoint.py                      # LeNet-5 on a Fashion-MNIST subset + the regression study
    python benchmarks/bench_checkpoint.py --epochs 4 --regression-trials 10 --repeats 1   # a quick look (no LeNet save)

Two studies:
- ``lenet``: one LeNet-5 trial (the seed's network, Adam, batch 64, dropout) on a subset of the real
  Fashion-MNIST (``--data-dir``, default Debian's), long enough to pass the 60 s interval;
- ``regression``: the shipped regression study's first ``--regression-trials`` trials (one worker:
  the same seeded trials each run), most of them shorter than the interval.

Runs alternate off / on, ``--repeats`` times. For each study it prints the training time
(the trials' ``train_seconds``) with and without checkpoints and their ratio, and, measured inside
the runs with checkpoints, the time spent in checkpointing itself (capturing the trainer's state,
writing the file, deleting it when the lineage ends) as a share of the training time: the cost
that the with/without difference shows through the machine's noise. Also the cost of one
checkpoint and what checkpointing every epoch (``every_seconds: 0``) would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpo.data.tables import embed_csv  # noqa: E402
from hpo.running.worker import run_worker  # noqa: E402
from hpo.search.study import create  # noqa: E402
from hpo.spec.schema import load_spec_file  # noqa: E402
from hpo.store.storage import open_storage  # noqa: E402
from hpo.training import checkpoint
from hpo.training import state as train_state

REPO = Path(__file__).resolve().parent.parent
LENET = {"n_conv": 2, "filters": [6, 16], "kernel_size": 5, "padding": 2, "pooling": "max", "batch_norm": False,
         "n_dense": 2, "dense_width": [120, 84], "conv_dropout": 0.3, "dropout": 0.3, "batch_size": 64,
         "lr": 1.0e-3, "weight_decay": 1.0e-4}


class Timer:
    """Seconds spent in the checkpoint calls (wrapped around the library's own functions)."""

    def __init__(self):
        self.seconds, self.saves, self.bytes = 0.0, 0, 0
        self._patched = []

    def wrap(self, owner, name: str, count_save: bool = False):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                if count_save:
                    self.saves += 1
        setattr(owner, name, timed)
        self._patched.append((owner, name, real))

    def __enter__(self) -> Timer:
        self.wrap(train_state, "capture")
        self.wrap(checkpoint.CheckpointStore, "save", count_save=True)
        self.wrap(checkpoint.CheckpointStore, "delete")
        self.wrap(checkpoint.CheckpointStore, "read")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._patched):
            setattr(owner, name, real)


def lenet_spec(folder: Path, args) -> Path:
    raw = yaml.safe_load((REPO / "studies" / "fmnist.yaml").read_text())
    raw["name"] = "bench_lenet"
    raw["data"].update(train_subset=args.train_subset, val_subset=args.train_subset // 2, data_dir=args.data_dir)
    raw["space"] = {"optimizer": {"choice": ["Adam"]}}
    raw["fixed"].update(LENET, epochs=args.epochs)
    raw.update(pruner={"kind": "none"}, budget={"n_trials": 1})
    path = folder / "lenet.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def regression_spec(folder: Path, args) -> Path:
    raw = yaml.safe_load((REPO / "studies" / "regression.yaml").read_text())
    raw["name"] = "bench_regression"
    for part in ("train", "test"):
        raw["data"][part] = str(REPO / "studies" / raw["data"][part])
    raw["budget"] = {"n_trials": args.regression_trials}
    path = folder / "regression.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_once(spec_path: Path, folder: Path, *, checkpoints: bool) -> dict:
    """One fresh study of ``spec_path`` run by one in-process worker; its training time."""
    raw = yaml.safe_load(spec_path.read_text())
    if not checkpoints:
        raw["checkpoint"] = False
    path = folder / f"{raw['name']}-{'on' if checkpoints else 'off'}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = folder / f"{time.monotonic_ns()}.db"
    url = f"sqlite:///{store}"
    create(embed_csv(load_spec_file(path)), open_storage(url, heartbeat=False))
    with Timer() as timer:
        start = time.perf_counter()
        run_worker(raw["name"], storage_url=url, echo=lambda line: None)
        wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=raw["name"], storage=url).get_trials()
    left = list((store.parent / "artifacts" / "checkpoints" / raw["name"]).glob("*.ckpt"))
    return {"train_s": sum(t.user_attrs.get("train_seconds", 0.0) for t in trials), "wall_s": wall,
            "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in trials), "trials": len(trials),
            "checkpoint_s": timer.seconds, "saves": timer.saves, "files_left": len(left),
            "values": [t.value for t in trials]}


def one_save_cost(spec_path: Path, folder: Path, repeats: int = 20) -> dict:
    """Seconds and bytes of one checkpoint of the study's trained model (state capture + file)."""
    from hpo.data.sources import load_dataset
    from hpo.nn.models import build_model
    from hpo.spec.hyperparams import resolve
    from hpo.training.trainer import train

    spec = load_spec_file(spec_path)
    data = load_dataset(spec)
    hp = resolve({**spec.fixed, "optimizer": "Adam", "epochs": 2})
    hp["epochs"] = 2
    model = build_model(spec.model, hp, in_shape=data.in_shape, out_features=data.out_features)
    states = []
    train(model, data, hp, seed=0, checkpoint=lambda done, state: states.append(state))
    store = checkpoint.CheckpointStore(folder / "one")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        path = store.save("trial-0", {"train": states[0]().to_dict()}, meta={"trial": 0})
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-subset", type=int, default=10000,
                        help="Fashion-MNIST training images, the shipped study's subset (validation: half as many)")
    parser.add_argument("--epochs", type=int, default=30, help="LeNet-5 epochs: enough to pass the 60 s interval")
    parser.add_argument("--regression-trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs per study (the order alternates)")
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hpo-bench-checkpoint-"))
    os.environ.setdefault("HPO_CACHE_DIR", str(folder / "cache"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    report = {}
    for name, spec in (("lenet", lenet_spec(folder, args)), ("regression", regression_spec(folder, args))):
        # First, one checkpoint's cost: it trains two epochs, which also warms up the process
        # (lazily loaded kernels, the data cache) before the measured runs.
        cost = one_save_cost(spec, folder) if name == "lenet" else None
        if name == "regression":
            run_once(spec, folder, checkpoints=False)  # warm-up, not counted
        runs = {"off": [], "on": []}
        for repeat in range(args.repeats):
            for mode in (("off", "on") if repeat % 2 == 0 else ("on", "off")):
                runs[mode].append(run_once(spec, folder, checkpoints=mode == "on"))
        off = statistics.median(r["train_s"] for r in runs["off"])
        on = statistics.median(r["train_s"] for r in runs["on"])
        inside = sum(r["checkpoint_s"] for r in runs["on"]) / sum(r["train_s"] for r in runs["on"])
        same = all(r["values"] == runs["off"][0]["values"] for r in runs["off"] + runs["on"])
        epochs = runs["on"][0]["epochs"]
        report[name] = {"runs": runs, "train_s_off": off, "train_s_on": on, "ratio_on_off": on / off,
                        "checkpoint_share": inside, "same_values": same, "one_checkpoint": cost,
                        "every_epoch_share": cost and cost["seconds"] * epochs / off}
    print(f"{'study':11s} {'trials':>6s} {'epochs':>7s} {'train s off':>11s} {'train s on':>10s} {'on/off':>7s} "
          f"{'saves':>5s} {'in checkpointing':>16s} {'same values':>11s}")
    for name, r in report.items():
        first = r["runs"]["on"][0]
        print(f"{name:11s} {first['trials']:6d} {first['epochs']:7d} {r['train_s_off']:11.1f} {r['train_s_on']:10.1f} "
              f"{r['ratio_on_off']:7.3f} {first['saves']:5d} {100 * r['checkpoint_share']:15.3f}% {str(r['same_values']):>11s}")
    cost = report["lenet"]["one_checkpoint"]
    print(f"one LeNet-5 checkpoint (weights and Adam state): {1000 * cost['seconds']:.1f} ms, "
          f"{cost['bytes'] / 1024:.0f} KiB; every epoch instead of every 60 s: "
          f"{100 * report['lenet']['every_epoch_share']:.2f}% of training")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
