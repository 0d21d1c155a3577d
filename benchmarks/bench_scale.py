"""Cost as a study grows: ``hpo studies``, ``hpo status``, ``hpo report`` and a worker's first trial and
per-trial overhead at 10, 1,000, 5,000 and 10,000 trials, each next to the same operation on
Optuna's in-memory storage holding the same trials, in one run.

For each backend (SQLite file, the real PostgreSQL) and size, a fresh store gets one study of the
regression spec filled by ``bulk.py`` (multi-row inserts into Optuna's tables; ~50 intermediate
values per trial, 10 % COMPLETE, 3 % FAIL with one re-queued, 4 RUNNING, the rest PRUNED); an
in-memory Optuna study gets the same trials. Then:

- studies / status: ``hpo.store.statistics.summaries`` / ``summary`` on the store (median of 5 after
  one warm-up call) against the same statistics computed from the in-memory study through
  Optuna's API (trials by state, ``best_trial``, the re-queued FAILs); and the commands
  themselves as subprocesses (``hpo studies`` / ``hpo status``, median of 3, Python start-up
  included).
- report: ``hpo.report.html.write_report`` on the store against the same page (statistics and Optuna's
  figures; no retrain in either) built from the in-memory study's trials; seconds and MB.
- worker: ``hpo.running.worker.Worker`` on the store with the spec's sampler (TPE) and pruner (median),
  a trivial objective (the spec's space suggested, 10 reports each followed by a pruning check):
  the first trial (the first ``ask`` reads the study) and the mean of the next ``--worker-trials``;
  against ask / objective / tell on the in-memory study with the same sampler and pruner.

    python benchmarks/bench_scale.py                         # SQLite + postgresql://postgres@127.0.0.1/test
    python benchmarks/bench_scale.py --sizes 10,1000 --backends sqlite --worker-trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HPO_GRACE_PERIOD", "3600")  # the bulk study's RUNNING trials have no worker behind them

import optuna  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from bulk import insert_trials, make_trials  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from hpo.data.tables import embed_csv  # noqa: E402
from hpo.report import html as report
from hpo.running.worker import Worker  # noqa: E402
from hpo.search.space import suggest  # noqa: E402
from hpo.search.study import SPEC_ATTR, build_pruner, build_sampler, create, open_study  # noqa: E402
from hpo.spec.schema import load_spec_file  # noqa: E402
from hpo.store.budget import retried_numbers  # noqa: E402
from hpo.store.statistics import Summary, summaries, summary  # noqa: E402
from hpo.store.storage import open_storage  # noqa: E402

REPORTS = 10
SPEC = embed_csv(load_spec_file(REPO / "studies" / "regression.yaml"))


def median_time(fn, repeat: int = 5) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_summary(study: optuna.Study) -> Summary:
    """hpo's statistics from an in-memory study, through Optuna's API (every trial read)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    retried = retried_numbers(trials)
    best = study.best_trial if counts["COMPLETE"] else None
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    failed = sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    return Summary(name=study.study_name, direction=study.direction.name.lower(),
                   metric=study.user_attrs.get(SPEC_ATTR, {}).get("metric", "value"), counts=counts,
                   finished=counts["COMPLETE"] + counts["PRUNED"] + failed, failed=failed,
                   interrupted=counts["FAIL"] - failed,
                   best_value=best.value if best else None, best_trial=best.number if best else None,
                   best_params=best.params if best else {},
                   wall_seconds=(max(ends) - min(starts)).total_seconds() if starts and ends else None,
                   gpu_sharing=dict(sorted(Counter(str(t.user_attrs["gpu_sharing"]) for t in trials
                                               if "gpu_sharing" in t.user_attrs).items())))


def objective(trial: optuna.Trial) -> float:
    suggest(trial, SPEC)
    value = 0.5
    for step in range(1, REPORTS + 1):
        value = 0.2 + 1.0 / step
        trial.report(value, step)
        trial.should_prune()  # its answer is not acted on: every trial costs the same
    return value


def cli_time(*args: str) -> float:
    """Median wall seconds of ``hpo ARGS`` as a subprocess (3 runs)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpo.cli", *args], cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_times(url: str, name: str, n: int) -> tuple[float, float]:
    """(first trial s, mean s of the next ``n``) of hpo's worker on the store."""
    storage = open_storage(url)
    study, _ = open_study(name, storage)
    worker = Worker(study, storage, storage.get_study_id_from_name(name), budget=None, label="bench")
    start = time.perf_counter()
    worker.fail_stale()
    worker.run(worker.next_trial(), objective)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        worker.fail_stale()
        worker.run(worker.next_trial(), objective)
    per_trial = (time.perf_counter() - start) / n
    storage.remove_session()
    storage.engine.dispose()
    return first, per_trial


def memory_worker_times(trials: list, n: int) -> tuple[float, float]:
    study = optuna.create_study(direction=SPEC.direction, sampler=build_sampler(SPEC), pruner=build_pruner(SPEC))
    study.add_trials(trials)
    times = []
    for _ in range(n + 1):
        start = time.perf_counter()
        trial = study.ask()
        study.tell(trial, objective(trial))
        times.append(time.perf_counter() - start)
    return times[0], statistics.mean(times[1:])


def fresh_store(backend: str, tmp: Path, pg: str, size: int) -> tuple[str, callable]:
    """A new empty store's URL and a function that removes it."""
    if backend == "sqlite":
        path = tmp / f"scale-{size}.db"
        return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)
    name = f"hpo_scale_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
    return pg.rsplit("/", 1)[0] + "/" + name, drop


def vacuum(url: str) -> None:
    """VACUUM ANALYZE a fresh PostgreSQL store: this server runs without autovacuum, and the planner
    needs the bulk-loaded tables' statistics as a live study's would have them."""
    if url.startswith("postgresql"):
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
        engine.dispose()


def measure(backend: str, url: str, size: int, worker_trials: int, out_dir: Path) -> dict:
    row: dict = {"backend": backend, "trials": size}
    trials = make_trials(SPEC, size)
    storage = open_storage(url, heartbeat=False)
    create(SPEC, storage)
    study_id = storage.get_study_id_from_name(SPEC.name)
    start = time.perf_counter()
    insert_trials(storage, study_id, trials)
    row["build_s"] = round(time.perf_counter() - start, 1)
    vacuum(url)
    memory = optuna.create_study(study_name=SPEC.name, direction=SPEC.direction)
    memory.set_user_attr(SPEC_ATTR, SPEC.to_dict())
    memory.add_trials(trials)
    assert summary(storage, study_id) == memory_summary(memory), "the store and memory disagree"

    row["studies_ms"] = 1000 * median_time(lambda: summaries(storage))
    row["studies_memory_ms"] = 1000 * median_time(lambda: [memory_summary(memory)])
    row["status_ms"] = 1000 * median_time(lambda: summary(storage, study_id))
    row["status_memory_ms"] = 1000 * median_time(lambda: memory_summary(memory))
    row["cli_studies_s"] = cli_time("studies", "--storage", url)
    row["cli_status_s"] = cli_time("status", "--study", SPEC.name, "--storage", url)

    start = time.perf_counter()
    path = report.write_report(SPEC.name, storage_url=url, out=out_dir / f"{backend}-{size}.html")
    row["report_s"] = time.perf_counter() - start
    row["report_mb"] = path.stat().st_size / 1e6
    start = time.perf_counter()
    page = report.study_page(memory_summary(memory), SPEC, memory.direction, memory.get_trials(deepcopy=False))
    html = report.render(page, title="memory", subtitle="")
    row["report_memory_s"] = time.perf_counter() - start
    row["report_memory_mb"] = len(html.encode()) / 1e6
    storage.engine.dispose()

    row["worker_first_s"], row["worker_trial_s"] = worker_times(url, SPEC.name, worker_trials)
    row["worker_first_memory_s"], row["worker_trial_memory_s"] = memory_worker_times(trials, worker_trials)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def table(rows: list[dict]) -> str:
    base = {(r["backend"]): r for r in rows if r["trials"] == min(x["trials"] for x in rows)}
    lines = ["| backend | trials | studies ms (mem; x vs smallest) | status ms (mem; x vs smallest) | "
             "CLI studies / status s | report s, MB (mem s) | worker first trial s (mem; ratio) | "
             "worker per trial ms (mem; ratio) |", "|" + "---|" * 8]
    for r in rows:
        b = base[r["backend"]]
        lines.append(
            f"| {r['backend']} | {r['trials']:,} "
            f"| {r['studies_ms']:.1f} ({r['studies_memory_ms']:.1f}; {r['studies_ms'] / b['studies_ms']:.2f}x) "
            f"| {r['status_ms']:.1f} ({r['status_memory_ms']:.1f}; {r['status_ms'] / b['status_ms']:.2f}x) "
            f"| {r['cli_studies_s']:.2f} / {r['cli_status_s']:.2f} "
            f"| {r['report_s']:.1f}, {r['report_mb']:.1f} ({r['report_memory_s']:.1f}) "
            f"| {r['worker_first_s']:.2f} ({r['worker_first_memory_s']:.2f}; "
            f"{r['worker_first_s'] / r['worker_first_memory_s']:.1f}x) "
            f"| {1000 * r['worker_trial_s']:.0f} ({1000 * r['worker_trial_memory_s']:.0f}; "
            f"{r['worker_trial_s'] / r['worker_trial_memory_s']:.1f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
                        help="a PostgreSQL URL whose server lets this user create databases")
    parser.add_argument("--sizes", default="10,1000,5000,10000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--worker-trials", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backends = args.backends.split(",")
    if "postgresql" in backends:
        try:
            sa.create_engine(args.pg).connect().close()
        except Exception as e:  # noqa: BLE001 - a benchmark just skips what it cannot reach
            print(f"PostgreSQL unreachable ({type(e).__name__}); SQLite only")
            backends.remove("postgresql")
    tmp = Path(tempfile.mkdtemp(prefix="hpo-bench-scale-"))
    rows = []
    for backend in backends:
        for size in map(int, args.sizes.split(",")):
            url, remove = fresh_store(backend, tmp, args.pg, size)
            try:
                rows.append(measure(backend, url, size, args.worker_trials, tmp))
            finally:
                remove()
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
