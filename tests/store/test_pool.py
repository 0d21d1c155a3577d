"""A thread never holds two connections of a store: a nested checkout is refused at once, on every
backend, instead of waiting on itself (a server store keeps one connection per process)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from hpo.store.pool import NestedCheckout
from hpo.store.storage import open_storage


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                                     pytest.param("mysql", marks=pytest.mark.mysql)])
def test_a_nested_checkout_is_refused_at_once_and_other_threads_take_turns(backend, request, tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}" if backend == "sqlite" else request.getfixturevalue(
        "pg_url" if backend == "postgres" else "mysql_url")
    storage = open_storage(url, heartbeat=False)
    try:
        start = time.monotonic()
        with storage.engine.connect() as outer:
            outer.execute(sa.text("SELECT 1"))
            with pytest.raises(NestedCheckout, match="second connection while it holds one"):
                storage.engine.connect()
        assert time.monotonic() - start < 2  # refused, not waited out
        # The connection is back: the same thread and another one use it again, one after the other.
        seen = []
        with storage.engine.connect() as conn:
            seen.append(conn.execute(sa.text("SELECT 1")).scalar())
        other = threading.Thread(target=lambda: seen.append(storage.get_all_studies() == []))
        other.start()
        other.join(timeout=30)
        assert seen == [1, True]
    finally:
        storage.engine.dispose()
