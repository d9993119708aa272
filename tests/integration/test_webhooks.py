"""Webhook sink against a real local HTTP receiver that verifies every HMAC signature."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.outbound_helpers import SECRET, Receiver, make_engine, send_mllp, wait_for


def _sink(url: str, events: str = '["encounter.*", "bed.*"]') -> str:
    return (
        f"  - name: dashboard\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        f"    events: {events}\n    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.3\n"
        "    timeout_seconds: 2\n"
    )


async def test_admission_bed_and_discharge_events_arrive_once_each_signed(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    url = await receiver.start()
    engine = make_engine(tmp_path, store.url, _sink(url))
    await engine.start()
    try:
        port = mllp_channel(engine).port
        assert await send_mllp(port, ["adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7"]) == ["AA", "AA", "AA"]
        await wait_for(lambda: "encounter.discharged" in receiver.names())
        await asyncio.sleep(0.5)  # nothing more may come
    finally:
        await engine.stop()
        await receiver.stop()
    names = receiver.names()
    assert receiver.bad_signatures == 0
    assert names.count("encounter.admitted") == 1
    assert names.count("encounter.transferred") == 1
    assert names.count("encounter.discharged") == 1
    assert (
        names.index("encounter.admitted")
        < names.index("encounter.transferred")
        < names.index("encounter.discharged")
    )
    assert "bed.status_changed" in names
    assert receiver.requests == len(names)  # each delivered exactly once
    admitted = receiver.events[names.index("encounter.admitted")]
    assert admitted["version"] == 1 and admitted["data"]["version"] == 1
    assert admitted["data"]["resource"].startswith("Encounter/")
    assert admitted["data"]["patient"].startswith("Patient/")
    assert "Rivera" not in str(receiver.events)  # no PHI in payloads


async def test_a_503_receiver_loses_nothing_and_acks_keep_flowing(tmp_path: Path, store: Store) -> None:
    receiver = Receiver(fail_first=12)
    url = await receiver.start()
    engine = make_engine(tmp_path, store.url, _sink(url, '["encounter.*"]'))
    await engine.start()
    try:
        port = mllp_channel(engine).port
        codes = await asyncio.wait_for(send_mllp(port, ["adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7"]), 5)
        assert codes == ["AA", "AA", "AA"]  # inbound does not wait for the failing receiver
        await wait_for(lambda: len(receiver.events) == 3)
    finally:
        await engine.stop()
        await receiver.stop()
    assert receiver.requests > 12
    assert receiver.names() == ["encounter.admitted", "encounter.transferred", "encounter.discharged"]


async def test_301_is_a_failure_that_dead_letters_after_max_age_then_retry_works(
    tmp_path: Path, store: Store
) -> None:
    from hms_ach.store import outbox

    answers = {"code": 301}
    receiver = Receiver(status=lambda _n: answers["code"])
    url = await receiver.start()
    sink = _sink(url, '["encounter.admitted"]') + "    max_age_hours: 0.0003\n"  # about one second
    engine = make_engine(tmp_path, store.url, sink)
    await engine.start()
    try:
        assert await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7"]) == ["AA"]

        def dead() -> bool:
            with store.reader.connect() as conn:
                return any(r["status"] == "dead" for r in outbox.list_rows(conn))

        await wait_for(dead, 15)
        assert receiver.events == []
        with store.reader.connect() as conn:
            row = outbox.list_rows(conn, status="dead")[0]
        assert row["last_error"] == "HTTP 301" and row["attempts"] >= 2
        answers["code"] = 200
        with store.writer.begin() as conn:
            assert outbox.retry(conn, dead=True) == 1
        await wait_for(lambda: receiver.names() == ["encounter.admitted"])
    finally:
        await engine.stop()
        await receiver.stop()
