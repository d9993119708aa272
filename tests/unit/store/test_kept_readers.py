"""Store.read keeps SQLite reader connections between reads, outside any transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import text

from hms_ach.store.db import READER_POOL_SIZE, Store


def test_a_reader_is_used_again_without_its_snapshot_and_closed_with_the_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'kept.db'}")
    try:
        with store.read() as conn:
            conn.execute(text("SELECT count(*) FROM patient")).scalar()  # SQLAlchemy began a transaction
            first = conn.connection.dbapi_connection
        with store.read() as conn:
            assert conn.connection.dbapi_connection is first  # kept, not checked in and out again
            assert not conn.in_transaction()  # the last read's snapshot ended with it
        assert store.pool_states()[-1] == ("reader", 0, 1)  # kept, so idle, not in use
        # a write committed meanwhile is seen by the kept reader (it holds no old snapshot)
        with store.transaction() as tx:
            tx.execute(text("CREATE TABLE seen (x INTEGER)"))
            tx.execute(text("INSERT INTO seen VALUES (1)"))
        with store.read() as conn:
            assert conn.execute(text("SELECT x FROM seen")).scalar() == 1
    finally:
        store.dispose()
    # every kept reader was closed: the database file can be checkpointed and truncated
    raw = sqlite3.connect(tmp_path / "kept.db")
    try:
        busy, _log, _done = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        raw.close()


def test_no_more_readers_are_kept_than_the_pool_keeps(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'many.db'}")
    try:
        opened = [store.read() for _ in range(READER_POOL_SIZE + 3)]
        for cm in opened:
            cm.__enter__()
        for cm in opened:
            cm.__exit__(None, None, None)
        assert store.pool_states()[-1][1] == 0  # none in use
        assert len(store._idle_readers or ()) == READER_POOL_SIZE  # the others were closed
    finally:
        store.dispose()


def test_a_read_that_raised_gives_its_connection_back(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'raised.db'}")
    try:
        try:
            with store.read() as conn:
                conn.execute(text("SELECT no_such_column FROM patient"))
        except Exception:  # noqa: BLE001 - the read's own error
            pass
        assert store.pool_states()[-1][1] == 0  # nothing left checked out
    finally:
        store.dispose()
