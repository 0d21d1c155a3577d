"""The epoch boundary shared by trials and retrains: checkpoint when due or told to stop, a failed
write warns once and training goes on, and a stop raises ``Interrupted`` with or without checkpoints."""

from __future__ import annotations

import errno

import pytest

from hpo.training.boundary import EpochBoundary, Interrupted


def test_writes_when_due_and_when_told_to_stop_then_stops():
    stop, written, warnings = [False], [], []
    boundary = EpochBoundary(should_stop=lambda: stop[0], every_seconds=3600, label="trial 1", warn=warnings.append)
    boundary.check("epoch 1", epochs=1, write=lambda: written.append(1))
    assert written == []  # not due for an hour, not told to stop
    stop[0] = True
    with pytest.raises(Interrupted) as e:
        boundary.check("epoch 2", epochs=2, write=lambda: written.append(2))
    assert written == [2] and warnings == []
    assert (e.value.where, e.value.epochs, e.value.saved) == ("epoch 2", 2, True)
    assert str(e.value) == "interrupted at epoch 2; checkpoint saved"


def test_every_seconds_zero_writes_at_every_boundary():
    written = []
    boundary = EpochBoundary(should_stop=None, every_seconds=0, label="retrain")
    for epoch in range(1, 4):
        boundary.check(f"epoch {epoch}", epochs=epoch, write=lambda epoch=epoch: written.append(epoch))
    assert written == [1, 2, 3]


def test_a_failed_write_warns_once_and_training_goes_on():
    warnings, stop = [], [False]

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    boundary = EpochBoundary(should_stop=lambda: stop[0], every_seconds=0, label="retrain", warn=warnings.append)
    boundary.check("fold 0, epoch 1", epochs=1, write=disk_full)
    boundary.check("fold 0, epoch 2", epochs=2, write=disk_full)
    assert boundary.save(disk_full) is False
    assert warnings == ["retrain: checkpoint not written (No space left on device); training goes on"]
    stop[0] = True
    with pytest.raises(Interrupted) as e:
        boundary.check("fold 0, epoch 3", epochs=3, write=disk_full)
    assert e.value.saved is False and str(e.value).endswith("its checkpoint could not be written")


def test_without_checkpoints_a_stop_still_stops():
    boundary = EpochBoundary(should_stop=lambda: True, every_seconds=0, label="retrain")
    with pytest.raises(Interrupted) as e:
        boundary.check("fold 1, epoch 1", epochs=1, write=None)
    assert e.value.saved is None and str(e.value) == "interrupted at fold 1, epoch 1"
