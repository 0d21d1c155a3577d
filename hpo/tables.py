"""CSV tables: read and checked at ``create-study`` and embedded in the stored spec, so a worker on
another machine needs no copy of the file. Free of torch, so creating a study starts fast.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from hpo.errors import DataError
from hpo.spec import StudySpec

INLINE_LIMIT_BYTES = 20 * 2**20


def read_csv_table(path: str, columns: tuple[str, ...]) -> dict:
    """Read the named numeric columns of a CSV, refusing missing or non-numeric values.

    Returns ``{"columns": [...], "rows": [[...], ...]}``, the form embedded in the stored spec.

    Raises:
        DataError: naming the file, the line (as an editor numbers it) and the column of the first
            bad value.
    """
    from hpo.csv_lines import csv_line

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


def embed_csv(spec: StudySpec) -> StudySpec:
    """Read and check a CSV study's tables and put them into the spec (no-op for other sources)."""
    d = spec.data
    if d.source != "csv":
        return spec
    columns = (*d.features, d.target)
    tables = {"train": read_csv_table(d.train, columns), "test": read_csv_table(d.test, columns)}
    if d.task == "classification":
        for part, table in tables.items():
            labels = np.asarray(table["rows"])[:, -1]
            if not np.all(labels == np.round(labels)) or labels.min() < 0:
                raise DataError(f"{getattr(d, part)}: column {d.target!r} must hold class indices 0..K-1 for a classification study")
    size = sum(len(t["rows"]) * len(columns) * 8 for t in tables.values())
    if size > INLINE_LIMIT_BYTES:
        return spec  # too large to embed: workers read the path themselves
    return spec.with_data(replace(d, inline=tables))
