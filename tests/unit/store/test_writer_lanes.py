"""Fairness in the group-commit writer: batches are formed round-robin over lanes, and a heavy job
(a slice of a Bundle) is committed alone, alternating with batches of light jobs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Connection, text

from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter, _Job, _Lanes


def _job(lane: str, name: str, heavy: bool = False) -> _Job:
    fut: Future[Any] = Future()
    job = _Job(lambda _tx: name, fut, lane, heavy)
    job.work.__name__ = name
    return job


def _names(batch: list[_Job]) -> list[str]:
    return [job.work.__name__ for job in batch]


def test_one_lanes_backlog_cannot_fill_a_batch() -> None:
    lanes = _Lanes()
    for i in range(5):
        lanes.add(_job("bulk", f"b{i}"))
    lanes.add(_job("adt_in", "a0"))
    lanes.add(_job("lab_in", "l0"))
    assert _names(lanes.batch(3)) == ["b0", "a0", "l0"]
    assert _names(lanes.batch(3)) == ["b1", "b2", "b3"]


def test_the_lane_served_last_goes_to_the_back() -> None:
    lanes = _Lanes()
    for lane in ("x", "y", "z"):
        for i in range(2):
            lanes.add(_job(lane, f"{lane}{i}"))
    assert _names(lanes.batch(2)) == ["x0", "y0"]
    assert _names(lanes.batch(2)) == ["z0", "x1"]
    assert _names(lanes.batch(2)) == ["y1", "z1"]
    assert not lanes


def test_heavy_jobs_run_alone_and_alternate_with_light_batches() -> None:
    lanes = _Lanes()
    for i in range(3):
        lanes.add(_job("bundle-1", f"h{i}", heavy=True))
    lanes.add(_job("bundle-2", "g0", heavy=True))
    lanes.add(_job("adt_in", "a0"))
    assert _names(lanes.batch(10)) == ["h0"]
    assert _names(lanes.batch(10)) == ["a0"]
    lanes.add(_job("adt_in", "a1"))
    assert _names(lanes.batch(10)) == ["g0"]  # the other Bundle's turn: lanes rotate for heavy jobs too
    assert _names(lanes.batch(10)) == ["a1"]
    assert _names(lanes.batch(10)) == ["h1"]
    assert _names(lanes.batch(10)) == ["h2"]  # nothing light waits: heavy jobs follow each other
    assert not lanes


def test_a_job_whose_caller_gave_up_is_dropped() -> None:
    lanes = _Lanes()
    gone = _job("adt_in", "gone")
    gone.fut.cancel()
    lanes.add(gone)
    lanes.add(_job("adt_in", "kept"))
    assert _names(lanes.batch(10)) == ["kept"]


def test_a_light_job_waits_for_one_heavy_job_not_for_a_backlog(store: Store) -> None:
    """With twenty heavy jobs queued before it, a light job is committed after the first of them."""
    writer = StoreWriter(store)
    gate = threading.Event()
    order: list[str] = []

    def heavy(name: str) -> Any:
        def work(conn: Connection) -> None:
            gate.wait(5)
            order.append(name)
            conn.execute(text("SELECT 1"))

        return work

    def light(conn: Connection) -> int:
        order.append("light")
        return int(conn.execute(text("SELECT 2")).scalar_one())

    async def scenario() -> int:
        heavies = [
            asyncio.ensure_future(writer.run(heavy(f"h{i}"), lane="bundle", heavy=True)) for i in range(20)
        ]
        await asyncio.sleep(0.1)  # the first heavy job is running, the rest are queued
        answer = asyncio.ensure_future(writer.run(light, lane="adt_in"))
        await asyncio.sleep(0.05)
        gate.set()
        value = await asyncio.wait_for(answer, 10)
        await asyncio.wait_for(asyncio.gather(*heavies), 10)
        return value

    try:
        assert asyncio.run(scenario()) == 2
    finally:
        writer.stop()
    assert order.index("light") <= 2, order  # after h0 (and at most h1, taken before it arrived)
    assert [n for n in order if n != "light"] == [f"h{i}" for i in range(20)]  # one lane stays in order
