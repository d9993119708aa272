"""The transactional outbox on SQLite and PostgreSQL: atomic with the change, leases, redelivery, dead letters."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, select, update

from hms_ach.outbound import outbox
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings
from hms_ach.store import outbox as outbox_rows
from hms_ach.store.db import Store
from hms_ach.store.models import OutboxCursor, OutboxEvent


def _events(conn: Connection) -> list[dict[str, Any]]:
    """Every outbox event, oldest first (id, event, payload)."""
    t = OutboxEvent.__table__  # type: ignore[attr-defined]
    rows = conn.execute(select(t).order_by(t.c.id)).all()
    return [{"id": r.id, "event": r.event, "payload": orjson.loads(r.payload)} for r in rows]


def _sink(name: str = "s", **kw: Any) -> SinkSettings:
    return SinkSettings(
        name=name, type="test", from_beginning=True, retry_initial_seconds=0.01, retry_max_seconds=0.05, **kw
    )


class FakeSink:
    def __init__(self, settings: SinkSettings, fail: int = 0):
        self.settings = settings
        self.fail = fail
        self.seen: list[int] = []

    async def deliver(self, d: Delivery) -> DeliveryResult:
        if self.fail > 0:
            self.fail -= 1
            raise DeliveryError("HTTP 503", retry_after=0)
        self.seen.append(d.event_id)
        return DeliveryResult("ok")

    async def close(self) -> None:
        return None


def test_an_event_is_written_only_if_its_transaction_commits(store: Store) -> None:
    with store.writer.begin() as conn:
        outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/1"})
    with pytest.raises(RuntimeError), store.writer.begin() as conn:
        outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/2"})
        raise RuntimeError("the change failed")
    with store.reader.connect() as conn:
        events = _events(conn)
    assert [e["payload"]["resource"] for e in events] == ["Encounter/1"]
    assert events[0]["payload"]["version"] == 1


def test_one_lease_per_sink_and_a_dead_instance_is_taken_over_with_redelivery(store: Store) -> None:
    sink = _sink()
    with store.writer.begin() as conn:
        outbox_rows.enqueue(conn, "bed.status_changed", {"resource": "Location/1"})
    with store.writer.begin() as conn:
        assert outbox.take_lease(conn, sink, "a", 30)
    with store.writer.begin() as conn:
        assert not outbox.take_lease(conn, sink, "b", 30)  # a holds it
        rows = outbox.pending_rows(conn, "s")
    assert len(rows) == 1  # a "crashes" here: it delivered nothing it confirmed
    cursors = OutboxCursor.__table__  # type: ignore[attr-defined]
    with store.writer.begin() as conn:  # a's lease runs out
        conn.execute(update(cursors).values(lease_until=outbox_rows.now() - timedelta(seconds=1)))
    with store.writer.begin() as conn:
        assert outbox.take_lease(conn, sink, "b", 30)
        again = outbox.pending_rows(conn, "s")
    assert [r.row_id for r in again if isinstance(r, Delivery)] == [
        r.row_id for r in rows if isinstance(r, Delivery)
    ]


def test_fan_out_follows_each_sinks_filter(store: Store) -> None:
    with store.writer.begin() as conn:
        for name in ("encounter.admitted", "bed.status_changed", "claim.created"):
            outbox_rows.enqueue(conn, name, {})
        outbox.take_lease(conn, _sink("dash", events=["encounter.*", "bed.*"]), "x", 30)
        outbox.take_lease(conn, _sink("fin", events=["claim.*"]), "x", 30)
        dash = [d.event for d in outbox.pending_rows(conn, "dash") if isinstance(d, Delivery)]
        fin = [d.event for d in outbox.pending_rows(conn, "fin") if isinstance(d, Delivery)]
    assert dash == ["encounter.admitted", "bed.status_changed"] and fin == ["claim.created"]


async def test_dispatcher_retries_in_order_then_delivers_everything(store: Store) -> None:
    with store.writer.begin() as conn:
        for i in range(5):
            outbox_rows.enqueue(conn, "shift.updated", {"resource": f"Shift/{i}"})
    sink = FakeSink(_sink(), fail=3)
    dispatcher = outbox.Dispatcher(store, [sink], poll_seconds=0.02)
    await dispatcher.start()
    try:
        deadline = time.monotonic() + 20  # generous for a loaded CI machine; done in well under 1 s here
        while len(sink.seen) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await dispatcher.stop()
    assert sink.seen == sorted(sink.seen) and len(sink.seen) == 5
    with store.reader.connect() as conn:
        assert outbox_rows.summary(conn) == [{"destination": "s", "status": "delivered", "count": 5}]
        first = outbox_rows.list_rows(conn, "delivered")[-1]
    assert first["attempts"] == 4


async def test_two_instances_share_the_work_without_duplicates(store: Store) -> None:
    with store.writer.begin() as conn:
        for i in range(20):
            outbox_rows.enqueue(conn, "timecard.recorded", {"resource": f"Timecard/{i}"})
    sinks = [FakeSink(_sink(name)) for name in ("one", "two", "three")]
    twins = [FakeSink(_sink(name)) for name in ("one", "two", "three")]
    a = outbox.Dispatcher(store, sinks, poll_seconds=0.02, owner="a")
    b = outbox.Dispatcher(store, twins, poll_seconds=0.02, owner="b")
    await a.start()
    await b.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
            len(x.seen) + len(y.seen) >= 20 for x, y in zip(sinks, twins, strict=True)
        ):
            await asyncio.sleep(0.02)
    finally:
        await a.stop()
        await b.stop()
    for x, y in zip(sinks, twins, strict=True):
        assert sorted(x.seen + y.seen) == sorted(set(x.seen + y.seen)) and len(x.seen + y.seen) == 20


def test_dead_letter_after_max_age_and_retry(store: Store) -> None:
    sink = _sink(max_age_hours=0.000001)
    with store.writer.begin() as conn:
        outbox_rows.enqueue(conn, "claim.created", {})
        outbox.take_lease(conn, sink, "a", 30)
        row = next(r for r in outbox.pending_rows(conn, "s") if isinstance(r, Delivery))
        assert outbox.mark_failed(conn, row.row_id, sink, DeliveryError("timeout")) == "dead"
        assert outbox_rows.retry(conn, dead=True) == 1
        assert outbox_rows.summary(conn) == [{"destination": "s", "status": "pending", "count": 1}]


def test_backoff_grows_and_is_capped() -> None:
    for attempts in range(1, 30):
        assert 0 < outbox.backoff_seconds(attempts, 1.0, 60.0) <= 60.0
    assert max(outbox.backoff_seconds(1, 1.0, 60.0) for _ in range(50)) <= 1.0


def test_a_sinks_cursor_never_passes_an_event_that_commits_after_a_higher_one(store: Store) -> None:
    """PostgreSQL: two transactions write events at once and no lock orders their commits. The
    one with the lower id commits last; the fan-out must not move the cursor past it meanwhile."""
    if store.writer.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: ids commit in their order")
    sink = _sink()
    slow = store.writer.connect()
    slow_tx = slow.begin()
    try:
        low = outbox_rows.enqueue(slow, "encounter.admitted", {"resource": "Encounter/1"})
        with store.writer.begin() as conn:
            high = outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/2"})
        assert low < high
        with store.writer.begin() as conn:  # the lower id is still running: nothing is settled
            assert outbox_rows.settled_event_id(conn, wait_seconds=0.05) is None
            assert outbox.take_lease(conn, sink, "a", 30)
            assert outbox.pending_rows(conn, "s") == []
        slow_tx.commit()
    finally:
        slow.close()
    with store.writer.begin() as conn:
        assert outbox_rows.settled_event_id(conn) == high
        assert outbox.take_lease(conn, sink, "a", 30)
        rows = [r for r in outbox.pending_rows(conn, "s") if isinstance(r, Delivery)]
    assert [r.event_id for r in rows] == [low, high]


def test_a_rolled_back_event_does_not_hold_the_fan_out(store: Store) -> None:
    if store.writer.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: see the test above")
    sink = _sink()
    slow = store.writer.connect()
    slow_tx = slow.begin()
    try:
        outbox_rows.enqueue(slow, "encounter.admitted", {"resource": "Encounter/1"})
        with store.writer.begin() as conn:
            high = outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/2"})
        slow_tx.rollback()
    finally:
        slow.close()
    with store.writer.begin() as conn:
        assert outbox.take_lease(conn, sink, "a", 30)
        rows = [r for r in outbox.pending_rows(conn, "s") if isinstance(r, Delivery)]
    assert [r.event_id for r in rows] == [high]


def test_a_long_transaction_that_writes_no_event_does_not_hold_the_fan_out(store: Store) -> None:
    if store.writer.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: see the tests above")
    sink = _sink()
    cursors = OutboxCursor.__table__  # type: ignore[attr-defined]
    long = store.writer.connect()
    long_tx = long.begin()
    try:  # a write (it has a transaction id), but no event
        long.execute(cursors.insert().values(destination="other", last_event_id=0))
        with store.writer.begin() as conn:
            event = outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/1"})
        with store.writer.begin() as conn:
            assert outbox_rows.settled_event_id(conn, wait_seconds=0.05) == event
            assert outbox.take_lease(conn, sink, "a", 30)
            rows = [r for r in outbox.pending_rows(conn, "s") if isinstance(r, Delivery)]
        assert [r.event_id for r in rows] == [event]
    finally:
        long_tx.rollback()
        long.close()
