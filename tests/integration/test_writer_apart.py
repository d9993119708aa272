"""The writer's second connection (issue 13): on PostgreSQL a job submitted with ``apart=True`` (a
transaction Bundle) commits on a connection of its own, so the writer thread's jobs (an MLLP feed)
are committed meanwhile; it is still one transaction, all or nothing. SQLite has one write lock,
so there ``apart`` is ignored and the job runs on the writer thread."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from hms_ach.outbound import outbox as dispatch
from hms_ach.outbound.sinks import Delivery, SinkSettings
from hms_ach.store import outbox
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter

HOLD_SECONDS = 1.0


def _slow_apart_job(tx: Tx) -> str:
    outbox.enqueue(tx, "test.apart", {"n": 1})  # written early: a lower id, committed late
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
async def test_a_sink_never_passes_an_apart_event_that_commits_after_a_later_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event written apart takes a lower id and commits after an event of the writer thread
    (no lock orders them). A fan-out meanwhile does not move the sink's cursor past the apart
    event; once it commits, the sink gets both, in id order."""
    if store.dialect != "postgresql":
        pytest.skip("one write lock on SQLite: transactions never overlap")
    writer = StoreWriter(store)
    sink = SinkSettings(name="s", type="test", from_beginning=True)
    monkeypatch.setattr(outbox, "SETTLE_WAIT_SECONDS", 0.05)  # a fan-out gives up before the commit

    def light_event(tx: Tx) -> int:
        return outbox.enqueue(tx, "test.light", {"n": 2})

    def fan_out(tx: Tx) -> list[int]:
        assert dispatch.take_lease(tx, sink, "a", 30)
        return [r.event_id for r in dispatch.pending_rows(tx, "s") if isinstance(r, Delivery)]

    try:
        heavy = asyncio.ensure_future(writer.run(_slow_apart_job, heavy=True, apart=True))
        await asyncio.sleep(0.3)  # the heavy job has written its event and runs on
        light_id = await writer.run(light_event)  # commits at once: nothing holds it
        assert heavy.done() is False
        assert await writer.run(fan_out) == []  # the lower id is still running
        await heavy
        delivered = await writer.run(fan_out)
        with store.read() as conn:
            ids = [tuple(r) for r in conn.execute(text("SELECT id, event FROM outbox_event ORDER BY id"))]
    finally:
        writer.stop()
    assert [e for _id, e in ids] == ["test.apart", "test.light"]
    assert ids[1][0] == light_id
    assert delivered == [i for i, _e in ids]
