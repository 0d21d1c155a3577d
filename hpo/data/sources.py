"""Data sets as tensors: the whole set is loaded once (onto the device, for workers) and batches are
taken by index. Splits are seeded index arrays, recorded with the data.

A CSV study's files travel in the store (``hpo.store.data_tables``): a worker fetches them once per
machine into a checksummed local cache (``hpo.data.cache``) and needs no copy of its own. Studies
created before the store kept data carry their tables inside the spec (``DataSpec.inline``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpo.data.dataset import Dataset
from hpo.data.images import SOURCES, load_image_dataset
from hpo.data.splits import split_indices
from hpo.data.tables import read_csv_table
from hpo.spec.schema import DataSpec, StudySpec

if TYPE_CHECKING:
    import optuna


def csv_arrays(d: DataSpec, part: str, *, storage: optuna.storages.RDBStorage | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, n_features)`` and target ``(n,)`` (float32, raw units) of a CSV study's
    ``train`` or ``test`` table: from the local copy of the file the spec refers to (fetched from
    ``storage`` when there is none; without a store, the spec's path serves if its checksum
    matches), from tables embedded in the spec, or from the spec's path.

    Raises:
        DataError: the data cannot be found, fetched or read.
    """
    if d.inline:
        table = d.inline[part]
    else:
        path = getattr(d, part)
        if d.files:
            path = _fetched(d.files[part], storage, original=path)
        table = read_csv_table(str(path), (*d.features, d.target))
    rows = np.asarray(table["rows"], dtype=np.float32)
    return rows[:, :-1], rows[:, -1]


def _load_csv(spec: StudySpec, storage) -> Dataset:
    d = spec.data
    x, y = csv_arrays(d, "train", storage=storage)
    x_test, y_test = csv_arrays(d, "test", storage=storage)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    classification = d.task == "classification"
    labels = y.astype(np.int64) if classification else None
    train_idx, val_idx = split_indices(len(x), val_fraction=d.val_fraction, seed=spec.seed, labels=labels,
                                       train_subset=d.train_subset, val_subset=d.val_subset)
    if classification:
        n_classes = int(max(y.max(), y_test.max())) + 1
        y_t, y_test_t = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
        out, classes = n_classes, tuple(str(i) for i in range(n_classes))
    else:
        y_t, y_test_t = torch.from_numpy(y)[:, None], torch.from_numpy(y_test)[:, None]
        out, classes = 1, ()
    return Dataset(
        task=d.task,
        x=torch.from_numpy((x - mean) / std),
        y=y_t,
        train_idx=torch.from_numpy(train_idx),
        val_idx=torch.from_numpy(val_idx),
        x_test=torch.from_numpy((x_test - mean) / std),
        y_test=y_test_t,
        in_shape=(x.shape[1],),
        out_features=out,
        classes=classes,
        normalization={"mean": mean.tolist(), "std": std.tolist()},
    )


def data_title(spec: StudySpec) -> str:
    """What the study's data set is called, for the line a worker prints while loading it:
    ``Fashion-MNIST`` or ``regression_train.csv (100 rows)``."""
    d = spec.data
    if d.source != "csv":
        return SOURCES[d.source].title if d.source in SOURCES else d.source
    ref = (d.files or {}).get("train")
    if ref:
        return f"{ref['name']} ({ref['rows']:,} rows)"
    return Path(d.train).name if d.train else "the CSV data"


def _fetched(ref: dict, storage, *, original=None):
    """The local copy of the stored file ``ref`` (``hpo.data.cache.local_copy``); a dropped
    connection mid-fetch fetches again, within the store's retry window."""
    from hpo.data.cache import local_copy

    if storage is None:
        return local_copy(ref, None, original=original)
    from hpo.store.queries import retried

    return retried(storage, local_copy, ref, storage.engine, original=original)


def _load_arrays(spec: StudySpec, storage) -> Dataset:
    """A registry source's data set (``hpo.data.arrays``): images scaled to [0, 1] and normalised
    per channel, features per column, with the training pool's statistics."""
    from hpo.data.arrays import read_arrays

    d = spec.data
    a = read_arrays(_fetched(d.files["arrays"], storage))
    images = a.x.ndim == 4
    scale = 1 / 255 if images else 1.0
    x, x_test = a.x.astype(np.float32) * scale, a.x_test.astype(np.float32) * scale
    axes = (0, 2, 3) if images else 0
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    shape = (1, -1, 1, 1) if images else (1, -1)
    x, x_test = (x - mean.reshape(shape)) / std.reshape(shape), (x_test - mean.reshape(shape)) / std.reshape(shape)
    classification = d.task == "classification"
    train_idx, val_idx = split_indices(len(x), val_fraction=d.val_fraction, seed=spec.seed,
                                       labels=a.y if classification else None,
                                       train_subset=d.train_subset, val_subset=d.val_subset)
    y, y_test = torch.from_numpy(a.y), torch.from_numpy(a.y_test)
    norm = {"mean": mean.tolist(), "std": std.tolist()}
    return Dataset(
        task=d.task, x=torch.from_numpy(x), y=y if classification else y[:, None],
        train_idx=torch.from_numpy(train_idx), val_idx=torch.from_numpy(val_idx),
        x_test=torch.from_numpy(x_test), y_test=y_test if classification else y_test[:, None],
        in_shape=tuple(x.shape[1:]), out_features=len(a.classes) if classification else 1, classes=a.classes,
        normalization={"scale": scale, **norm} if images else norm)


def load_dataset(spec: StudySpec, *, storage: optuna.storages.RDBStorage | None = None,
                 data_dir: str | None = None) -> Dataset:
    """Load the study's data set as CPU tensors (move it with ``Dataset.to(device)``).

    Args:
        storage: the study's store, where a CSV study's files are fetched from when this machine
            has no local copy yet (see :func:`csv_arrays`).
        data_dir: where an image study's files are (see ``hpo.data.images``).

    Raises:
        DataError: when the data cannot be found or read.
    """
    if spec.data.source == "csv":
        return _load_csv(spec, storage)
    if spec.data.files and "arrays" in spec.data.files:
        return _load_arrays(spec, storage)
    return load_image_dataset(spec, data_dir=data_dir)



SMALL_SAMPLE = 1024  # values per sample below which a CPU run uses one thread


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """``data`` moved onto ``device`` once for the whole run (a worker's trials, a retrain's folds).
    On the CPU, data of small samples (under ``SMALL_SAMPLE`` values each) set torch to one thread
    for the process: for such models thread hand-offs cost more than the arithmetic they would split."""
    data = data.to(device)
    if device.type == "cpu" and data.x[0].numel() < SMALL_SAMPLE:
        torch.set_num_threads(1)
    return data
