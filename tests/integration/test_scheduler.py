"""The scheduler (one per deployment), the credential-expiry scan and housekeeping, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from hms_ach.app.job_settings import JobsSettings
from hms_ach.app.scheduler import JobDef, Scheduler, build_jobs, trigger_for
from hms_ach.ingest.housekeeping import purge_messages
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.mapping.paths import CsvRecord
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.job_runs import last_runs
from hms_ach.store.models import CredentialAlert, OutboxEvent
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter
from hms_ach.workforce.credentials import scan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def _staff(p: Pipeline, employee: str, expires: date) -> None:
    row = {
        "employee_id": employee,
        "npi": "",
        "family_name": "Test",
        "given_name": employee,
        "license_number": f"LIC-{employee}",
        "license_type": "SL",
        "license_state": "OH",
        "license_expires": expires.isoformat(),
        "active": "Y",
    }
    result = p.engine.map_input("csv", "staff_roster", CsvRecord(row, 2, "t.csv", list(row)))
    p.writer.run_sync(lambda conn: Repository(conn).apply(result, None))


def _events(p: Pipeline) -> list[tuple[str, dict[str, Any]]]:
    t = OutboxEvent.__table__  # type: ignore[attr-defined]
    with p.writer.store.reader.connect() as conn:
        rows = conn.execute(select(t).where(t.c.event.like("credential.%")).order_by(t.c.id))
        return [(r.event, orjson.loads(r.payload)) for r in rows]


def test_credential_scan_alerts_once_per_credential_and_threshold(pipeline: Pipeline) -> None:
    today = date(2026, 11, 26)
    _staff(pipeline, "E1", today - timedelta(days=3))
    _staff(pipeline, "E2", today + timedelta(days=10))
    _staff(pipeline, "E3", today + timedelta(days=300))
    first = pipeline.writer.run_sync(lambda c: scan(c, 30, today))
    assert first == {"expiring": 1, "expired": 1, "already_alerted": 0}
    again = pipeline.writer.run_sync(lambda c: scan(c, 30, today + timedelta(days=1)))
    assert again == {"expiring": 0, "expired": 0, "already_alerted": 2}
    events = _events(pipeline)
    assert sorted(e for e, _ in events) == ["credential.expired", "credential.expiring"]
    expiring = next(p for e, p in events if e == "credential.expiring")
    assert expiring["credential"] == "LIC-E2" and expiring["days_left"] == 10
    # E2's licence lapses: a new threshold, so one new alert
    later = pipeline.writer.run_sync(lambda c: scan(c, 30, today + timedelta(days=11)))
    assert later["expired"] == 1 and len(_events(pipeline)) == 3
    with pipeline.writer.store.reader.connect() as conn:
        assert len(conn.execute(select(CredentialAlert.__table__)).all()) == 3  # type: ignore[attr-defined]


def test_housekeeping_keeps_errors_and_recent_messages(pipeline: Pipeline) -> None:
    def seed(conn: Any) -> None:
        for status in ("processed", "duplicate", "error"):
            mid = messages.insert_message(conn, messages.MessageMeta("c", b"x"), keyed=False)
            messages.finish(conn, mid, status, "AA", None)
        conn.execute(messages.T.update().values(received_at=datetime.now(UTC) - timedelta(days=100)))
        messages.insert_message(conn, messages.MessageMeta("c", b"new"), "processed", keyed=False)

    pipeline.writer.run_sync(seed)
    assert pipeline.writer.run_sync(lambda c: purge_messages(c, 90)) == 2
    with pipeline.writer.store.reader.connect() as conn:
        left = sorted((r.status, bytes(r.raw)) for r in conn.execute(select(messages.T)))
    assert left == [("error", b"x"), ("processed", b"new")]


async def test_run_job_records_the_last_outcome(pipeline: Pipeline) -> None:
    jobs = build_jobs(JobsSettings(), pipeline.writer, {})
    calls: list[str] = []

    async def boom() -> str:
        calls.append("boom")
        raise RuntimeError("remote down")

    jobs.append(JobDef("boom", trigger_for(None, 3600, "UTC"), boom))
    sched = Scheduler(pipeline.writer.store, pipeline.writer, jobs, JobsSettings())
    assert (await sched.run_job("credential_expiry"))[0] == "ok"
    assert await sched.run_job("boom") == ("error", "RuntimeError: remote down")
    with pipeline.writer.store.reader.connect() as conn:
        runs = last_runs(conn)
    assert runs["credential_expiry"].status == "ok" and runs["boom"].status == "error"
    assert sched.next_run("housekeeping") is not None


async def test_interval_job_runs_on_schedule_without_overlap(pipeline: Pipeline) -> None:
    running = 0
    peak = 0
    count = 0

    async def slow() -> str:
        nonlocal running, peak, count
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.5)
        running -= 1
        count += 1
        return "ok"

    settings = JobsSettings.model_validate(
        {"credential_expiry": {"enabled": False}, "housekeeping": {"enabled": False}}
    )
    jobs = build_jobs(settings, pipeline.writer, {}) + [JobDef("slow", trigger_for(None, 0.1, "UTC"), slow)]
    sched = Scheduler(pipeline.writer.store, pipeline.writer, jobs, settings)
    assert await sched.start()
    await asyncio.sleep(1.3)
    await sched.stop()
    assert count >= 1 and peak == 1  # max_instances=1: never two runs at once


async def test_one_scheduler_per_deployment_on_postgres(pipeline: Pipeline) -> None:
    store = pipeline.writer.store
    if store.dialect != "postgresql":
        pytest.skip("the advisory lock is PostgreSQL's; SQLite is one process")
    settings = JobsSettings.model_validate({"lock_retry_seconds": 0.2})
    a = Scheduler(store, pipeline.writer, build_jobs(settings, pipeline.writer, {}), settings)
    second_store = Store(str(store.writer.url.render_as_string(hide_password=False)))
    b_writer = StoreWriter(second_store)
    b = Scheduler(second_store, b_writer, build_jobs(settings, b_writer, {}), settings)
    try:
        assert await a.start() is True
        assert await b.start() is False
        await asyncio.sleep(0.5)
        assert b.aps is None and not b.leader  # still standing by while a holds the lock
        await a.stop()
        for _ in range(50):
            if b.leader:
                break
            await asyncio.sleep(0.1)
        assert b.leader and b.aps is not None  # took over
        assert await a.start() is False
    finally:
        await a.stop()
        await b.stop()
        b_writer.stop()
        second_store.dispose()
