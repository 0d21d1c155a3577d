"""CSV tables: read and checked at ``create-study``, then referred to by the stored spec (name,
size, rows, columns, sha256) while ``hpo.search.study.create`` keeps the files themselves in the store
(``hpo.store.data_tables``), so a worker on another machine needs no copy of them. Free of torch, so
creating a study starts fast.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from hpo.data.checksum import sha256_file
from hpo.errors import DataError
from hpo.spec.schema import StudySpec
from hpo.store.data_tables import max_data_bytes


def read_csv_table(path: str, columns: tuple[str, ...]) -> dict:
    """Read the named numeric columns of a CSV, refusing missing or non-numeric values.

    Returns ``{"columns": [...], "rows": [[...], ...]}``, the form embedded in the stored spec.

    Raises:
        DataError: naming the file, the line (as an editor numbers it) and the column of the first
            bad value.
    """
    from hpo.data.csv_lines import csv_line

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from e
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the file has {', '.join(map(str, frame.columns))}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    frame = frame[list(columns)]
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() | ~np.isfinite(numeric.fillna(0.0))
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        value = frame.iat[row, col]
        problem = "missing value" if pd.isna(value) else f"expected a number, got {value!r}"
        raise DataError(f"{path}: line {csv_line(path, int(row))}, column {columns[col]!r}: {problem}")
    return {"columns": list(columns), "rows": numeric.to_numpy(dtype=float).tolist()}


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


def embed_csv(spec: StudySpec) -> StudySpec:
    """Read and check a CSV study's tables and refer to their files from the spec (no-op for other
    sources): ``data.files`` gets each file's name, size (bytes), rows, columns and sha256, a few
    hundred bytes whatever the data size. ``hpo.search.study.create`` then stores the files themselves.

    Raises:
        DataError: a file is missing, unreadable, malformed, or the files together are larger
            than ``HPO_MAX_DATA_BYTES`` (checked before anything is read).
    """
    d = spec.data
    if d.source != "csv":
        return spec
    columns = (*d.features, d.target)
    paths = {"train": d.train, "test": d.test}
    sizes = _sizes(paths)
    tables = {part: read_csv_table(path, columns) for part, path in paths.items()}
    if d.task == "classification":
        for part, table in tables.items():
            labels = np.asarray(table["rows"])[:, -1]
            if not np.all(labels == np.round(labels)) or labels.min() < 0:
                raise DataError(f"{getattr(d, part)}: column {d.target!r} must hold class indices 0..K-1 for a classification study")
    files = {part: {"name": Path(path).name, "size": sizes[part], "rows": len(tables[part]["rows"]),
                    "columns": len(pd.read_csv(path, nrows=0).columns), "sha256": sha256_file(path)}
             for part, path in paths.items()}
    return spec.with_data(replace(d, files=files, inline=None))
