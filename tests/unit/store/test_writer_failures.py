"""The group-commit writer survives failures of the store: a commit or a rollback that fails, a
thread that exits, a caller's deadline; each caller gets an error, never a hang. Real SQLite (and
PostgreSQL when configured)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from hms_ach.store.db import Store
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.writer import StoreWriter


def _tables(store: Store) -> None:
    """A child whose foreign key is checked at COMMIT: a commit that fails on both databases."""
    with store.transaction() as conn:
        conn.execute(text("CREATE TABLE wf_parent (id INTEGER PRIMARY KEY)"))
        conn.execute(
            text(
                "CREATE TABLE wf_child (id INTEGER PRIMARY KEY, "
                "pid INTEGER REFERENCES wf_parent(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )


def test_a_failing_commit_fails_its_caller_and_the_writer_goes_on(store: Store) -> None:
    _tables(store)
    writer = StoreWriter(store, commit_timeout=10)
    try:

        def orphan(conn: Connection) -> None:
            conn.execute(text("INSERT INTO wf_child (id, pid) VALUES (1, 99)"))

        with pytest.raises(StoreUnavailable, match="commit"):
            writer.run_sync(orphan)
        assert writer.alive and writer.health.consecutive_failures == 1
        assert writer.health.last_error is not None and writer.health.last_error.startswith("commit: ")
        assert "99" not in writer.health.last_error  # no values in the health document
        assert writer.run_sync(lambda c: int(c.execute(text("SELECT 7")).scalar_one())) == 7
        assert writer.health.consecutive_failures == 0 and writer.health.last_commit_at is not None
        with store.read() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM wf_child")).scalar_one() == 0
    finally:
        writer.stop()


def test_a_failing_rollback_does_not_kill_the_writer(store: Store) -> None:
    writer = StoreWriter(store, commit_timeout=10)
    try:

        def breaks_the_connection(conn: Connection) -> None:
            conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
            raise ValueError("the job fails after its connection broke")

        with pytest.raises(StoreUnavailable):
            writer.run_sync(breaks_the_connection)
        assert writer.alive
        assert writer.run_sync(lambda c: int(c.execute(text("SELECT 8")).scalar_one())) == 8
    finally:
        writer.stop()


def test_a_thread_that_exits_is_started_again(store: Store) -> None:
    writer = StoreWriter(store, commit_timeout=10)
    try:

        def exits(conn: Connection) -> None:
            raise SystemExit(3)

        with pytest.raises(StoreUnavailable):
            writer.run_sync(exits)
        deadline = time.monotonic() + 5
        while writer.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not writer.alive
        assert writer.run_sync(lambda c: int(c.execute(text("SELECT 9")).scalar_one())) == 9
        assert writer.health.restarts == 1 and writer.alive
    finally:
        writer.stop()


def test_every_wait_has_a_deadline_and_a_queued_job_past_it_never_runs(store: Store) -> None:
    writer = StoreWriter(store, commit_timeout=0.3)
    gate = threading.Event()
    ran: list[str] = []

    def slow(conn: Connection) -> str:
        gate.wait(5)
        ran.append("slow")
        return "slow"

    def queued(conn: Connection) -> str:
        ran.append("queued")
        return "queued"

    try:
        started = time.monotonic()
        first = threading.Thread(target=lambda: pytest.raises(StoreUnavailable, writer.run_sync, slow))
        first.start()
        time.sleep(0.05)  # slow is running now
        with pytest.raises(StoreUnavailable, match="no commit within"):
            writer.run_sync(queued)
        assert time.monotonic() - started < 2
        first.join(5)
        gate.set()
        assert writer.run_sync(lambda c: "next", timeout=5) == "next"
        assert ran == ["slow"]  # the running job committed late; the queued one was dropped
    finally:
        gate.set()
        writer.stop()


def test_a_program_limit_is_the_jobs_error_not_an_outage(store: Store) -> None:
    """PostgreSQL's SQLSTATE 54000 (an index row over the btree limit) is raised to the job's caller
    as its own error, so the pipeline stores that message as an error (AE), and the writer counts
    no outage."""
    if store.dialect != "postgresql":
        pytest.skip("SQLSTATE class 54 (program limit exceeded) is PostgreSQL's")
    with store.transaction() as conn:
        conn.execute(text("CREATE TABLE wf_limit (v TEXT PRIMARY KEY)"))
    writer = StoreWriter(store, commit_timeout=10)
    try:

        def too_wide(conn: Connection) -> None:  # 8 kB of random hex: not compressible below 2.7 kB
            conn.execute(text("INSERT INTO wf_limit (v) VALUES (:v)"), {"v": os.urandom(4000).hex()})

        with pytest.raises(OperationalError) as caught:
            writer.run_sync(too_wide)
        assert not isinstance(caught.value, StoreUnavailable)
        assert getattr(caught.value.orig, "sqlstate", "") == "54000"
        assert writer.alive and writer.health.consecutive_failures == 0
        assert writer.run_sync(lambda c: int(c.execute(text("SELECT 7")).scalar_one())) == 7
    finally:
        writer.stop()
