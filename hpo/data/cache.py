"""Local copies of the data kept in the store, one file per content, named by its sha256.

A worker fetches a study's data files from the store once per machine: a second worker, or a
restarted one, reads the local copy. The folder is ``$HPO_CACHE_DIR``, else
``$XDG_CACHE_HOME/hpo/store``, else ``~/.cache/hpo/store``. Every fetch and every read of a local
copy checks the sha256: a damaged copy is replaced by a fresh fetch, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import sqlalchemy as sa

from hpo.data.checksum import sha256_file
from hpo.errors import DataError
from hpo.store.data_tables import read_chunks

_log = logging.getLogger("hpo.data.sources")


def cache_dir() -> Path:
    """The folder of local copies (see the module docstring)."""
    if os.environ.get("HPO_CACHE_DIR"):
        return Path(os.environ["HPO_CACHE_DIR"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return root / "hpo" / "store"


def local_copy(ref: dict, engine: sa.Engine | None, *, original: str | Path | None = None) -> Path:
    """The path of a verified local copy of the data file ``ref`` (a ``DataSpec.files`` entry),
    fetched from the store behind ``engine`` when there is none yet or the one there is damaged.
    Without a store, the ``original`` file (the path the study was created from) serves when its
    sha256 matches.

    Raises:
        DataError: no copy here and no store to fetch from; the store lacks the data; the fetched
            bytes do not match the checksum; the cache folder cannot be written.
    """
    sha256, name = ref["sha256"], ref.get("name", "data file")
    if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        # the file name of the local copy: read from the store, so checked before it becomes a path
        raise DataError(f"{name}: the study's data reference has sha256 {str(sha256)[:80]!r}, not 64 hex digits; "
                        "the study in the store is damaged: create it again")
    folder = cache_dir()
    path = folder / sha256
    if path.is_file():
        if sha256_file(path) == sha256:
            return path
        _log.warning("the local copy of %s at %s does not match its sha256: fetching it again", name, path)
        path.unlink(missing_ok=True)
    if engine is None:
        if original is not None and Path(original).is_file() and sha256_file(original) == sha256:
            return Path(original)
        raise DataError(f"{name}: no local copy in {folder} and no store to fetch it from")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sha256}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write the data cache {folder}: {e.strerror}; point HPO_CACHE_DIR at a writable folder") from e
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for chunk in read_chunks(engine, ref):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise DataError(f"{name}: the data fetched from the store do not match their sha256 {sha256[:12]}...; "
                            "the copy in the store is damaged")
        os.replace(tmp, path)  # atomic: workers fetching at once each put a whole, verified copy
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
