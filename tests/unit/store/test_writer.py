"""The group-commit writer keeps running when a caller stops waiting for its job."""

from __future__ import annotations

import asyncio
import threading

from sqlalchemy import Connection, text

from hms_ach.store.db import Store
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
