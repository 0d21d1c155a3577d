"""Which store errors are worth retrying, and the retry loop.

Only faults of the connection or of concurrency are retried: a refused, reset or dropped
connection, a server going away, shutting down or starting up, too many connections, a
serialization failure or deadlock, a busy SQLite lock. Schema, permission and data errors (a
missing table, a denied user, a wrong host name, a value too long) raise at once: waiting would not
fix them. A store that stays unreachable past the retry window raises ``StoreUnreachable``, a full
disk ``StoreFull``: faults of the store, never of the call that met them.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import sqlite3
import time
from dataclasses import dataclass

import optuna
import sqlalchemy.exc

from hpo.errors import StoreFull, StoreUnreachable
from hpo.store.config import mask_url

_log = logging.getLogger("hpo.store")

# PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_TRANSIENT_CLASSES = ("08",)  # connection exception
_PG_TRANSIENT_CODES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03"}
# MySQL / MariaDB client and server error numbers.
_MYSQL_TRANSIENT = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
# libpq puts no SQLSTATE on errors raised while connecting; these texts say the URL is wrong.
_PERMANENT_CONNECT = re.compile(r"does not exist|password authentication failed|no password supplied|"
                                r"no pg_hba\.conf entry|permission denied|authentication failed|"
                                r"could not translate host name|failed to resolve host|"
                                r"name or service not known|nodename nor servname", re.IGNORECASE)
_PG_DISK_FULL = "53100"
_MYSQL_DISK_FULL = {1021, 1114}  # disk full; the table is full
_SQLITE_FULL = 13


def _driver_error(error: BaseException) -> BaseException | None:
    """The DBAPI error behind ``error`` (through Optuna's and SQLAlchemy's wrappers), if any."""
    while error is not None:
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _in_chain(error: BaseException | None, kinds) -> bool:
    while error is not None:
        if isinstance(error, kinds):
            return True
        error = error.__cause__ or error.__context__
    return False


def _gave_up(error: BaseException | None) -> bool:
    return _in_chain(error, (StoreUnreachable, StoreFull))


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a connection or concurrency fault that a later
    attempt can get past. Classified by the driver's error: SQLSTATE on PostgreSQL, the error
    number on MySQL/MariaDB, a busy or locked database on SQLite. An error some retry loop
    already gave up on is not: loops inside loops must not multiply the window."""
    if _gave_up(error):
        return False
    if _in_chain(error, sqlalchemy.exc.TimeoutError):  # waited for the pool's one connection
        return True
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


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the store's disk or table space is full."""
    wrapped = _driver_error(error)
    if wrapped is None:
        return False
    orig = wrapped.orig
    if isinstance(orig, sqlite3.Error):
        return getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(orig)
    if getattr(orig, "pgcode", None) == _PG_DISK_FULL:
        return True
    if type(orig).__module__.startswith(("pymysql", "MySQLdb", "mysql")):
        return bool(orig.args) and orig.args[0] in _MYSQL_DISK_FULL
    return False


def reason(e: BaseException) -> str:
    """The first line of what the database (or driver) said, for a one-line message."""
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ else e
    text = str(getattr(cause, "orig", None) or cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


@dataclass
class Outage:
    """Since when one store has not answered, shared by every call to it in a process (the
    worker's thread and its heartbeat's): the process says so once, when it starts, and gives
    up ``HPO_STORE_RETRY`` seconds after that, whichever call is waiting then."""

    since: float | None = None  # wall clock, for people
    started: float | None = None  # monotonic clock, for the window

    def begin(self, seconds: float, error: BaseException) -> tuple[float, float]:
        """(since, started) of the outage ``error`` belongs to; the first error of one says so."""
        since, started = self.since, self.started
        if started is None:
            since, started = self.since, self.started = time.time(), time.monotonic()
            _log.warning("store unreachable (%s); retrying for up to %g s (HPO_STORE_RETRY sets it)",
                         mask_url(reason(error)), seconds)
        return since, started

    def end(self) -> None:
        if self.started is not None:
            _log.warning("store reachable again after %.1f s", time.monotonic() - self.started)
            self.since = self.started = None



def call_retrying(seconds: float, fn, *args, outage: Outage | None = None, **kwargs):
    """``fn(*args, **kwargs)``, retried with backoff (0.5 s doubling to 5 s) on transient store
    errors until ``seconds`` after the ``outage`` began (a fresh one: after this call's first
    failure); any other error is raised as it is.

    Raises:
        StoreUnreachable: the store stayed unreachable for the window (the driver's error as cause).
        StoreFull: the store's disk or table space is full (not retried).

    ``fn`` must be safe to run again after a transient error: a commit whose answer was lost may
    have landed (writes in hpo are upserts, conditional updates or carry a token to find them).
    """
    outage = outage if outage is not None else Outage()
    delay = 0.5
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if is_disk_full(e) and not _gave_up(e):
                raise StoreFull(f"the store's disk is full ({mask_url(reason(e))}); free space, then start "
                                f"again: a running trial is re-queued by the next worker") from e
            if not is_transient(e):
                raise
            since, started = outage.begin(seconds, e)
            if time.monotonic() + delay > started + seconds:
                moment = datetime.datetime.fromtimestamp(since, datetime.UTC)
                raise StoreUnreachable(
                    f"the store is unreachable since {moment:%Y-%m-%d %H:%M:%S} UTC "
                    f"({time.monotonic() - started:.0f} s; HPO_STORE_RETRY={seconds:g}): {mask_url(reason(e))}") from e
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            outage.end()
            return result


def retrying(method):
    """A storage method retried within its storage's ``retry_seconds``, in its storage's outage."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return call_retrying(self.retry_seconds, method, self, *args, outage=self.outage, **kwargs)
    return wrapper
