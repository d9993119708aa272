"""Faults of the store under a running engine, with real peers: python-hl7's MLLP client and httpx.

* SQLite: another connection holds the write lock past the commit deadline. The sender gets AE
  (ERR-3 207) within the deadline, FHIR writes get 503, ``/health/ready`` says 503; once the lock
  is released intake resumes without a restart and the message sent again is stored once.
* PostgreSQL: the engine's connections are killed (``pg_terminate_backend``) while one sender, or
  eight concurrent senders, run.
  Every message is ACKed AA and stored once, or answered negatively; intake resumes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import pytest
from sqlalchemy import create_engine, event, text

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store, normalise_url
from hms_ach.store.errors import StoreUnavailable
from tests.conftest import PG_URL
from tests.integration.engine_helpers import auth_headers, mllp_channel

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
DEADLINE = 1.0  # engine.commit_timeout_seconds in these tests


async def _engine(tmp_path: Path, url: str, engine_settings: str = "") -> Engine:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        f"engine:\n  mappings: mappings\n  watch: false\n  commit_timeout_seconds: {DEADLINE}\n"
        "  ready_probe_seconds: 0.5\n" + engine_settings + "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
        "    idle_timeout_seconds: 10\n"
        "  - name: fhir_in\n    type: fhir_rest\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=url)
    await eng.start()
    return eng


@pytest.fixture
async def pg_engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    """:func:`engine`, on PostgreSQL only (skipped before an engine is built on SQLite)."""
    if store.dialect != "postgresql":
        pytest.skip("pg_terminate_backend needs PostgreSQL")
    async for eng in _named_engine(tmp_path, store):
        yield eng


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async for eng in _named_engine(tmp_path, store):
        yield eng


async def _named_engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    url = store.url
    if store.dialect == "postgresql":  # name the engine's connections, to find them in pg_stat_activity
        url += f"&application_name=hmsach_{tmp_path.name[-20:]}"
    eng = await _engine(tmp_path, url)
    try:
        yield eng
    finally:
        await eng.stop()


def _a01(control_id: str) -> str:
    text_ = (SAMPLES / "adt_a01.hl7").read_bytes().decode("latin-1").replace("\n", "\r")
    return text_.replace("S-A01-0001", control_id, 1)


def _msa(ack: str) -> list[str]:
    line = next(s for s in ack.replace("\n", "\r").split("\r") if s.startswith("MSA"))
    return line.split("|")


async def _send(port: int, messages: list[str], wait: float = DEADLINE + 4) -> list[str]:
    """Each message on one python-hl7 connection; each ACK within ``wait`` seconds."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    acks = []
    try:
        for message in messages:
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            acks.append(str(await asyncio.wait_for(reader.readmessage(), wait)))
    finally:
        writer.close()
    return acks


def _stored(store: Store, control_id: str) -> int:
    """Rows of ``control_id`` that are not duplicates: 1 when the message was stored once."""
    with store.read() as conn:
        return int(
            conn.execute(
                text("SELECT COUNT(*) FROM message WHERE control_id = :c AND status != 'duplicate'"),
                {"c": control_id},
            ).scalar_one()
        )


async def _ready(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    r = await http.get("/health/ready")
    body: dict[str, Any] = r.json()
    return r.status_code, body


async def _until_ready(http: httpx.AsyncClient, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (await _ready(http))[0] == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not ready within {within} s: {await _ready(http)}")


async def test_sqlite_lock_held_past_the_deadline_gets_ae_then_intake_resumes(
    engine: Engine, store: Store
) -> None:
    if store.dialect != "sqlite":
        pytest.skip("the SQLite write lock")
    port = mllp_channel(engine).port
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{engine.http_port}", timeout=10, headers=auth_headers(engine)
    ) as http:
        assert (await http.get("/health/live")).status_code == 200
        await _until_ready(http)
        assert (await http.get("/health")).json()["status"] == "ok"
        db = store.url.split("sqlite:///", 1)[1]
        locker = sqlite3.connect(db, isolation_level=None, timeout=5)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            started = time.monotonic()
            ack = (await _send(port, [_a01("WF-LOCK-1")]))[0]
            took = time.monotonic() - started
            assert _msa(ack)[1] == "AE" and took < DEADLINE + 2, (ack, took)
            assert "ERR" in ack and "207" in ack and "Traceback" not in ack and "locked" not in ack
            status, body = await _ready(http)
            assert status == 503 and "store" in body["failed"], body
            assert (await http.get("/health/live")).status_code == 200
            assert (await http.get("/health")).json()["status"] == "unavailable"
            fhir = await http.post(
                "/fhir/Patient",
                content=b'{"resourceType": "Patient", "name": [{"family": "Lockwood"}]}',
                headers={"content-type": "application/fhir+json"},
            )
            assert fhir.status_code == 503, fhir.text
            outcome = fhir.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["code"] == "transient"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await _until_ready(http)  # no restart: the same engine takes messages again
        acks = await _send(port, [_a01("WF-LOCK-1"), _a01("WF-LOCK-2")])
        assert [_msa(a)[1] for a in acks] == ["AA", "AA"], acks
        assert (await http.get("/health")).json()["status"] == "ok"
    assert _stored(store, "WF-LOCK-1") == 1 and _stored(store, "WF-LOCK-2") == 1


def _terminate(application_name: str) -> int:
    """Kill every backend of the engine (found by its application_name); how many were killed."""
    assert PG_URL
    admin = create_engine(normalise_url(PG_URL))
    try:
        with admin.begin() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :a AND pid <> pg_backend_pid()"
                    ),
                    {"a": application_name},
                ).all()
            )
    finally:
        admin.dispose()


@pytest.mark.parametrize("senders", [1, 8])
async def test_postgres_backends_killed_while_senders_run(
    pg_engine: Engine, store: Store, senders: int
) -> None:
    """One sender, then eight concurrent ones (each on its own connection, so the writer's batches
    hold several senders' messages when their connection dies)."""
    engine = pg_engine
    application_name = engine.store.url.rsplit("application_name=", 1)[1]
    port = mllp_channel(engine).port
    per_sender = 40 // senders
    feeds = [[f"WF-PG-{s}-{n:03d}" for n in range(per_sender)] for s in range(senders)]
    ids = [c for feed in feeds for c in feed]
    killed = 0

    async def killer() -> None:
        nonlocal killed
        for _ in range(4):
            await asyncio.sleep(0.15)
            killed += await asyncio.to_thread(_terminate, application_name)

    kill_task = asyncio.create_task(killer())
    results = await asyncio.gather(*(_send(port, [_a01(c) for c in feed]) for feed in feeds))
    await kill_task
    acks = [a for feed_acks in results for a in feed_acks]
    assert killed > 0
    codes = {c: _msa(a)[1] for c, a in zip(ids, acks, strict=True)}
    assert set(codes.values()) <= {"AA", "AE"}, codes
    for c, code in codes.items():
        if code == "AA":
            assert _stored(store, c) == 1, c
    # intake resumes without a restart: the ones answered AE are sent again and stored once
    again = [c for c, code in codes.items() if code != "AA"] + ["WF-PG-after"]
    acks = await _send(port, [_a01(c) for c in again])
    assert [_msa(a)[1] for a in acks] == ["AA"] * len(again), acks
    for c in [*ids, "WF-PG-after"]:
        assert _stored(store, c) == 1, c
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=10) as http:
        await _until_ready(http)


async def test_a_connection_killed_between_two_messages_costs_no_negative_ack(
    pg_engine: Engine, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's connection, used a moment ago and so not pinged again, is killed between two
    messages: the second message's group commit finds it dead before its COMMIT, runs once more on
    a new connection, and is answered AA (stored once)."""
    caplog.set_level(logging.INFO, logger="hms_ach.store.writer")
    engine = pg_engine
    application_name = engine.store.url.rsplit("application_name=", 1)[1]
    port = mllp_channel(engine).port
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    codes = []
    try:
        for n in range(3):
            if n:
                assert await asyncio.to_thread(_terminate, application_name) > 0
            writer.writemessage(hl7.parse(_a01(f"WF-GAP-{n}")))
            await writer.drain()
            codes.append(_msa(str(await asyncio.wait_for(reader.readmessage(), DEADLINE + 4)))[1])
    finally:
        writer.close()
    assert codes == ["AA", "AA", "AA"]
    assert all(_stored(store, f"WF-GAP-{n}") == 1 for n in range(3))
    assert any(r.getMessage() == "writer.reconnected" for r in caplog.records)


async def test_run_ends_when_the_store_stays_unreachable(tmp_path: Path, store: Store) -> None:
    """``serve()`` (``hms-ach run``) stops and raises StoreUnavailable after
    store_unreachable_exit_seconds of failed commits, so that systemd or Docker restarts it."""
    if store.dialect != "sqlite":
        pytest.skip("the SQLite write lock")
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n  commit_timeout_seconds: 1\n"
        "  store_unreachable_exit_seconds: 1.5\n"
        "http:\n  enabled: false\n"
        "channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)

    @event.listens_for(eng.store.writer, "connect")
    def _short_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=100")  # a held lock fails a commit at once

    eng.store.writer.dispose()
    db = store.url.split("sqlite:///", 1)[1]
    locker = sqlite3.connect(db, isolation_level=None, timeout=5)
    serving = asyncio.create_task(eng.serve())
    started = time.monotonic()
    try:
        while "adt_in" not in eng.channels:
            await asyncio.sleep(0.02)
        locker.execute("BEGIN IMMEDIATE")
        ack = (await _send(mllp_channel(eng).port, [_a01("WF-EXIT-1")]))[0]
        assert _msa(ack)[1] == "AE"
        with pytest.raises(StoreUnavailable, match="every commit failed"):
            await asyncio.wait_for(serving, 15)
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    assert time.monotonic() - started < 12
    assert not eng.channels and not eng.writer.alive  # stopped on the way out


async def test_ready_is_503_when_the_disk_is_short(tmp_path: Path, store: Store) -> None:
    if store.dialect != "sqlite":
        pytest.skip("the disk of the SQLite database")
    eng = await _engine(tmp_path, store.url, "  min_free_disk_mb: 1000000000\n")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{eng.http_port}", timeout=10) as http:
            status, body = await _ready(http)
            assert status == 503 and set(body["failed"]) == {"disk"}, body
            assert (await http.get("/health/live")).status_code == 200
    finally:
        await eng.stop()
