import optuna
import pytest
from conftest import small_regression_spec
from optuna.trial import TrialState

from hpo.data.tables import embed_csv
from hpo.errors import StoreError
from hpo.running.worker import run_worker
from hpo.search.study import SPEC_ATTR, CachingMedianPruner, create, open_study
from hpo.spec.schema import load_spec_file
from hpo.store import optuna_private
from hpo.store.statistics import summarize
from hpo.store.storage import open_storage


def created(tmp_path, store_url, **overrides):
    spec = embed_csv(load_spec_file(small_regression_spec(tmp_path, **overrides)))
    create(spec, open_storage(store_url, heartbeat=False))
    return spec


def test_spec_and_data_travel_inside_the_store(tmp_path, store_url):
    spec = created(tmp_path, store_url)
    study, loaded = open_study("regression", open_storage(store_url))
    assert loaded == spec
    assert loaded.data.files["train"]["rows"] == 100 and loaded.data.inline is None
    assert study.user_attrs[SPEC_ATTR]["name"] == "regression"


def test_create_refuses_to_overwrite_unless_forced(tmp_path, store_url):
    spec = created(tmp_path, store_url)
    storage = open_storage(store_url, heartbeat=False)
    with pytest.raises(StoreError, match="already exists; pass --force"):
        create(spec, storage)
    study = optuna.load_study(study_name="regression", storage=storage)
    study.enqueue_trial({"lr": 0.001})
    create(spec, storage, force=True)
    assert optuna.load_study(study_name="regression", storage=storage).get_trials() == []


def test_worker_runs_real_trials_with_pruning(tmp_path, store_url):
    created(tmp_path, store_url, budget={"n_trials": 14})
    lines = []
    summary = run_worker("regression", storage_url=store_url, echo=lines.append)
    assert summary.finished == 14
    assert summary.counts["PRUNED"] >= 1 and summary.counts["COMPLETE"] >= 1
    assert summary.counts["FAIL"] == 0
    assert sum(line.startswith("trial ") for line in lines) == 14
    study = optuna.load_study(study_name="regression", storage=open_storage(store_url))
    pruned = study.get_trials(states=(TrialState.PRUNED,))[0]
    assert pruned.user_attrs["epochs_run"] == pruned.last_step
    assert {t.user_attrs["device"] for t in study.get_trials()} == {"cpu"}
    # The budget is the study's: a second worker finds nothing to do.
    assert run_worker("regression", storage_url=store_url, echo=lines.append).finished == 14


def test_same_seed_one_worker_same_parameter_sequence(tmp_path):
    def params(folder):
        folder.mkdir()
        url = f"sqlite:///{folder / 'hpo.db'}"
        created(folder, url, budget={"n_trials": 8})
        run_worker("regression", storage_url=url, echo=lambda _: None)
        study = optuna.load_study(study_name="regression", storage=open_storage(url))
        return [t.params for t in study.get_trials()]

    first, second = params(tmp_path / "a"), params(tmp_path / "b")
    assert first == second and len(first) == 8
    assert len({tuple(sorted(p.items())) for p in first}) == 8


def test_summary_counts(tmp_path, store_url):
    created(tmp_path, store_url)
    study, _ = open_study("regression", open_storage(store_url))
    for value in (0.5, 0.2):
        trial = study.ask()
        study.tell(trial, value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    s = summarize(study)
    assert (s.finished, s.counts["COMPLETE"], s.counts["PRUNED"], s.best_value, s.best_trial) == (3, 2, 1, 0.2, 1)
    # A FAIL whose retry was re-queued does not count as finished; the retry does once it ends.
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    retry = study.ask()
    optuna_private.study_storage(study).set_trial_system_attr(optuna_private.trial_id(retry), "retry_history", [failed.number])
    assert summarize(study).finished == 3
    study.tell(retry, 0.3)
    assert summarize(study).finished == 4


def _finished_trial(value: float, curve: list[float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={}, distributions={}, value=value, intermediate_values=dict(enumerate(curve)))


def test_median_pruner_decides_as_optunas_and_reads_the_study_at_most_once_a_second(store_url):
    storage = open_storage(store_url, heartbeat=False)
    study = optuna.create_study(study_name="prune", storage=storage)
    study.add_trials([_finished_trial(v, [v + 1, v + 0.5, v]) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    reads = []
    real_get_trials = study.get_trials
    study.get_trials = lambda *a, **k: reads.append(1) or real_get_trials(*a, **k)
    ours = CachingMedianPruner(n_startup_trials=5, max_age=1.0)
    theirs = optuna.pruners.MedianPruner(n_startup_trials=5)
    for curve in ([1.0, 0.6, 0.2], [1.5, 1.4, 1.3], [1.2, 0.5]):
        probe = _finished_trial(curve[-1], curve)
        for step in range(len(curve)):
            probe.intermediate_values = dict(enumerate(curve[:step + 1]))
            assert ours.prune(study, probe) == theirs.prune(study, probe), (curve, step)
    n_theirs = 8  # Optuna's pruner read the study at each of its 8 checks
    assert len(reads) == 1 + n_theirs
    # A trial completed since is seen once the second has passed.
    study.add_trials([_finished_trial(v, [0.0, 0.0, 0.0]) for v in range(6)])
    late = _finished_trial(0.05, [0.05, 0.05, 0.05])
    assert not ours.prune(study, late)
    ours._recent[study._study_id]._read_at -= 1.1
    assert ours.prune(study, late) and len(reads) == 1 + n_theirs + 1
    # The first check of another trial reads afresh.
    next_trial = _finished_trial(0.05, [0.05, 0.05, 0.05])
    next_trial.number = late.number + 1
    ours.prune(study, next_trial)
    assert len(reads) == 1 + n_theirs + 2


def test_specs_stored_by_earlier_versions_still_load(tmp_path, store_url):
    """Earlier versions stored every sampler and pruner setting whatever the kind; they still load."""
    spec = created(tmp_path, store_url, sampler={"kind": "random"})
    storage = open_storage(store_url, heartbeat=False)
    old = spec.to_dict()
    old["sampler"] = {"kind": "random", "n_startup_trials": 10, "multivariate": False}
    old["pruner"] = {"kind": "median", "n_startup_trials": 3, "n_warmup_steps": 5, "interval_steps": 1,
                     "min_resource": 1, "reduction_factor": 3}
    optuna.load_study(study_name="regression", storage=storage).set_user_attr(SPEC_ATTR, old)
    _, loaded = open_study("regression", storage)
    assert loaded == spec
