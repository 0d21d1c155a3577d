"""CSV tables: read and checked at ``create-study``, then referred to by the stored spec (name,
size, rows, columns, sha256) while ``hpo.search.study.create`` keeps the files themselves in the store
(``hpo.store.data_tables``), so a worker on another machine needs no copy of them. Free of torch, so
creating a study starts fast.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from hpo.data.checksum import sha256_file
from hpo.errors import DataError
from hpo.spec.schema import StudySpec
from hpo.store.config import max_data_bytes


def read_csv_table(path: str, columns: tuple[str, ...]) -> dict:
    """Read the named numeric columns of a CSV, refusing missing or non-numeric values.

    Returns ``{"columns": [...], "rows": [[...], ...]}``, the form embedded in the stored spec.

    Raises:
        DataError: naming the file, the line (as an editor numbers it) and the column of the first
            bad value.
    """
    from hpo.data.csv_lines import read_numeric_csv

    _, numbers = read_numeric_csv(path, columns)
    return {"columns": list(columns), "rows": numbers.tolist()}


def size_text(n: int) -> str:
    """A byte count for people: ``2.3 kB``, ``228.1 kB``, ``20.5 MB``, ``1.2 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _sizes(paths: dict[str, str]) -> dict[str, int]:
    """Bytes of each file, refusing a study whose distinct files together pass the store's limit."""
    sizes = {}
    for part, path in paths.items():
        try:
            sizes[part] = Path(path).stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror}") from e
    total = sum({Path(p).resolve(): sizes[part] for part, p in paths.items()}.values())
    limit = max_data_bytes()
    if total > limit:
        listed = ", ".join(f"data.{part} {paths[part]} {size_text(n)}" for part, n in sizes.items())
        raise DataError(f"data: {listed}: {size_text(total)} in all, over the store's limit of "
                        f"{size_text(limit)} per study (HPO_MAX_DATA_BYTES={limit}); raise it, or use less data")
    return sizes


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """Training and validation rows of a split of ``n`` rows (scikit-learn's ``train_test_split``)."""
    n_val = math.ceil(val_fraction * n)
    return math.floor((1 - val_fraction) * n), n_val


def _check_splittable(spec: StudySpec, n: int) -> None:
    """Refuse training data too small for a trial's train/validation split or the retrain's folds,
    at create-study rather than in every worker."""
    d = spec.data
    train, val = split_sizes(n, d.val_fraction)
    if train < 1 or val < 1:
        need = next(m for m in range(2, 10**6) if min(split_sizes(m, d.val_fraction)) >= 1)
        raise DataError(f"data.train: {d.train}: {n} row{'s' * (n != 1)} cannot be split into training and "
                        f"validation rows (data.val_fraction {d.val_fraction}); it needs at least {need} rows")
    if n < spec.retrain.folds:
        raise DataError(f"data.train: {d.train}: {n} rows cannot be split into retrain.folds {spec.retrain.folds} "
                        f"folds; it needs at least {spec.retrain.folds} rows (or fewer folds)")


def embed_csv(spec: StudySpec) -> StudySpec:
    """Read and check a CSV study's tables and refer to their files from the spec (no-op for other
    sources): ``data.files`` gets each file's name, size (bytes), rows, columns and sha256, a few
    hundred bytes whatever the data size. ``hpo.search.study.create`` then stores the files themselves.

    Raises:
        DataError: a file is missing, unreadable, malformed, the files together are larger than
            ``HPO_MAX_DATA_BYTES`` (checked before anything is read), or the training rows are too
            few to split into training and validation rows or into the retrain's folds.
    """
    d = spec.data
    if d.source != "csv":
        return spec
    columns = (*d.features, d.target)
    paths = {"train": d.train, "test": d.test}
    sizes = _sizes(paths)
    tables = {part: read_csv_table(path, columns) for part, path in paths.items()}
    _check_splittable(spec, len(tables["train"]["rows"]))
    if d.task == "classification":
        for part, table in tables.items():
            labels = np.asarray(table["rows"])[:, -1]
            if not np.all(labels == np.round(labels)) or labels.min() < 0:
                raise DataError(f"{getattr(d, part)}: column {d.target!r} must hold class indices 0..K-1 for a classification study")
    files = {part: {"name": Path(path).name, "size": sizes[part], "rows": len(tables[part]["rows"]),
                    "columns": len(pd.read_csv(path, nrows=0).columns), "sha256": sha256_file(path)}
             for part, path in paths.items()}
    return spec.with_data(replace(d, files=files, inline=None))
