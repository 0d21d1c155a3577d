"""Data files kept in the store, content-addressed: a CSV study's tables travel with the study.

The stored spec refers to each data file in a few hundred bytes (``DataSpec.files``: name, size,
rows, columns, sha256); the bytes live in hpo's own tables, beside Optuna's schema:

- ``hpo_data_files``: one row per distinct content (sha256, size in bytes, number of chunks);
- ``hpo_data_chunks``: the content in chunks of :data:`CHUNK_BYTES` (512 KiB), well under every
  backend's default limits: MySQL/MariaDB ``max_allowed_packet`` 16 MiB (MariaDB 10.2.4+, MySQL
  8.0) and MEDIUMBLOB 16 MiB, PostgreSQL ``bytea`` 1 GB, SQLite ``SQLITE_MAX_LENGTH`` 1e9 bytes;
- ``hpo_data_refs``: which study uses which content. Two studies of the same file share one copy;
  a content is deleted with the last study that refers to it.

References are rows rather than a scan of the stored specs because the database then enforces
them: on PostgreSQL and MySQL the foreign keys make "delete the last reference's content" and
"add a reference to that content" exclude each other (the loser fails and is retried), and
Optuna's own ``delete_study`` removes a study's references by cascade. SQLite enforces no foreign
keys by default but runs one writer at a time, and each check-and-write here is one statement.

A content goes into the store in one transaction together with its first reference, so no
reader ever sees a partial copy, and two studies created at once from the same file store it once.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from pathlib import Path

import sqlalchemy as sa
import sqlalchemy.exc

from hpo.errors import DataError, StoreError
from hpo.store.optuna_private import STUDIES
from hpo.store.schema import schema_lock

CHUNK_BYTES = 512 * 1024
STORE_TRIES = 5  # attempts to store a content another process is storing or deleting meanwhile

_log = logging.getLogger("hpo.data.sources")

METADATA = sa.MetaData()
FILES = sa.Table(
    "hpo_data_files", METADATA,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("chunks", sa.Integer, nullable=False),
)
CHUNKS = sa.Table(
    "hpo_data_chunks", METADATA,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    # With a length, MySQL/MariaDB make it a MEDIUMBLOB (a plain BLOB holds 64 KiB only).
    sa.Column("data", sa.LargeBinary(length=CHUNK_BYTES), nullable=False),
)
REFS = sa.Table(
    "hpo_data_refs", METADATA,
    # sha256 first: the primary key's index then serves "who refers to this content?".
    sa.Column("sha256", sa.String(64), sa.ForeignKey(FILES.c.sha256), primary_key=True),
    sa.Column("study_id", sa.Integer, sa.ForeignKey(STUDIES.c.study_id, ondelete="CASCADE"),
              primary_key=True, autoincrement=False),
)

_ready: weakref.WeakSet[sa.Engine] = weakref.WeakSet()  # engines whose store has the tables




def _tables_exist(engine: sa.Engine) -> bool:
    inspector = sa.inspect(engine)
    return all(inspector.has_table(t.name) for t in METADATA.sorted_tables)


def ensure_tables(engine: sa.Engine) -> None:
    """Create hpo's data tables in the store unless they exist, under the store's schema lock
    (safe to race, like Optuna's schema: :mod:`hpo.store.schema`)."""
    if engine in _ready:
        return
    with schema_lock(engine.url.render_as_string(hide_password=False)):
        METADATA.create_all(engine, checkfirst=True)
    _ready.add(engine)


def refer(conn: sa.Connection, study_id: int, sha256: str) -> bool:
    """In the caller's transaction, refer study ``study_id`` to a stored content; False when the
    store lacks it.

    Raises:
        sqlalchemy.exc.IntegrityError: the content was deleted meanwhile (PostgreSQL, MySQL), or
            the reference exists.
    """
    stmt = sa.insert(REFS).from_select(
        ["sha256", "study_id"],
        sa.select(FILES.c.sha256, sa.literal(study_id, sa.Integer)).where(FILES.c.sha256 == sha256))
    return conn.execute(stmt).rowcount == 1


def _upload(conn: sa.Connection, study_id: int, sha256: str, path: Path) -> None:
    size = path.stat().st_size
    conn.execute(sa.insert(FILES).values(sha256=sha256, size=size, chunks=-(-size // CHUNK_BYTES)))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for seq in range(-(-size // CHUNK_BYTES)):
            chunk = f.read(CHUNK_BYTES)
            digest.update(chunk)
            conn.execute(sa.insert(CHUNKS).values(sha256=sha256, seq=seq, data=chunk))
    if digest.hexdigest() != sha256:  # the transaction is rolled back: nothing of it is kept
        raise DataError(f"{path}: the file changed while it was stored; run create-study again")
    conn.execute(sa.insert(REFS).values(sha256=sha256, study_id=study_id))


def attach(engine: sa.Engine, study_id: int, files: list[tuple[str, str | Path]]) -> None:
    """Refer study ``study_id`` to each (sha256, local path), storing the contents the store lacks.

    Raises:
        DataError: a file to store is missing or changed since it was checked.
        StoreError: a content could not be stored in :data:`STORE_TRIES` attempts (other processes
            kept storing or deleting the same content, or the store kept failing).
    """
    ensure_tables(engine)
    for sha256, path in dict(files).items():
        path = Path(path)
        for attempt in range(STORE_TRIES):
            try:
                with engine.begin() as conn:
                    if refer(conn, study_id, sha256):
                        break
                if not path.is_file():
                    raise DataError(f"{path}: file not found (its data are not in the store yet)")
                with engine.begin() as conn:
                    _upload(conn, study_id, sha256, path)
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
                # Another process stored the same content first (duplicate key), deleted it
                # between our check and our reference (foreign key), or deadlocked with us: look again.
                if attempt == STORE_TRIES - 1:
                    raise StoreError(f"could not store {path.name} (sha256 {sha256[:12]}...): {e.orig}") from e
                time.sleep(0.05 * (attempt + 1))


def release(engine: sa.Engine, study_id: int, *, sweep: bool = True) -> None:
    """Drop study ``study_id``'s references (after the study is deleted) and, with ``sweep``,
    delete every content no study refers to any more."""
    if engine not in _ready and not _tables_exist(engine):
        return  # a store from before hpo kept data in it
    with engine.begin() as conn:
        conn.execute(sa.delete(REFS).where(REFS.c.study_id == study_id))
    if sweep:
        delete_unreferenced(engine)


def delete_unreferenced(engine: sa.Engine) -> list[str]:
    """Delete the contents that no existing study refers to; returns their sha256s.

    References of studies deleted without hpo on SQLite (no cascade there) are dropped first. A
    content that gains a reference meanwhile is kept: its delete fails on the foreign key
    (PostgreSQL, MySQL) or finds the reference (SQLite, one writer at a time).
    """
    if engine not in _ready and not _tables_exist(engine):
        return []
    study_exists = sa.select(STUDIES.c.study_id).where(STUDIES.c.study_id == REFS.c.study_id).exists()
    referenced = sa.select(REFS.c.sha256).where(REFS.c.sha256 == FILES.c.sha256).exists()
    with engine.begin() as conn:
        conn.execute(sa.delete(REFS).where(~study_exists))
    with engine.connect() as conn:
        candidates = conn.execute(sa.select(FILES.c.sha256).where(~referenced)).scalars().all()
    deleted = []
    for sha256 in candidates:
        try:
            with engine.begin() as conn:
                if drop_content(conn, sha256):
                    deleted.append(sha256)
        except sqlalchemy.exc.IntegrityError:
            pass  # a study refers to it now
        except sqlalchemy.exc.OperationalError as e:  # a deadlock or lock timeout: the next sweep retries
            _log.warning("kept unreferenced data %s... for a later sweep: %s", sha256[:12], e.orig)
    return deleted


def drop_content(conn: sa.Connection, sha256: str) -> bool:
    """In the caller's transaction, delete a content unless a study refers to it; True when deleted.

    Raises:
        sqlalchemy.exc.IntegrityError: a reference to it appeared meanwhile (PostgreSQL, MySQL).
    """
    referenced = sa.select(REFS.c.sha256).where(REFS.c.sha256 == FILES.c.sha256).exists()
    if not conn.execute(sa.delete(FILES).where(FILES.c.sha256 == sha256, ~referenced)).rowcount:
        return False
    conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.sha256 == sha256))
    return True


def stored(engine: sa.Engine) -> dict[str, dict]:
    """The contents in the store: sha256 -> {size, chunks, refs (study ids)}."""
    if not _tables_exist(engine):
        return {}
    with engine.connect() as conn:
        out = {sha: {"size": size, "chunks": chunks, "refs": []}
               for sha, size, chunks in conn.execute(sa.select(FILES.c.sha256, FILES.c.size, FILES.c.chunks))}
        for sha, sid in conn.execute(sa.select(REFS.c.sha256, REFS.c.study_id)):
            out.setdefault(sha, {"size": None, "chunks": None, "refs": []})["refs"].append(sid)
    return out


def read_chunks(engine: sa.Engine, ref: dict):
    """Yield the chunks of the content ``ref`` names (a ``DataSpec.files`` entry), in order:
    one query per chunk, so memory stays at one chunk whatever the size.

    Raises:
        DataError: when the store lacks the content or part of it.
    """
    sha256, name = ref["sha256"], ref.get("name", "data file")
    missing = DataError(f"the store holds no data for {name} (sha256 {sha256[:12]}...): the study was deleted "
                        f"or created without its data; run hpo create-study again")
    if engine not in _ready and not _tables_exist(engine):
        raise missing
    with engine.connect() as conn:
        row = conn.execute(sa.select(FILES.c.chunks).where(FILES.c.sha256 == sha256)).first()
    if row is None:
        raise missing
    for seq in range(row.chunks):
        with engine.connect() as conn:
            data = conn.execute(sa.select(CHUNKS.c.data).where(CHUNKS.c.sha256 == sha256, CHUNKS.c.seq == seq)).scalar()
        if data is None:
            raise missing
        yield bytes(data)
