"""Progress: a live line on a terminal, a plain line every few seconds elsewhere; wired through the
worker's trials and the retrain's folds x epochs."""

from __future__ import annotations

import re
import time

import pytest
import torch
from conftest import small_regression_spec

from hpo.data.tables import embed_csv
from hpo.retrain.run import run_retrain
from hpo.running.progress import Progress
from hpo.running.worker import run_worker
from hpo.search.study import create
from hpo.spec.schema import load_spec_file
from hpo.store.storage import open_storage

LINE = re.compile(r"^  trial 3: (\d+)/40 epochs \[\d\d:\d\d<\d\d:\d\d, val_mse=0\.\d+\]$")


class Recorder:
    """A stream that remembers when each write came."""

    def __init__(self, tty: bool = False):
        self.tty, self.writes = tty, []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def run_epochs(progress: Progress, *, epochs: int, seconds: float) -> float:
    start = time.monotonic()
    with progress.bar(total=epochs, desc="trial 3") as bar:
        for epoch in range(epochs):
            time.sleep(seconds / epochs)
            bar.set_postfix_str(f"val_mse={0.5 / (epoch + 1):.4g}", refresh=False)
            bar.update()
    return start


def test_lines_every_interval_when_not_a_terminal():
    stream = Recorder()
    start = run_epochs(Progress(stream, line_every=0.3), epochs=40, seconds=2.0)
    times = [t for t, _ in stream.writes]
    lines = [text for _, text in stream.writes]
    assert all(text.endswith("\n") and text.count("\n") == 1 and "\r" not in text for text in lines), lines
    assert 3 <= len(lines) <= 2.0 / 0.3 + 1, lines
    assert times[0] - start >= 0.3  # nothing before the first interval
    assert all(b - a >= 0.3 - 1e-3 for a, b in zip(times, times[1:])), times
    done = [int(LINE.match(text.rstrip("\n")).group(1)) for text in lines]
    assert done == sorted(done) and done[-1] < 40


def test_short_work_prints_nothing_off_a_terminal():
    stream = Recorder()
    run_epochs(Progress(stream, line_every=5.0), epochs=10, seconds=0.05)
    assert stream.writes == []


def test_a_live_line_on_a_terminal_erased_at_the_end():
    stream = Recorder(tty=True)
    run_epochs(Progress(stream), epochs=5, seconds=0.75)
    assert stream.text.startswith("\r") and "\n" not in stream.text
    assert "trial 3: 100%" in stream.text and "val_mse=" in stream.text
    assert stream.writes[-1][1].strip() == ""  # the last write clears the line


def test_worker_and_retrain_show_progress(tmp_path, store_url, one_torch_thread):
    spec = embed_csv(load_spec_file(small_regression_spec(tmp_path, budget={"n_trials": 2},
                                                          pruner={"kind": "none"})))
    create(spec, open_storage(store_url, heartbeat=False))
    stream = Recorder()
    run_worker("regression", storage_url=store_url, n_trials=2, echo=lambda line: None,
               progress=Progress(stream, line_every=0.0))
    lines = stream.text.splitlines()
    for number in (0, 1):
        mine = [line for line in lines if line.startswith(f"  trial {number}: ")]
        assert mine and all(re.search(r"\d+/\d+ epochs \[.*, val_mse=\d", line) for line in mine[1:]), mine

    stream = Recorder()
    echoed = []
    run_retrain("regression", storage_url=store_url, artifacts=str(tmp_path / "artifacts"), folds=2,
                device=torch.device("cpu"), echo=echoed.append, progress=Progress(stream, line_every=0.0))
    lines = stream.text.splitlines()
    epochs = int(re.search(r"(\d+) epochs", echoed[0]).group(1))
    assert lines[0].startswith(f"  retrain (2 folds x {epochs} epochs): 0/{2 * epochs} epochs")
    assert re.search(rf"{2 * epochs}/{2 * epochs} epochs \[.*, fold 1 val_mse=\d", lines[-1]), lines[-1]
    assert len(lines) == 2 * epochs + 1


@pytest.mark.parametrize("tty", [False, True])
def test_other_output_while_a_bar_shows(tty):
    stream = Recorder(tty=tty)
    progress = Progress(stream, line_every=0.0)
    with progress.bar(total=2, desc="retrain") as bar:
        bar.update()
        with progress.printing():
            stream.write("  fold 0: 1 epochs\n")
        bar.update()
    text = stream.text
    assert "  fold 0: 1 epochs\n" in text
    if not tty:
        assert text.splitlines() == ["  retrain: 0/2 epochs [00:00<?]", "  retrain: 1/2 epochs [00:00<00:00]",
                                     "  fold 0: 1 epochs", "  retrain: 2/2 epochs [00:00<00:00]"]
