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
