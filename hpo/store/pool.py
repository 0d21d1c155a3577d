"""The connection pool of every store engine: a thread never holds two of its connections at once.

A server store keeps one connection per process (``hpo.store.config.engine_kwargs``). Code that
asks for a connection while its own thread still holds one (a read inside an open transaction, say)
would wait for itself until the pool timed out, and then be retried as a store outage: a worker
stalled for minutes and exited 75 over a bug, not a fault of the store. This pool refuses such a
nested checkout at once, on SQLite too (where the default pool would hand out a second connection
and hide the bug until the study ran on PostgreSQL or MariaDB).

Built on SQLAlchemy's ``QueuePool`` through its subclass hooks ``_do_get`` / ``_do_return_conn``.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa


class NestedCheckout(RuntimeError):
    """A thread asked the pool for a connection while it held one (a bug in hpo, never a store fault)."""


class OneConnectionPerThread(sa.pool.QueuePool):
    """``QueuePool`` that refuses a second checkout by a thread holding a connection (see the module)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._holders: dict[int, int] = {}  # id(connection record) -> the thread holding it
        self._holders_lock = threading.Lock()

    def _do_get(self):
        me = threading.get_ident()
        with self._holders_lock:
            if me in self._holders.values():
                raise NestedCheckout("this thread asked the store for a second connection while it holds one "
                                     "(a nested transaction in hpo): it would wait for itself")
        record = super()._do_get()
        with self._holders_lock:
            self._holders[id(record)] = me
        return record

    def _do_return_conn(self, record) -> None:
        with self._holders_lock:
            self._holders.pop(id(record), None)
        super()._do_return_conn(record)
