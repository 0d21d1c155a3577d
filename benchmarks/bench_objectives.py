"""Pareto pruning measured: the two-objective regression study (``val_mse``, ``n_params``) run with
``pruner: {kind: pareto}`` and with no pruning, the same spec and seeds, each until it has spent
the same number of training epochs, in one run.

    python benchmarks/bench_objectives.py                        # 1,500 epochs each
    python benchmarks/bench_objectives.py --epochs-budget 600    # a quick look

For each run it prints the trials (complete / pruned), the epochs spent (the trials' ``epochs_run``;
the last trial may pass the budget, so the exact number is printed), the Pareto set's size and the
hypervolume it dominates (Optuna's own computation, ``hpo.store.optuna_private.hypervolume``), both
objectives minimized, against one reference point for both runs: each objective's worst complete
value over the two runs, a tenth of its range further. More hypervolume for the same epochs is
what pruning buys: pruned trials stop early and leave epochs for more configurations.

Then constraints: the regression study (one objective) with ``constraints: {n_params: {max: 1000}}``
(only one-layer networks fit: a third of ``n_layers``' range) and 5 epochs a trial, ``--constraint-trials``
trials with TPE and with random search, same seed: the share of infeasible suggestions in the first
and the second half of each study. Infeasible configurations train nothing and still teach TPE
(their constraint values), so its share falls; random search's stays near two thirds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo.data.sources import load_dataset  # noqa: E402
from hpo.data.tables import embed_csv  # noqa: E402
from hpo.search.objective import make_objective  # noqa: E402
from hpo.search.pareto import minimizing, non_dominated  # noqa: E402
from hpo.search.study import create, open_study  # noqa: E402
from hpo.spec.schema import load_spec_file  # noqa: E402
from hpo.store import optuna_private  # noqa: E402
from hpo.store.storage import open_storage  # noqa: E402

PRUNERS = {"none": {"kind": "none"}, "pareto": {"kind": "pareto", "n_startup_trials": 5, "n_warmup_steps": 20}}


def constrained_share(folder: Path, sampler: str, *, seed: int, n_trials: int) -> tuple[float, float]:
    """Share of infeasible trials in the first and second half of a constrained study."""
    raw = yaml.safe_load((ROOT / "studies" / "regression.yaml").read_text())
    raw.update(name=f"c_{sampler}", seed=seed, pruner={"kind": "none"}, budget={"n_trials": None},
               constraints={"n_params": {"max": 1000}}, sampler={"kind": sampler, **(
                   {"n_startup_trials": 10} if sampler == "tpe" else {})})
    raw["data"]["train"] = str(ROOT / "studies" / "data" / "regression_train.csv")
    raw["data"]["test"] = str(ROOT / "studies" / "data" / "regression_test.csv")
    raw["space"].pop("epochs")
    raw["fixed"]["epochs"] = 5
    path = folder / f"c_{sampler}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    storage = open_storage(f"sqlite:///{folder / ('c_' + sampler + '.db')}", heartbeat=False)
    create(embed_csv(load_spec_file(path)), storage, force=True)
    study, spec = open_study(f"c_{sampler}", storage)
    study.optimize(make_objective(spec, load_dataset(spec, storage=storage)), n_trials=n_trials)
    infeasible = [t.user_attrs.get("feasible") is False for t in study.get_trials(deepcopy=False)]
    half = len(infeasible) // 2
    return sum(infeasible[:half]) / half, sum(infeasible[half:]) / (len(infeasible) - half)


def spec_file(folder: Path, name: str, pruner: dict, *, seed: int) -> Path:
    raw = yaml.safe_load((ROOT / "studies" / "regression.yaml").read_text())
    raw.pop("metric"), raw.pop("direction")
    raw.update(name=name, seed=seed, pruner=pruner, report_every=10, budget={"n_trials": None},
               objectives=[{"metric": "val_mse"}, {"metric": "n_params"}])
    raw["data"]["train"] = str(ROOT / "studies" / "data" / "regression_train.csv")
    raw["data"]["test"] = str(ROOT / "studies" / "data" / "regression_test.csv")
    raw["space"]["epochs"] = {"int": [20, 100], "step": 10}
    raw["sampler"] = {"kind": "tpe", "n_startup_trials": 10}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(folder: Path, name: str, pruner: dict, *, seed: int, epochs_budget: int) -> dict:
    """One study, trials until ``epochs_budget`` epochs are spent; its trials' outcomes."""
    import torch

    torch.set_num_threads(1)  # as the worker does for tiny data
    url = f"sqlite:///{folder / (name + '.db')}"
    storage = open_storage(url, heartbeat=False)
    create(embed_csv(load_spec_file(spec_file(folder, name, pruner, seed=seed))), storage, force=True)
    study, spec = open_study(name, storage)
    objective = make_objective(spec, load_dataset(spec, storage=storage))
    spent = 0

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal spent
        spent += int(trial.user_attrs.get("epochs_run", 0))
        if spent >= epochs_budget:
            study.stop()

    start = time.perf_counter()
    study.optimize(objective, callbacks=[stop_at_budget])
    trials = study.get_trials(deepcopy=False)
    return {"pruner": pruner["kind"], "seconds": time.perf_counter() - start, "epochs": spent,
            "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "points": [list(t.values) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-budget", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--constraint-trials", type=int, default=60)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-objectives-") as tmp:
        results = [run(Path(tmp), f"mo_{kind}", pruner, seed=args.seed, epochs_budget=args.epochs_budget)
                   for kind, pruner in PRUNERS.items()]
        shares = {kind: constrained_share(Path(tmp), kind, seed=args.seed, n_trials=args.constraint_trials)
                  for kind in ("tpe", "random")} if args.constraint_trials else {}
    directions = ["minimize", "minimize"]
    every = [minimizing(p, directions) for r in results for p in r["points"]]
    ref = []
    for k in range(2):
        low, high = min(p[k] for p in every), max(p[k] for p in every)
        ref.append(high + max(0.1 * (high - low), 1e-9))
    print(f"two objectives (val_mse, n_params), {args.epochs_budget} epochs each, seed {args.seed}; "
          f"reference point val_mse={ref[0]:.4g}, n_params={ref[1]:.6g}")
    print(f"{'pruner':8s} {'trials':>7s} {'complete':>9s} {'pruned':>7s} {'epochs':>7s} {'pareto':>7s} "
          f"{'hypervolume':>12s} {'seconds':>8s}")
    for r in results:
        points = [minimizing(p, directions) for p in r["points"]]
        front = [points[i] for i in non_dominated(points)]
        r["pareto_size"] = len(front)
        r["hypervolume"] = optuna_private.hypervolume(front, ref) if front else 0.0
        print(f"{r['pruner']:8s} {r['complete'] + r['pruned']:7d} {r['complete']:9d} {r['pruned']:7d} "
              f"{r['epochs']:7d} {r['pareto_size']:7d} {r['hypervolume']:12.6g} {r['seconds']:8.1f}")
    for kind, (first, second) in shares.items():
        print(f"constraint n_params <= 1000, {args.constraint_trials} trials, {kind:6s}: infeasible share "
              f"{first:.0%} in the first half, {second:.0%} in the second")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference_point": ref, "runs": results, "infeasible_shares": shares},
                                              indent=2))


if __name__ == "__main__":
    main()
