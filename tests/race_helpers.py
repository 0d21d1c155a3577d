"""Process targets for race tests, in a module of their own: a spawned process imports the
module of its target, and this one is light (no torch)."""

from __future__ import annotations


def ensure_tables_rounds(url: str, rounds: int, barrier, failures) -> None:
    """Each round: wait for the go, create hpo's data tables on a fresh engine, report any error."""
    import sqlalchemy as sa

    from hpo.store import data_tables as datastore
    for _ in range(rounds):
        barrier.wait(timeout=120)
        engine = sa.create_engine(url, connect_args={"timeout": 60} if url.startswith("sqlite") else {})
        try:
            datastore.ensure_tables(engine)
        except Exception as e:  # reported to the test, which fails naming it
            failures.put(f"{type(e).__name__}: {e}")
        engine.dispose()
        barrier.wait(timeout=120)
