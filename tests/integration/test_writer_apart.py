"""The writer's second connection (issue 13): on PostgreSQL a job submitted with ``apart=True`` (a
transaction Bundle) commits on a connection of its own, so the writer thread's jobs (an MLLP feed)
are committed meanwhile; it is still one transaction, all or nothing. SQLite has one write lock,
so there ``apart`` is ignored and the job runs on the writer thread."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from hms_ach.store import outbox
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter

HOLD_SECONDS = 1.0


def _slow_apart_job(tx: Tx) -> str:
    outbox.enqueue(tx, "test.apart", {"n": 1})  # written early: its lock is held to the commit
    tx.execute(text("SELECT 1"))
    time.sleep(HOLD_SECONDS)
    return "heavy"


def _long_job(tx: Tx) -> str:
    time.sleep(HOLD_SECONDS)
    return "heavy"


def _light_job(tx: Tx) -> str:
    tx.execute(text("SELECT 1"))
    return "light"


async def test_a_light_job_commits_while_an_apart_job_runs(store: Store) -> None:
    writer = StoreWriter(store)
    try:
        assert writer.apart is (store.dialect == "postgresql")
        heavy = asyncio.ensure_future(writer.run(_long_job, heavy=True, apart=True, lane="bundle"))
        await asyncio.sleep(0.2)  # the heavy job is running
        started = time.monotonic()
        assert await writer.run(_light_job, lane="feed") == "light"
        waited = time.monotonic() - started
        assert await heavy == "heavy"
    finally:
        writer.stop()
    if writer.apart:
        assert waited < HOLD_SECONDS / 2, f"the light job waited {waited:.2f} s for the heavy one"
    else:  # one write lock: the light job waits for the heavy one
        assert waited >= HOLD_SECONDS / 2


async def test_an_apart_job_that_fails_leaves_nothing_and_the_next_one_runs(store: Store) -> None:
    writer = StoreWriter(store)

    def failing(tx: Tx) -> None:
        outbox.enqueue(tx, "test.apart", {"n": 1})
        raise ValueError("refused half-way")

    try:
        with pytest.raises(ValueError, match="half-way"):
            await writer.run(failing, heavy=True, apart=True)
        assert await writer.run(_light_job, heavy=True, apart=True) == "light"
        with store.read() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM outbox_event")).scalar_one() == 0
    finally:
        writer.stop()


@pytest.mark.timeout(30)
async def test_outbox_events_are_committed_in_the_order_of_their_ids(store: Store) -> None:
    """An event written apart holds the event lock to its commit: an event of the writer thread
    written meanwhile gets a higher id and commits after it, so a sink's cursor (the last id it
    fanned out) never passes an event that is not committed yet."""
    if store.dialect != "postgresql":
        pytest.skip("one write lock on SQLite: transactions never overlap")
    writer = StoreWriter(store)

    def light_event(tx: Tx) -> int:
        return outbox.enqueue(tx, "test.light", {"n": 2})

    try:
        heavy = asyncio.ensure_future(writer.run(_slow_apart_job, heavy=True, apart=True))
        await asyncio.sleep(0.3)  # the heavy job has written its event and holds the lock
        light = asyncio.ensure_future(writer.run(light_event))
        await asyncio.sleep(0.2)
        with store.read() as conn:  # the light event waits for the lock; nothing is visible yet
            assert conn.execute(text("SELECT COUNT(*) FROM outbox_event")).scalar_one() == 0
        await heavy
        light_id = await light
        with store.read() as conn:
            ids = [tuple(r) for r in conn.execute(text("SELECT id, event FROM outbox_event ORDER BY id"))]
    finally:
        writer.stop()
    assert [e for _id, e in ids] == ["test.apart", "test.light"]
    assert ids[1][0] == light_id
