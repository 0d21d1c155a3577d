"""The one file checksum hpo uses (data files in the store and its cache, export folders).

Imports only the standard library: ``hpo.load`` checks export folders with it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (any size).

    Raises:
        OSError: when the file cannot be read.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
