"""The SQLite WAL checkpointer never stops silently (store/db.py ``Checkpointer``, issue 13).

Real parts: a SQLite store in a file, the group-commit writer, the checkpoint thread. A thread is
killed the only way a Python thread can be from outside: an exception raised in it
(``PyThreadState_SetAsyncExc``), of a ``BaseException`` class, as an error nobody foresaw would be
(its rounds catch every ``Exception``). Whether the WAL was checkpointed is read from the database
file alone: a copy of it without its ``-wal`` holds only what a checkpoint copied there (the
writer's connections have the automatic checkpoint off).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Connection, text

from hms_ach.store import db
from hms_ach.store.db import Checkpointer, Store
from hms_ach.store.writer import StoreWriter


class Killed(BaseException):
    """Raised inside the checkpoint thread: what its rounds do not catch."""


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/wal.db")
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture
def writer(sqlite_store: Store) -> Iterator[StoreWriter]:
    writer = StoreWriter(sqlite_store)
    writer.run_sync(lambda tx: tx.execute(text("CREATE TABLE probe (n INTEGER)")))
    try:
        yield writer
    finally:
        writer.stop()


def _checkpointer(store: Store) -> Checkpointer:
    checkpointer = store.checkpointer()
    assert checkpointer is not None
    return checkpointer


def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s")
        time.sleep(0.02)


def _insert(writer: StoreWriter, *numbers: int) -> None:
    for n in numbers:
        writer.run_sync(partial(_insert_one, n=n))


def _insert_one(tx: Connection, n: int) -> None:
    tx.execute(text("INSERT INTO probe (n) VALUES (:n)"), {"n": n})


def _in_database_file(store: Store, tmp_path: Path) -> set[int]:
    """The rows the database file holds without its WAL (what checkpoints copied into it)."""
    path = store.writer.url.database
    assert path is not None
    copy = tmp_path / "copy.db"
    shutil.copyfile(path, copy)  # the file alone: no -wal, no -shm beside it
    conn = sqlite3.connect(copy)
    try:
        return {int(r[0]) for r in conn.execute("SELECT n FROM probe")}
    finally:
        conn.close()
        copy.unlink()


def kill_checkpointer(checkpointer: Checkpointer) -> None:
    """Raise :class:`Killed` in the running checkpoint thread and wait until it has exited."""
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive() and thread.ident is not None
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Killed))
    assert hit == 1
    checkpointer._dirty.set()  # wake it: the exception is raised when it runs Python code again
    thread.join(5)
    assert not thread.is_alive()


def _restarts_counted() -> float:
    return REGISTRY.get_sample_value("hms_ach_wal_checkpointer_restarts_total") or 0.0


def _events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == name)


def test_a_dead_checkpointer_is_restarted_by_the_next_commit_and_checkpoints_again(
    sqlite_store: Store, writer: StoreWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hms_ach.store.db")
    checkpointer = _checkpointer(sqlite_store)
    _insert(writer, 1)
    _until(lambda: checkpointer.pending_seconds() is None)
    assert _in_database_file(sqlite_store, tmp_path) == {1}
    counted = _restarts_counted()

    kill_checkpointer(checkpointer)
    assert _events(caplog, "store.checkpointer_died") == 1
    assert not checkpointer.alive and checkpointer.restarts == 0

    _insert(writer, 2, 3)  # the first commit starts it again
    assert checkpointer.alive and checkpointer.restarts == 1
    assert _events(caplog, "store.checkpointer_restarted") == 1
    assert _restarts_counted() == counted + 1
    restarted = time.time()
    _until(lambda: checkpointer.pending_seconds() is None)
    last = checkpointer.last_completed_at
    assert last is not None and last >= restarted
    assert _in_database_file(sqlite_store, tmp_path) == {1, 2, 3}  # copied from the WAL by the new thread
    assert checkpointer.problem(max_age_seconds=1) is None
    health = checkpointer.health()
    assert health["running"] is True and health["restarts"] == 1 and health["last_error"] is None


def test_restarts_are_bounded_and_a_checkpointer_left_stopped_is_a_problem_until_the_window_passes(
    sqlite_store: Store, writer: StoreWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hms_ach.store.db")
    checkpointer = _checkpointer(sqlite_store)
    checkpointer.max_restarts = 1
    checkpointer.restart_window = 1.5
    _insert(writer, 1)
    _until(lambda: checkpointer.pending_seconds() is None)

    kill_checkpointer(checkpointer)
    _insert(writer, 2)  # restarted: the one restart the window allows
    assert checkpointer.alive and checkpointer.restarts == 1
    _until(lambda: checkpointer.pending_seconds() is None)

    kill_checkpointer(checkpointer)
    _insert(writer, 3, 4, 5)  # refused: it died again within the window
    assert not checkpointer.alive and checkpointer.restarts == 1
    assert _events(caplog, "store.checkpointer_restart_refused") == 1  # once, not once per commit
    why = checkpointer.problem(max_age_seconds=300)
    assert why is not None and "not restarted again" in why, why
    assert checkpointer.health()["running"] is False
    time.sleep(0.5)
    assert _in_database_file(sqlite_store, tmp_path) == {1, 2}  # 3, 4 and 5 wait in the WAL

    time.sleep(checkpointer.restart_window)  # the window passes: the readiness check starts it again
    assert checkpointer.problem(max_age_seconds=300) is None
    assert checkpointer.alive and checkpointer.restarts == 2
    _until(lambda: checkpointer.pending_seconds() is None)
    assert _in_database_file(sqlite_store, tmp_path) == {1, 2, 3, 4, 5}


def test_a_reader_holding_an_old_snapshot_is_a_problem_past_the_bound_and_not_after(
    sqlite_store: Store, writer: StoreWriter, tmp_path: Path
) -> None:
    checkpointer = _checkpointer(sqlite_store)
    _insert(writer, 1)
    _until(lambda: checkpointer.pending_seconds() is None)
    path = sqlite_store.writer.url.database
    assert path is not None
    reader = sqlite3.connect(path, isolation_level=None)  # a report or a backup, in another process
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM probe").fetchone() == (1,)  # its snapshot
        _insert(writer, 2, 3)
        assert checkpointer.problem(max_age_seconds=0.5) is None  # not yet past the bound
        time.sleep(0.8)
        assert checkpointer.pending_seconds() is not None
        why = checkpointer.problem(max_age_seconds=0.5)
        assert why is not None and "no WAL checkpoint completed" in why, why
        assert checkpointer.alive  # alive: a restart would not help
        assert checkpointer.problem(max_age_seconds=0) is None  # 0: no bound
        assert _in_database_file(sqlite_store, tmp_path) == {1}
    finally:
        reader.execute("COMMIT")
        reader.close()
    # no commit needed: the thread tries again every interval until a checkpoint completes
    _until(lambda: checkpointer.pending_seconds() is None, within=3)
    assert checkpointer.problem(max_age_seconds=0.5) is None
    assert _in_database_file(sqlite_store, tmp_path) == {1, 2, 3}


def test_a_stopped_checkpointer_is_not_restarted_and_is_no_problem(
    sqlite_store: Store, writer: StoreWriter
) -> None:
    checkpointer = _checkpointer(sqlite_store)
    writer.stop()
    assert not checkpointer.alive
    checkpointer.committed()  # a commit of another connection after the stop
    assert not checkpointer.alive and checkpointer.restarts == 0
    assert checkpointer.problem(max_age_seconds=300) is None
    assert not any(t.name == "hms-ach-checkpoint" and t.is_alive() for t in threading.enumerate())


def test_one_checkpointer_per_store(sqlite_store: Store, writer: StoreWriter) -> None:
    assert sqlite_store.checkpointer() is sqlite_store.checkpointer()
    assert writer._checkpointer is sqlite_store.checkpointer()
    assert Store("sqlite:///:memory:").checkpointer() is None


def test_under_a_steady_stream_of_commits_the_wal_starts_over_and_stays_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer commits back to back, as figure B's senders make it. A PASSIVE checkpoint alone
    never let the WAL start over then (the next commit always came before the round was done), so
    it grew by every byte committed: 7 GB in two minutes of figure B. With the writer's own
    checkpoint before a transaction when a round found the WAL long, it starts over and the file
    is cut back to the limit. The limit is made small here, so that 2,000 commits of ~16 KB (about
    32 MB of WAL) start it over many times; every row is still there. The rounds come every 20 ms
    instead of 250: how far the WAL grows between two rounds is the commit rate times the interval,
    and a fast machine commits those 32 MB in about a second (the bound below then failed there in
    five runs of six)."""
    monkeypatch.setattr(db, "WAL_RESTART_BYTES", 256 * 1024)
    restarts_before = REGISTRY.get_sample_value("hms_ach_wal_restarts_total") or 0.0
    store = Store(f"sqlite:///{tmp_path}/steady.db")
    made = store.checkpointer()
    assert made is not None
    made.interval = 0.02
    writer = StoreWriter(store)
    try:
        writer.run_sync(lambda tx: tx.execute(text("CREATE TABLE blob (n INTEGER, b BLOB)")))
        checkpointer = _checkpointer(store)
        largest = 0
        for n in range(2000):
            writer.run_sync(partial(_insert_blob, n=n))
            if n % 50 == 0:
                largest = max(largest, checkpointer.wal_bytes())
        largest = max(largest, checkpointer.wal_bytes())
        assert largest < 12 * 1024 * 1024, f"the WAL grew to {largest} bytes"
        assert checkpointer.wal_restarts >= 3
        assert (REGISTRY.get_sample_value("hms_ach_wal_restarts_total") or 0.0) > restarts_before
        count = writer.run_sync(lambda tx: tx.execute(text("SELECT count(*) FROM blob")).scalar_one())
        assert count == 2000
    finally:
        writer.stop()
        store.dispose()


def _insert_blob(tx: Connection, n: int) -> None:
    tx.execute(text("INSERT INTO blob (n, b) VALUES (:n, randomblob(16000))"), {"n": n})
