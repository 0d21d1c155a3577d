"""Where the store is and how to reach it: URL resolution and masking, drivers, SQLite files, engine
settings, and the environment knobs (seconds).

URL order: ``--storage`` flag, then ``HPO_STORAGE``, then ``sqlite:///storage/hpo.db``. Any
SQLAlchemy URL works: ``sqlite:///``, ``postgresql://`` / ``postgresql+psycopg2://``,
``mysql+pymysql://``; the same URL works in plain Optuna and optuna-dashboard (``driver_url``).

Knobs: ``HPO_HEARTBEAT_INTERVAL`` (10) and ``HPO_GRACE_PERIOD`` (30: a RUNNING trial without a
heartbeat for this long belongs to a dead worker and is re-queued) are the defaults
``hpo create-study`` stores in a study; its workers use the study's values. ``HPO_STORE_RETRY``
(60: how long a worker retries a store that went away), ``HPO_MAX_RETRY`` (3: re-runs of one
trial), ``HPO_CONNECT_TIMEOUT`` (5).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from hpo.errors import DataError, StoreError

STORAGE_ROOT = Path("storage")  # the default store, artifacts, reports, exports, predictions, jobs
DEFAULT_URL = f"sqlite:///{STORAGE_ROOT / 'hpo.db'}"
MAX_DATA_BYTES = 10**9  # default of HPO_MAX_DATA_BYTES: a study's data files together, or one file to predict on
SQLITE_TIMEOUT = 20  # seconds a SQLite writer waits for the lock: below the shortest default grace period


def env_seconds(name: str, default: float) -> float:
    """The environment variable ``name`` as a number of seconds (``default`` when unset).

    Raises:
        StoreError: when it is set to something that is not a finite number >= 0.
    """
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise StoreError(f"{name}={raw!r} is not a number of seconds >= 0")
    return value


def max_data_bytes() -> int:
    """The most bytes of data files one study may keep in the store (and ``hpo predict`` may read from one file) (``HPO_MAX_DATA_BYTES``).

    Raises:
        DataError: when the setting is not a positive whole number of bytes.
    """
    raw = os.environ.get("HPO_MAX_DATA_BYTES")
    if not raw:
        return MAX_DATA_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"HPO_MAX_DATA_BYTES={raw!r}: expected a positive number of bytes (default {MAX_DATA_BYTES})")
    return value


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial beats (``interval``) and how long without a beat makes it dead
    (``grace``), in whole seconds. Stored in each study so that every worker agrees."""

    interval: int = 10
    grace: int = 30

    def __post_init__(self) -> None:
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise StoreError(f"heartbeat interval: got {self.interval!r}; allowed: a whole number of seconds >= 1")
        if not (isinstance(self.grace, int) and self.grace > self.interval):
            # A live trial would look dead between two beats (and before its first one).
            raise StoreError(f"grace period: got {self.grace!r}; allowed: a whole number of seconds longer than "
                             f"the heartbeat interval ({self.interval})")

    @classmethod
    def from_env(cls, *, interval: int | None = None, grace: int | None = None) -> Heartbeat:
        """From ``HPO_HEARTBEAT_INTERVAL`` and ``HPO_GRACE_PERIOD`` (whole seconds), else the
        defaults; ``interval``/``grace`` given here win over both.

        Raises:
            StoreError: a knob that is not a whole number of seconds, or a grace period not longer
                than the interval (the message echoes the values given).
        """
        if interval is not None or grace is not None:
            base = cls.from_env()
            return cls(interval=base.interval if interval is None else interval,
                       grace=base.grace if grace is None else grace)
        values = {}
        for field, name in (("interval", "HPO_HEARTBEAT_INTERVAL"), ("grace", "HPO_GRACE_PERIOD")):
            raw = os.environ.get(name)
            if not raw:
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                raise StoreError(f"{name}={raw!r}: allowed: a whole number of seconds") from None
        try:
            return cls(**values)
        except StoreError:
            given = ", ".join(f"{n}={os.environ[n]!r}" for n in ("HPO_HEARTBEAT_INTERVAL", "HPO_GRACE_PERIOD")
                              if os.environ.get(n))
            raise StoreError(f"{given}: HPO_GRACE_PERIOD must be longer than HPO_HEARTBEAT_INTERVAL "
                             f"(whole seconds, interval >= 1)") from None

    def to_dict(self) -> dict[str, int]:
        return {"interval": self.interval, "grace": self.grace}


def resolve_url(flag: str | None = None) -> str:
    return flag or os.environ.get("HPO_STORAGE") or DEFAULT_URL


# user:password@ of a URL (the user may be empty; the password runs to the last @ of the word, so
# an unencoded @ or / in it is masked too); a password in a query string or a libpq key=value DSN,
# plain or URL-encoded (a pyodbc odbc_connect string), quoted or not, under the names drivers take.
_USERINFO = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)\S*@")
_KEYED = re.compile(r"((?:ssl)?(?:password|passwd|pwd)\s*(?:=|%3D))(?:'[^']*'|\"[^\"]*\"|.*?)(?=&|;|%26|%3B|\s|$)",
                    re.IGNORECASE)


def mask_url(url: str) -> str:
    """The text with every URL password replaced by ``***`` (for every log line and error): in the
    user info of any SQLAlchemy URL, and in query strings and DSNs (``password``, ``passwd``, ``pwd``)."""
    return _KEYED.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


def driver_url(url: str) -> str:
    """``url`` with the driver hpo connects through: a bare ``postgresql://`` (or ``postgres://``)
    goes to psycopg2, the driver hpo's retry rules and tests are written against.

    SQLAlchemy 2.1 maps the bare scheme to psycopg 3; hpo depends on both drivers, so the very URL
    hpo prints opens the store in plain Optuna, the ``optuna`` CLI and a stand-alone optuna-dashboard
    too (``tests/store/test_url_interop.py``). Without psycopg2 the bare scheme is left to SQLAlchemy.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def prepare_sqlite(path: Path) -> None:
    """Create the folder, check it is writable, and switch the file to WAL once (it persists).

    Raises:
        StoreError: when the folder or file cannot be created or written.
    """
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


def engine_kwargs(url: str, *, sqlite_timeout: float = SQLITE_TIMEOUT) -> dict:
    """SQLAlchemy engine settings: SQLite waits ``sqlite_timeout`` seconds for its lock; a server
    store keeps one pooled connection per process (no overflow), pre-pinged."""
    from hpo.store.pool import OneConnectionPerThread  # sqlalchemy: only what opens a store pays its import

    if url.startswith("sqlite"):
        # A file's store: the same guard against a thread's nested checkout as a server's (an
        # in-memory database keeps SQLAlchemy's own pool, which it needs).
        pool = {"poolclass": OneConnectionPerThread} if sqlite_path(url) is not None else {}
        return {**pool, "connect_args": {"timeout": sqlite_timeout}}
    connect_timeout = int(env_seconds("HPO_CONNECT_TIMEOUT", 5))
    # At most one connection per process: the worker's thread and its heartbeat take turns on it
    # (each holds it for one short transaction), so N workers hold at most N connections and a
    # role limited to N connections runs N workers. Pre-ping replaces connections a restart killed.
    return {"poolclass": OneConnectionPerThread, "pool_pre_ping": True, "pool_size": 1, "max_overflow": 0,
            "pool_recycle": 3600, "connect_args": {"connect_timeout": connect_timeout}}
