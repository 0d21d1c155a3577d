"""N workers of one study sharing one GPU: starts 1, 4 and 8 ``hpo worker --study NAME --gpu 0``
processes against one store and prints trials finished per minute and model-epochs per second in
total (model-epochs: the trials' ``epochs_run`` user attr, pruned trials included).

    python benchmarks/bench_workers.py --data-dir DATA_ROOT                  # GPU 0, fmnist, 120 s each
    python benchmarks/bench_workers.py --device cpu --workers 1,2 --seconds 30 --spec SMALL.yaml  # smoke

Each N gets a fresh study (create-study --force) in the store (default: a temporary SQLite file;
pass --storage postgresql://... for many workers). Workers stop starting trials after --seconds;
the rates divide by the wall time from launch until the last worker exits (data loading included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parent.parent
HPO = [sys.executable, "-m", "hpo.cli"]


def run_round(n: int, *, spec: Path, name: str, storage: str, device_args: list[str], seconds: float,
              data_dir: str | None) -> dict:
    env = {**os.environ, "HPO_STORAGE": storage, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*HPO, "create-study", str(spec), "--force"], env=env, cwd=REPO, check=True, capture_output=True)
    extra = ["--data-dir", data_dir] if data_dir else []
    start = time.perf_counter()
    procs = [subprocess.Popen([*HPO, "worker", "--study", name, *device_args, "--worker-index", str(i),
                               "--timeout", str(seconds), *extra], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    errors = [p.stderr.read().strip().splitlines()[-1:] for p, c in zip(procs, codes) if c != 0]
    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    epochs = sum(int(t.user_attrs.get("epochs_run", 0)) for t in finished)
    best = study.best_value if any(t.state.name == "COMPLETE" for t in finished) else None
    paths = sorted({t.user_attrs.get("train_path", "?") for t in finished if t.state.name == "COMPLETE"})
    return {"workers": n, "wall_s": wall, "finished": len(finished),
            "pruned": sum(t.state.name == "PRUNED" for t in finished),
            "failed": sum(t.state.name == "FAIL" for t in finished), "model_epochs": epochs,
            "trials_per_min": 60 * len(finished) / wall, "model_epochs_per_s": epochs / wall,
            "best": best, "paths": paths, "exit_codes": codes, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(REPO / "studies" / "fmnist.yaml"))
    parser.add_argument("--workers", default="1,4,8", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=120.0, help="each worker stops starting trials after this")
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cpu: overrides --gpu")
    parser.add_argument("--storage", default=None, help="store URL (default: a temporary SQLite file)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="write results here (default: $OUT/bench_workers.json if $OUT is set)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    spec = Path(args.spec)
    name = yaml.safe_load(spec.read_text())["name"]
    device_args = ["--device", args.device] if args.device else ["--gpu", str(args.gpu)]
    with tempfile.TemporaryDirectory() as scratch:
        storage = args.storage or f"sqlite:///{scratch}/bench.db"
        print(f"study {name} from {spec}, {' '.join(device_args)}, {args.seconds:.0f} s per round")
        print(f"{'workers':>7} {'wall s':>7} {'trials':>7} {'pruned':>7} {'trials/min':>10} {'m-epochs':>9} {'m-ep/s':>8} {'best':>7}  path")
        rows = []
        for n in (int(w) for w in args.workers.split(",")):
            r = run_round(n, spec=spec, name=name, storage=storage, device_args=device_args,
                          seconds=args.seconds, data_dir=args.data_dir)
            rows.append(r)
            best = f"{r['best']:.4f}" if r["best"] is not None else "-"
            print(f"{n:>7} {r['wall_s']:>7.1f} {r['finished']:>7} {r['pruned']:>7} {r['trials_per_min']:>10.2f} "
                  f"{r['model_epochs']:>9} {r['model_epochs_per_s']:>8.2f} {best:>7}  {','.join(r['paths'])}")
            for e in r["errors"]:
                print(f"        worker error: {e}")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_workers.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
