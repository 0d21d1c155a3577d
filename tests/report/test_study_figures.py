"""The report's study figures at scale: a 2,000-trial study made by bulk insert reads once, stays
small and says what each figure draws; the contour's pair is one that was sampled together."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.data.tables import embed_csv
from hpo.report.study_figures import MIN_PAIR_TRIALS, Snapshot, contour_pair, webgl
from hpo.search.study import create
from hpo.spec.schema import load_spec_file
from hpo.store.storage import open_storage

sys.path.insert(0, str(REPO / "benchmarks"))
from bulk import insert_trials, make_trials  # noqa: E402

MB = 1_000_000


def _trial(value: float, **params) -> optuna.trial.FrozenTrial:
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "width": IntDistribution(8, 64),
             "width_l0": IntDistribution(8, 64), "width_l1": IntDistribution(8, 64)}
    return create_trial(value=value, params=params, distributions={k: dists[k] for k in params})


def test_contour_pair_is_sampled_together():
    # A searched schedule: "width" (constant) and "width_l0"/"width_l1" (decreasing) never meet.
    complete = [_trial(i, lr=10 ** -(1 + i % 3), width=8 + i) if i % 2 else
                _trial(i, lr=10 ** -(1 + i % 3), width_l0=8 + i, width_l1=8 + i // 2) for i in range(30)]
    assert contour_pair(["width", "width_l0", "lr", "width_l1"], complete) == (("width", "lr"), MIN_PAIR_TRIALS)
    assert contour_pair(["width_l0", "width_l1", "width"], complete) == (("width_l0", "width_l1"), MIN_PAIR_TRIALS)
    # Too few shared trials, or one value only, is no pair.
    assert contour_pair(["width", "width_l0"], complete) == (None, MIN_PAIR_TRIALS)
    assert contour_pair(["width", "lr", "width_l0"], complete[:12]) == (None, 10)  # 6 each, 10 needed
    assert contour_pair(["width", "lr"], complete[1:12:2]) == (("width", "lr"), 6)  # all 6 complete ones
    same_lr = [_trial(i, lr=0.01, width=8 + i) for i in range(12)]
    assert contour_pair(["lr", "width"], same_lr)[0] is None


def test_webgl_past_the_threshold_keeps_the_data():
    fig = optuna.visualization.plot_optimization_history(_study_of(20))
    assert webgl(fig) is fig  # few points: left as SVG
    gl = webgl(fig, limit=10)
    assert [t.type for t in gl.data] == ["scattergl"] * len(fig.data)
    assert list(gl.data[0].y) == list(fig.data[0].y) and "WebGL: 40 points" in gl.layout.title.text


def test_snapshot_figures_keep_the_trial_numbers():
    study = _study_of(10)
    kept = [study.trials[5], study.trials[9]]
    for t in kept:
        t.intermediate_values = {1: t.value + 1, 2: t.value}
    snapshot = Snapshot(optuna.study.StudyDirection.MINIMIZE, kept)
    assert [t.name for t in optuna.visualization.plot_intermediate_values(snapshot).data] == ["Trial5", "Trial9"]
    assert snapshot.get_trials(states=(TrialState.PRUNED,)) == [] and snapshot.trials[0] is kept[0]


def _study_of(n: int) -> optuna.Study:
    study = optuna.create_study()
    study.add_trials([_trial(float(i), lr=10 ** -(1 + i % 3)) for i in range(n)])
    return study


def bulk_study(url: str, n_trials: int, tmp_path: Path, **kwargs) -> str:
    """A study of the regression spec with ``n_trials`` trials written by bulk insert; its name."""
    spec = embed_csv(load_spec_file(REPO / "studies" / "regression.yaml"))
    storage = open_storage(url, heartbeat=False)
    create(spec, storage)
    insert_trials(storage, storage.get_study_id_from_name(spec.name), make_trials(spec, n_trials, **kwargs))
    storage.engine.dispose()
    return spec.name


@pytest.mark.slow
def test_large_study_report_reads_once_and_says_what_it_draws(tmp_path, store_url, monkeypatch):
    from hpo.report import html as report
    from hpo.store import trials as trial_reads
    name = bulk_study(store_url, 2_000, tmp_path, complete=0.6)
    reads = []
    monkeypatch.setattr(report, "read_trials", lambda *a: reads.append(1) or trial_reads.read_trials(*a))
    # Optuna's own read of the trials is never used.
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_all_trials",
                        lambda *a, **k: pytest.fail("the report read the trials through Optuna"))
    start = time.perf_counter()
    path = report.write_report(name, storage_url=store_url, out=tmp_path / "large.html")
    seconds = time.perf_counter() - start
    text = path.read_text()
    assert reads == [1]
    assert path.stat().st_size < 15 * MB and seconds < 60, (path.stat().st_size, seconds)
    assert "not drawn" not in text and "nothing to draw" not in text
    assert re.search(r"Drawn: the best 500 of the 1\d\d\d complete trials\.", text)
    assert re.search(r"the best 200 of the \d+ complete trials that have both", text)
    assert "The 150 trials with the best last reported value are drawn." in text
    assert "Timeline Plot (WebGL: one line per trial, 2,000 trials)" in text
    assert re.search(r"Optimization History Plot \(WebGL: [\d,]+ points\)", text)
    # The contour's pair was sampled together in the trials it draws.
    pair = re.search(r"<p>(\w+) × (\w+), the most important pair sampled together", text).groups()
    monkeypatch.undo()
    study = optuna.load_study(study_name=name, storage=store_url)
    both = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if set(pair) <= set(t.params)]
    assert len(both) >= 200
