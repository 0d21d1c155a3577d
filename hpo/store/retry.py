"""Which store errors are worth retrying, and the retry loop.

Only faults of the connection or of concurrency are retried: a refused, reset or dropped
connection, a server going away or shutting down, too many connections, a serialization failure
or deadlock, a busy SQLite lock. Schema, permission and data errors (a missing table, a denied
user, a value too long) raise at once: waiting would not fix them.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import time

import optuna
import sqlalchemy.exc

from hpo.store.config import mask_url

_log = logging.getLogger("hpo.store")

# PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_TRANSIENT_CLASSES = ("08",)  # connection exception
_PG_TRANSIENT_CODES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03"}
# MySQL / MariaDB client and server error numbers.
_MYSQL_TRANSIENT = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
# libpq puts no SQLSTATE on errors raised while connecting; these texts say the URL is wrong.
_PERMANENT_CONNECT = re.compile(r"does not exist|password authentication failed|no password supplied|"
                                r"no pg_hba\.conf entry|permission denied", re.IGNORECASE)


def _driver_error(error: BaseException) -> BaseException | None:
    """The DBAPI error behind ``error`` (through Optuna's and SQLAlchemy's wrappers), if any."""
    while error is not None:
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a connection or concurrency fault that a later
    attempt can get past. Classified by the driver's error: SQLSTATE on PostgreSQL, the error
    number on MySQL/MariaDB, a busy or locked database on SQLite."""
    wrapped = _driver_error(error)
    if wrapped is None:
        return False
    if wrapped.connection_invalidated:
        return True
    orig = wrapped.orig
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    pgcode = getattr(orig, "pgcode", None)
    if type(orig).__module__.startswith("psycopg"):
        if pgcode:
            return pgcode[:2] in _PG_TRANSIENT_CLASSES or pgcode in _PG_TRANSIENT_CODES
        # No SQLSTATE: raised by the client library (refused, reset, server closed the connection).
        return (isinstance(wrapped, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
                and not _PERMANENT_CONNECT.search(str(orig)))
    if type(orig).__module__.startswith(("pymysql", "MySQLdb", "mysql")):
        code = orig.args[0] if orig.args and isinstance(orig.args[0], int) else None
        return code in _MYSQL_TRANSIENT or (code is None and isinstance(wrapped, sqlalchemy.exc.InterfaceError))
    return False


def reason(e: BaseException) -> str:
    """The first line of what the database (or driver) said, for a one-line message."""
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ else e
    text = str(getattr(cause, "orig", None) or cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def call_retrying(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried with backoff (0.5 s doubling to 5 s) on transient store
    errors for up to ``seconds``; any other error, or the last transient one, is raised.

    ``fn`` must be safe to run again after a transient error: a commit whose answer was lost may
    have landed (writes in hpo are upserts, conditional updates or carry a token to find them).
    """
    deadline = time.monotonic() + seconds
    delay, attempt = 0.5, 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            attempt += 1
            _log.warning("store unreachable (%s); retry %d in %.1fs", mask_url(reason(e)), attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def retrying(method):
    """A storage method retried within its storage's ``retry_seconds``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return call_retrying(self.retry_seconds, method, self, *args, **kwargs)
    return wrapper
