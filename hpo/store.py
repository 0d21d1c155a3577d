"""The study store: URL resolution, Optuna's RDBStorage tuned for workers, and the artifact store.

URL order: ``--storage`` flag, then ``HPO_STORAGE``, then ``sqlite:///storage/hpo.db``.
Artifacts (retrain weights, predictions) go to ``--artifacts``, ``HPO_ARTIFACTS``, or
``artifacts/`` beside a SQLite file (``storage/artifacts`` by default).
"""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore

from hpo.errors import StoreError

DEFAULT_URL = "sqlite:///storage/hpo.db"
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
SQLITE_TIMEOUT = 60  # seconds a SQLite writer waits for the lock


def resolve_url(flag: str | None = None) -> str:
    return flag or os.environ.get("HPO_STORAGE") or DEFAULT_URL


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every log line and error)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def _prepare_sqlite(path: Path) -> None:
    """Create the folder, check it is writable, and switch the file to WAL once (it persists)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store folder {path.parent}: {e.strerror}") from e
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreError(f"the store {path} is not writable; pass --storage or set HPO_STORAGE")
    try:
        with sqlite3.connect(path, timeout=SQLITE_TIMEOUT) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the SQLite store {path}: {e}") from e


def engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    # One worker needs one connection (plus one for the heartbeat thread).
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 3600}


def open_storage(url: str | None = None, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """Open (and on first use create) the store at ``url``.

    With ``heartbeat``, running trials send a heartbeat, and a trial whose worker died is failed
    and re-queued with the same parameters (its retry count is in its system attrs).

    Raises:
        StoreError: when the store cannot be reached or created (password masked).
    """
    url = resolve_url(url)
    path = sqlite_path(url)
    if path is not None:
        _prepare_sqlite(path)
    kwargs = {}
    if heartbeat:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        kwargs = {
            "heartbeat_interval": HEARTBEAT_INTERVAL,
            "grace_period": GRACE_PERIOD,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        }
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(f"cannot open the store {mask_url(url)}: {mask_url(reason)}") from e


def artifact_dir(url: str | None = None, flag: str | None = None) -> Path:
    if flag or os.environ.get("HPO_ARTIFACTS"):
        return Path(flag or os.environ["HPO_ARTIFACTS"])
    path = sqlite_path(resolve_url(url))
    return (path.parent if path is not None else Path("storage")) / "artifacts"


def open_artifact_store(url: str | None = None, flag: str | None = None) -> FileSystemArtifactStore:
    path = artifact_dir(url, flag)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))
