"""Store overhead per trial, and the sampler's time per trial at 1,000 finished trials.

Overhead: a study is seeded with 1,000 finished trials (20 intermediate values each, and their
budget places), then N worker processes run the worker's real per-trial path (stale-trial check,
budget claim, ask, heartbeat, 20 intermediate reports, tell) with a trivial objective, against
SQLite and PostgreSQL; the rounds of 1, 4, 8 workers run one after another on the same study, so
every round starts at 1,000 trials or more. Each worker first runs one untimed trial (its first
read of the study's trials, printed as start-up). Printed: the workers' loop time divided by
the trials (the cost per trial the study pays) and each worker's own time per trial.

Sampler: a study with 1,000 finished trials of the regression space (each with 20 intermediate
values); the time TPE takes to sample one new configuration, and the median pruner's check.

    python benchmarks/bench_store.py                       # SQLite + postgresql://postgres@127.0.0.1/test
    python benchmarks/bench_store.py --pg URL --workers 1,4,8 --trials 50 --finished 1000 --prune
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from hpo.running.worker import Worker  # noqa: E402
from hpo.search.space import suggest  # noqa: E402
from hpo.search.study import CachingMedianPruner, build_pruner, build_sampler  # noqa: E402
from hpo.spec.schema import load_spec_file  # noqa: E402
from hpo.store.budget import BUDGET_PREFIX  # noqa: E402
from hpo.store.optuna_private import STUDY_SYSTEM_ATTRS  # noqa: E402
from hpo.store.storage import open_storage  # noqa: E402

REPORTS = 20
BUDGET = 1_000_000
REGRESSION = Path(__file__).resolve().parent.parent / "studies" / "regression.yaml"


def _objective(trial: optuna.Trial, prune: bool = False) -> float:
    """Suggest one value and report it 20 times; with ``prune``, as a real worker's objective, a
    median-pruning check after every report (its decision is not acted on)."""
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(REPORTS):
        trial.report(x, step)
        if prune:
            trial.should_prune()
    return x


def _work(url: str, name: str, per_worker: int, prune: bool, ready, go, queue) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(),
                              pruner=CachingMedianPruner())
    objective = functools.partial(_objective, prune=prune)
    worker = Worker(study, storage, storage.get_study_id_from_name(name), budget=BUDGET, label=f"bench-{name}")
    start = time.perf_counter()
    worker.fail_stale()
    worker.run(worker.next_trial(), objective)  # the first read of the study's trials fills the cache
    startup = time.perf_counter() - start
    ready.release()
    go.wait()
    start = time.perf_counter()
    for _ in range(per_worker):
        worker.fail_stale()
        worker.run(worker.next_trial(), objective)
    loop = time.perf_counter() - start
    storage.engine.dispose()
    queue.put((loop, startup))


def seed(url: str, finished: int) -> str:
    """A study with ``finished`` complete trials (20 intermediate values each) and their budget places."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url, heartbeat=False)
    study = optuna.create_study(study_name=name, storage=storage)
    study.add_trials([optuna.trial.create_trial(
        params={"x": i / finished}, distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        value=i / finished, intermediate_values={s: i / finished for s in range(REPORTS)}) for i in range(finished)])
    study_id = storage.get_study_id_from_name(name)
    with storage.engine.begin() as conn:
        conn.execute(sa.insert(STUDY_SYSTEM_ATTRS), [{"study_id": study_id, "key": f"{BUDGET_PREFIX}{k}", "value_json": '"seed"'}
                                         for k in range(finished)])
    storage.engine.dispose()
    return name


def vacuum(url: str) -> None:
    """VACUUM ANALYZE a PostgreSQL store, so every round starts from the same table state even on
    a server whose autovacuum is off (the CI machines' is): dead rows of earlier rounds slow scans."""
    if not url.startswith("postgresql"):
        return
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    engine.dispose()


def overhead(url: str, name: str, workers: int, per_worker: int, prune: bool = False) -> dict:
    vacuum(url)
    ctx = mp.get_context("spawn")
    queue, ready, go = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_work, args=(url, name, per_worker, prune, ready, go, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()  # every worker has imported, connected and read the study once
    start = time.perf_counter()
    go.set()
    results = [queue.get() for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    loops = [loop for loop, _ in results]
    return {"workers": workers, "prune_checks": prune, "ms_per_trial_study": round(1000 * wall / (workers * per_worker), 1),
            "ms_per_trial_worker": round(1000 * statistics.mean(loops) / per_worker, 1),
            "startup_s": round(statistics.mean(s for _, s in results), 2)}


def sampler_time(url: str, finished: int = 1000, samples: int = 20) -> dict:
    spec = load_spec_file(REGRESSION)
    # url None: in memory, the sampler's own arithmetic without any store
    storage = optuna.storages.InMemoryStorage() if url is None else open_storage(url, heartbeat=False)
    name = f"bench-sampler-{uuid.uuid4().hex[:8]}"
    seed_study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    donor = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = []
    for i in range(finished):
        t = donor.ask()
        suggest(t, spec)
        value = 0.2 + (i % 97) / 100
        trials.append(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=value,
                                                intermediate_values={s * 10: value * (1 + 1 / (s + 1)) for s in range(REPORTS)}))
        donor.tell(t, value)
    seed_study.add_trials(trials)
    study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec))
    ask, prune = [], []
    for _ in range(samples):
        start = time.perf_counter()
        trial = study.ask()
        suggest(trial, spec)
        ask.append(time.perf_counter() - start)
        trial.report(0.5, 100)
        start = time.perf_counter()
        trial.should_prune()
        prune.append(time.perf_counter() - start)
        study.tell(trial, 0.5)
    optuna.delete_study(study_name=name, storage=storage)
    return {"finished": finished, "tpe_ms_per_trial": round(1000 * statistics.median(ask), 1),
            "median_pruner_check_ms": round(1000 * statistics.median(prune), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--workers", default="1,4,8")
    parser.add_argument("--trials", type=int, default=40, help="trials per worker")
    parser.add_argument("--finished", type=int, default=1000, help="finished trials in the study before the first round")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--prune", action="store_true",
                        help="also run every round with a median-pruning check after each report")
    parser.add_argument("--no-sampler", action="store_true", help="skip the 1,000-trial sampler timing")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="hpo-bench-store-")
    backends = {"sqlite": f"sqlite:///{tmp}/bench.db", "postgresql": args.pg}
    backends = {k: v for k, v in backends.items() if k in args.backends.split(",")}
    try:
        sa.create_engine(args.pg).connect().close()
    except Exception as e:  # noqa: BLE001 - a benchmark just skips what it cannot reach
        print(f"PostgreSQL unreachable ({type(e).__name__}); SQLite only")
        backends.pop("postgresql", None)
    results = []
    for backend, url in backends.items():
        start = time.perf_counter()
        name = seed(url, args.finished)
        print(f"{backend}: seeded {args.finished} trials in {time.perf_counter() - start:.1f}s", flush=True)
        for prune in (False, True) if args.prune else (False,):
            for n in map(int, args.workers.split(",")):
                row = {"backend": backend, "finished_before": args.finished, **overhead(url, name, n, args.trials, prune)}
                results.append(row)
                print(json.dumps(row), flush=True)
        optuna.delete_study(study_name=name, storage=open_storage(url, heartbeat=False))
        if not args.no_sampler:
            row = {"backend": backend, **sampler_time(url)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_sampler:
        row = {"backend": "in-memory", **sampler_time(None)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nbackend      workers  prune checks  study ms/trial  worker ms/trial  start-up s"
          f"   (study at >= {args.finished} trials)")
    for r in results:
        if "workers" in r:
            print(f"{r['backend']:12s} {r['workers']:7d} {'20' if r['prune_checks'] else '-':>13s} "
                  f"{r['ms_per_trial_study']:15.1f} {r['ms_per_trial_worker']:16.1f} {r['startup_s']:11.2f}")
    for r in results:
        if "tpe_ms_per_trial" in r:
            print(f"{r['backend']}: TPE {r['tpe_ms_per_trial']} ms per trial at {r['finished']} finished trials, "
                  f"median-pruner check {r['median_pruner_check_ms']} ms")


if __name__ == "__main__":
    main()
