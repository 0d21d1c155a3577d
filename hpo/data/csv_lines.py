"""Line numbers of CSV data rows, as an editor shows them, for error messages.

pandas numbers data rows from 0 after the header and skips blank (or whitespace-only) lines, and a
quoted field may span lines, so a row's index is not its line. This reads the file again, only
when there is an error to report.
"""

from __future__ import annotations

import csv


def csv_line(path: str, data_row: int) -> int:
    """The 1-based line where data row ``data_row`` (0-based, as pandas counts) starts.

    Raises:
        OSError: when the file cannot be read; IndexError when it has fewer data rows.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        row, end = -2, 0  # -2: the header (the first non-blank record) is still to come
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line: pandas skips it
            row += 1
            if row == data_row:
                return start
    raise IndexError(f"{path} has no data row {data_row}")


def read_numeric_csv(path: str, columns: tuple[str, ...], *, what: str = "CSV", role: str = ""):
    """The CSV at ``path`` as written (a pandas frame of text cells) and its named ``columns`` as
    numbers (float64 array, rows x columns); ``role`` names the columns in errors (``feature ``). The one rule for every CSV hpo reads (a study's data
    at create-study and in workers, ``hpo predict``'s inputs): every named cell a finite number.

    Raises:
        DataError: one line naming the file, and for a bad cell its line (as an editor numbers it),
            column and the text as written: not found, not CSV (ragged row, unterminated quote,
            empty file, not UTF-8), a missing column, no rows, a missing or non-finite value.
    """
    import numpy as np
    import pandas as pd

    from hpo.errors import DataError

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: cannot read as {what}: the file is empty (no header line)") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot read as {what}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from e
    except (OSError, pd.errors.ParserError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read as {what}: {first}") from e
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing {role}column(s) {', '.join(missing)}; the file has {', '.join(map(str, frame.columns))}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    cells = frame[list(columns)]
    numbers = cells.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = not_float32(numbers)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        text = cells.iat[row, col]
        expected = ("a number within ±3.4e38 (float32)" if np.isfinite(numbers[row, col])
                    else "a finite number")
        problem = "missing value" if not text.strip() else f"expected {expected}, got {text.strip()[:40]!r}"
        raise DataError(f"{path}: line {csv_line(path, int(row))}, column {columns[col]!r}: {problem}")
    return frame, numbers


FINITE = "a finite number within ±3.4e38 (float32)"


def not_float32(values):
    """Where ``values`` (a NumPy array) hold what hpo refuses in every input format: NaN, ±inf,
    or a number too large for float32, the type models compute in (bool array, same shape)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max)
