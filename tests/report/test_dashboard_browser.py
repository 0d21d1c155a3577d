"""hpo dashboard: the real CLI serving a real retrained study, read through its JSON API and
rendered in headless Chromium (DOM and a screenshot kept in test-artifacts/)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import HPO, REPO, run_hpo, small_regression_spec
from test_export import TINY_SPACE, make_study, retrain, store_env

pytestmark = pytest.mark.slow  # one study, a retrain and a server: about 40 s

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--window-size=1280,1400"]
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=90)


def visible_text(html: str) -> str:
    html = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``hpo dashboard`` on a store holding a 3-trial study with a 2-fold retrain; yields (base URL, folder)."""
    folder = tmp_path_factory.mktemp("dashboard")
    make_study(folder, small_regression_spec(folder, space=TINY_SPACE, budget={"n_trials": 3}), "regression")
    retrain(folder, "regression", folds=2)
    port = free_port()
    proc = subprocess.Popen([*HPO, "dashboard", "--study", "regression", "--port", str(port)], env=store_env(folder),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(base + "/api/studies")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not answer: {proc.communicate(timeout=5)}") from None
                time.sleep(0.3)
        yield base, folder, port
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        assert f"{base}/dashboard/studies/" in out, out + err


def test_api_lists_study_trials_and_retrain_files_in_the_trial_view(served):
    from hpo.retrain.results import load_retrain
    from hpo.search.study import open_study
    from hpo.store.artifacts import open_artifact_store
    from hpo.store.storage import open_storage

    base, folder, _ = served
    studies = get_json(base + "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["regression"]
    detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
    assert [t["number"] for t in detail["trials"]] == [0, 1, 2]
    assert {t["state"] for t in detail["trials"]} == {"Complete"}

    url = store_env(folder)["HPO_STORAGE"]
    study, _ = open_study("regression", open_storage(url, heartbeat=False))
    record = load_retrain(study)
    trial = next(t for t in detail["trials"] if t["number"] == record.trial_number)
    shown = {a["artifact_id"]: a["filename"] for a in trial["artifacts"]}
    assert shown == {v: k for k, v in record.files.items()}  # every retrain file, in the retrained trial's view
    store = open_artifact_store(url)
    with urllib.request.urlopen(f"{base}/artifacts/{studies[0]['study_id']}/{trial['trial_id']}/{record.files['fold_0.pt']}") as r:
        assert r.read() == store.open_reader(record.files["fold_0.pt"]).read()


def test_objective_is_named_and_the_retrain_is_a_readable_note(served):
    """The dashboard names the objective by the spec's metric (not "Objective 0") and shows the
    retrain's fold scores and ensemble as the study's note, in Markdown."""
    import optuna

    from hpo.report.dashboard import NOTE_HEADING, save_retrain_note
    from hpo.retrain.results import fetch_files, load_retrain
    from hpo.store.artifacts import open_artifact_store

    base, folder, _ = served
    study_id = get_json(base + "/api/studies")["study_summaries"][0]["study_id"]
    detail = get_json(f"{base}/api/studies/{study_id}")
    assert detail["objective_names"] == ["val_mse"]
    note = detail["note"]["body"]
    url = store_env(folder)["HPO_STORAGE"]
    study = optuna.load_study(study_name="regression", storage=url)
    record = load_retrain(study)
    metrics = json.loads((fetch_files(open_artifact_store(url), record, folder / "note-files",
                                      names=["metrics.json"]) / "metrics.json").read_text())
    assert note.startswith(NOTE_HEADING + "\n\n" + f"### Retrain {record.id} of trial #{record.trial_number}")
    assert metrics["metric"] == "mse"
    for fold in metrics["per_fold"]:
        best = " **(best)**" if fold["fold"] == metrics["best_fold"] else ""
        assert f"- fold {fold['fold']}{best}: test mse {fold['test_metric']:.4g} (" in note, note
    assert f"- **mean** of the folds: test mse {metrics['ensemble']['mean']['test_metric']:.4g}\n" in note, note

    # What a user wrote in the dashboard stays above hpo's part; a later retrain comes first under it.
    from optuna_dashboard import get_note, save_note

    save_note(study, "my own words\n\n" + note)
    save_retrain_note(study, metrics, replace(record, id="later"))
    body = get_note(study)
    assert body.startswith("my own words\n\n" + NOTE_HEADING + "\n\n### Retrain later of trial")
    assert body.count(NOTE_HEADING) == 1 and f"### Retrain {record.id} of" in body
    assert body.index("### Retrain later") < body.index(f"### Retrain {record.id} of")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chromium_renders_the_study_and_its_trials(served, tmp_path):
    base, _, _ = served
    study_id = get_json(base + "/api/studies")["study_summaries"][0]["study_id"]

    listing = chromium(f"{base}/dashboard", tmp_path / "profile-1", "--dump-dom")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "regression" in visible_text(listing.stdout)

    best = get_json(f"{base}/api/studies/{study_id}")["best_trials"][0]["number"]
    page = f"{base}/dashboard/studies/{study_id}/trials?numbers={best}"
    trials = chromium(page, tmp_path / "profile-2", "--dump-dom")
    text = visible_text(trials.stdout)
    assert "3 Trials" in text and all(f"Trial {n}" in text for n in range(3)), text[:2000]
    assert f"Trial {best} (trial_id=" in text and "Best Trial" in text, text[:2000]
    files = text[text.index("Artifacts"):]
    assert all(name in files for name in ("fold_0.pt", "fold_1.pt", "model.json", "predictions.npz")), files[:2000]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-trials.png"
    shot.unlink(missing_ok=True)
    done = chromium(page, tmp_path / "profile-3", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]


def test_bad_input_exits_2(served):
    from hpo.errors import StoreError
    from hpo.report.dashboard import serve

    _, folder, port = served
    env = store_env(folder)
    # Binding every address while 127.0.0.1 has the port fails too; the warning comes first.
    exposed = run_hpo("dashboard", "--host", "0.0.0.0", "--port", str(port), env=env, check=2)
    assert "reachable from other machines" in exposed.stderr
    assert f"0.0.0.0:{port} is already in use" in exposed.stderr and "Traceback" not in exposed.stderr
    with pytest.raises(StoreError, match="no study named 'nope'"):
        serve(storage_url=env["HPO_STORAGE"], port=free_port(), study_name="nope")
