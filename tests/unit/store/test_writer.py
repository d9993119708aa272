"""The group-commit writer keeps running when a caller stops waiting for its job."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, text

from hms_ach.core.records import MappingResult, RecordWrite, StoreAction
from hms_ach.ingest.pipeline import write_records
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter


def test_a_cancelled_caller_does_not_stop_the_writer(store: Store) -> None:
    writer = StoreWriter(store)
    gate = threading.Event()

    def slow(conn: Connection) -> int:
        gate.wait(5)
        return int(conn.execute(text("SELECT 1")).scalar_one())

    async def scenario() -> int:
        task = asyncio.ensure_future(writer.run(slow))
        await asyncio.sleep(0.05)
        task.cancel()  # the sender hung up before the commit
        gate.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # the writer thread must still be alive to take the next job
        return await asyncio.wait_for(writer.run(lambda c: int(c.execute(text("SELECT 2")).scalar_one())), 5)

    try:
        assert asyncio.run(scenario()) == 2
    finally:
        writer.stop()


def test_a_failing_job_fails_alone(store: Store) -> None:
    writer = StoreWriter(store)
    try:

        def boom(conn: Connection) -> None:
            raise ValueError("bad job")

        try:
            writer.run_sync(boom)
        except ValueError as exc:
            assert str(exc) == "bad job"
        else:  # pragma: no cover
            raise AssertionError("the job's error was not reported")
        assert writer.run_sync(lambda c: int(c.execute(text("SELECT 3")).scalar_one())) == 3
    finally:
        writer.stop()


def test_a_failing_job_in_a_batch_is_undone_alone(store: Store) -> None:
    """A batch runs without a SAVEPOINT per job; when one job raises, the batch runs again with one
    per job: the failed job's writes are undone, the others' committed, each caller told its own."""
    writer = StoreWriter(store)
    gate = threading.Event()
    with store.transaction() as tx:
        tx.execute(text("CREATE TABLE batch_probe (n INTEGER)"))

    def hold(conn: Connection) -> None:
        gate.wait(5)  # the next jobs queue meanwhile and form one batch

    def insert(n: int, fail: bool = False) -> Callable[[Connection], int]:
        def job(conn: Connection) -> int:
            conn.execute(text("INSERT INTO batch_probe (n) VALUES (:n)"), {"n": n})
            if fail:
                raise ValueError(f"job {n} failed")
            return n

        return job

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(writer.run(hold))
        await asyncio.sleep(0.05)
        jobs = [writer.run(insert(1)), writer.run(insert(2, fail=True)), writer.run(insert(3))]
        batch = asyncio.gather(*jobs, return_exceptions=True)
        await asyncio.sleep(0.05)
        gate.set()
        await first
        return await batch

    try:
        one, two, three = asyncio.run(scenario())
        assert (one, three) == (1, 3)
        assert isinstance(two, ValueError) and str(two) == "job 2 failed"
        assert writer.replays == 1
        with store.read() as conn:
            assert [r[0] for r in conn.execute(text("SELECT n FROM batch_probe ORDER BY n"))] == [1, 3]
    finally:
        writer.stop()


def test_wal_checkpoints_run_off_the_commit_path(store: Store) -> None:
    """SQLite in a file: the writer's connections have the automatic checkpoint off, and the
    checkpointer thread copies the WAL back after commits; stopping the writer stops it."""
    if store.dialect != "sqlite":
        pytest.skip("SQLite's WAL")
    writer = StoreWriter(store)
    try:
        auto = writer.run_sync(lambda c: int(c.execute(text("PRAGMA wal_autocheckpoint")).scalar_one()))
        assert auto == 0
        checkpointer = writer._checkpointer
        assert checkpointer is not None
        deadline = time.monotonic() + 5
        while checkpointer.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.runs >= 1
    finally:
        writer.stop()
    assert checkpointer._thread is None
    with store.writer.connect() as conn:  # a new connection: the default again
        assert int(conn.execute(text("PRAGMA wal_autocheckpoint")).scalar_one()) == 1000
    assert store.close() is True


def test_records_that_fail_while_written_are_undone_alone(store: Store) -> None:
    """In the writer's batches the records of a message are written without their SAVEPOINT; when
    they fail half-way, the job runs again with it: the records are undone, the error returned to
    the job, the job's other writes committed, alone and in a batch with another job."""
    with store.transaction() as tx:
        tx.execute(text("CREATE TABLE batch_probe (n INTEGER)"))

    def records(key: str, action: str | None) -> MappingResult:
        patient = {"resourceType": "Patient", "name": [{"family": "Rivera"}]}
        rec = RecordWrite("p", "Patient", "urn:test:mrn", key, patient)
        return MappingResult("probe", [rec], [StoreAction(action)] if action else [])

    def job(n: int, action: str | None) -> Callable[[Connection], str | None]:
        def run(conn: Connection) -> str | None:
            conn.execute(text("INSERT INTO batch_probe (n) VALUES (:n)"), {"n": n})
            # no message row: the records are written for none (history rows allow that)
            _writes, error = write_records(conn, records(str(n), action), None)  # type: ignore[arg-type]
            return None if error is None else type(error).__name__

        return run

    writer = StoreWriter(store)
    gate = threading.Event()

    async def scenario() -> list[str | None]:
        first = asyncio.ensure_future(writer.run(lambda conn: gate.wait(5)))
        await asyncio.sleep(0.05)
        batch = asyncio.gather(writer.run(job(2, None)), writer.run(job(3, "no_such_action")))
        await asyncio.sleep(0.05)
        gate.set()
        await first
        return list(await batch)

    try:
        assert writer.run_sync(job(1, "no_such_action")) == "ContentError"  # a batch of one
        assert writer.replays == 1
        assert asyncio.run(scenario()) == [None, "ContentError"]
        assert writer.replays == 2
    finally:
        writer.stop()
    with store.read() as conn:
        assert [r[0] for r in conn.execute(text("SELECT n FROM batch_probe ORDER BY n"))] == [1, 2, 3]
        assert Repository(conn).find_by_key("Patient", "urn:test:mrn", "2") is not None
        for undone in ("1", "3"):
            assert Repository(conn).find_by_key("Patient", "urn:test:mrn", undone) is None
