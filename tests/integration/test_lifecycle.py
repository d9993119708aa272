"""Issue 13 item 4: ``hms-ach run`` stops gracefully on SIGTERM and SIGINT. A real process under
load from real MLLP senders, a real webhook receiver, on SQLite and PostgreSQL.

* SIGTERM under load: exit 0; every message ACKed AA is stored exactly once; a message in flight
  is ACKed or never ACKed (none lost: sent again, it is stored once); the outbox leases are
  released and the SQLite WAL is checkpointed, so the next start delivers the pending webhooks at
  once (not after the 30 s lease).
* The drain closes the MLLP and HTTP ports at once and still answers the message and the FHIR
  write in flight.
* A file_drop poll in progress ends after its current file; the rest wait for the next start.
* Past ``engine.shutdown_grace_seconds`` the process exits 1 and says what was still running; a
  second signal during the drain exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, local_authenticator
from tests.integration.engine_process import (
    ROOT,
    EngineProcess,
    SendLog,
    a01,
    send_one_each,
    send_until_closed,
    sqlite_stored_counts,
    stored_counts,
)
from tests.integration.outbound_helpers import SECRET, Receiver

SENDERS = 4


def _webhook(url: str) -> str:
    return (
        f"  - name: dashboard\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        '    events: ["encounter.*"]\n    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.3\n'
        "    timeout_seconds: 2\n"
    )


def _outbox_state(store: Store) -> tuple[int, int]:
    """(pending delivery rows, sink leases held)."""
    with store.read() as conn:
        pending = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")).scalar_one()
        leased = conn.execute(
            text("SELECT COUNT(*) FROM outbox_cursor WHERE lease_owner IS NOT NULL")
        ).scalar_one()
    return int(pending), int(leased)


def _audit_count(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM audit_entry")).scalar_one())


@pytest.mark.timeout(180)
async def test_sigterm_under_load_loses_nothing_and_the_next_start_delivers_at_once(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver(status=lambda n: 503 if refusing else 200)
    refusing = True  # the first run: every delivery fails, so rows are pending and the lease held
    url = await receiver.start()
    engine = EngineProcess(
        tmp_path, store.url, engine_yaml="  shutdown_grace_seconds: 20\n", sinks_yaml=_webhook(url)
    )
    store.dispose()  # no connection of the test's own keeps the SQLite WAL open
    sent = SendLog()
    try:
        await engine.start()
        senders = [
            asyncio.create_task(send_until_closed(engine.mllp_port, f"LC-{s}", sent)) for s in range(SENDERS)
        ]
        deadline = time.monotonic() + 30
        while len(sent.acked()) < 40 or receiver.requests == 0:  # under load, with deliveries failing
            assert time.monotonic() < deadline, (len(sent.acked()), receiver.requests)
            await asyncio.sleep(0.05)
        engine.signal(signal.SIGTERM)
        stopping_at = time.monotonic()
        code = await engine.wait(30)
        took = time.monotonic() - stopping_at
        await asyncio.wait_for(asyncio.gather(*senders), 30)  # each ends when its connection closes

        assert code == 0, engine.output()[-3000:]
        assert took < 20, took
        names = [e.get("event") for e in engine.events()]
        assert "engine.stopping" in names and "engine.stopped" in names
        assert "engine.stop_timeout" not in names and "Traceback" not in engine.output()
        stopped = engine.event("engine.stopped")
        assert stopped is not None
        if store.dialect == "sqlite":
            assert stopped["wal_checkpointed"] is True
            wal = Path(store.url.split("sqlite:///", 1)[1] + "-wal")
            assert not wal.exists() or wal.stat().st_size == 0, wal.stat().st_size
        else:
            assert stopped["wal_checkpointed"] is None  # PostgreSQL: nothing to checkpoint

        acked, unanswered = sent.acked(), sent.unanswered()
        assert set(sent.codes.values()) <= {"AA", None}, sent.codes
        assert len(unanswered) <= SENDERS
        counts = stored_counts(store, list(sent.codes))
        assert all(counts[c] == 1 for c in acked), {c: counts[c] for c in acked if counts[c] != 1}
        assert all(counts[c] <= 1 for c in unanswered), {c: counts[c] for c in unanswered}
        pending, leased = _outbox_state(store)
        assert pending > 0 and leased == 0, (pending, leased)  # the lease was released on the way out
        # the clean stop signed the audit trail's head into the checkpoint file (docs/audit.md)
        verified = CliRunner().invoke(
            cli_app, ["audit", "verify", "--config", str(engine.config), "--database", store.url]
        )
        assert verified.exit_code == 0 and f"intact: {_audit_count(store)} entries" in verified.output, (
            verified.output
        )
        assert f"({_audit_count(store)} entries)" in verified.output, verified.output  # the last checkpoint
        store.dispose()

        # the next start: the receiver takes deliveries now, and gets the first within seconds
        refusing = False
        refused = receiver.requests
        await engine.start()
        deadline = time.monotonic() + 25
        while not receiver.events:
            assert time.monotonic() < deadline, "no delivery within 25 s of the restart"
            await asyncio.sleep(0.05)
        first_delivery = time.time() - engine.ready_at
        assert receiver.requests > refused and first_delivery < 8, first_delivery  # the lease was 30 s

        # none lost: the unanswered ones sent again are stored once; nothing was stored twice
        assert await send_one_each(engine.mllp_port, unanswered) == ["AA"] * len(unanswered)
        engine.signal(signal.SIGINT)  # Ctrl-C drains the same way
        assert await engine.wait(30) == 0, engine.output()[-3000:]
        counts = stored_counts(store, list(sent.codes))
        assert set(counts.values()) == {1}, {c: n for c, n in counts.items() if n != 1}
        assert receiver.bad_signatures == 0
    finally:
        engine.kill()
        await receiver.stop()


async def _hold_a_message_in_flight(
    engine: EngineProcess, db: Path
) -> tuple[sqlite3.Connection, SendLog, asyncio.Task[None]]:
    """Another process holds the SQLite write lock; one message is sent and waits for its commit."""
    locker = sqlite3.connect(db, isolation_level=None, timeout=5)
    locker.execute("BEGIN IMMEDIATE")
    sent = SendLog()
    sender = asyncio.create_task(send_until_closed(engine.mllp_port, "LC-HELD", sent, limit=1))
    await engine.wait_for_event("mllp.frame_received", within=20)  # in the engine, waiting for the lock
    assert list(sent.codes) == ["LC-HELD-0"]
    return locker, sent, sender


@pytest.mark.timeout(120)
async def test_past_the_grace_period_it_exits_1_saying_what_still_runs(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    engine = EngineProcess(
        tmp_path, f"sqlite:///{db}", engine_yaml="  shutdown_grace_seconds: 1.5\n", log_level="DEBUG"
    )
    locker: sqlite3.Connection | None = None
    try:
        await engine.start()
        locker, sent, sender = await _hold_a_message_in_flight(engine, db)
        engine.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await engine.wait(30)
        assert code == 1 and time.monotonic() - started < 12, (code, engine.output()[-3000:])
        lines = [line for line in engine.output().splitlines() if line.startswith("hms-ach:")]
        assert len(lines) == 1, engine.output()[-3000:]
        assert "grace period of 1.5 s" in lines[0] and "channel adt_in: 1 MLLP connection(s) open" in lines[0]
        timeout = engine.event("engine.stop_timeout")
        assert timeout is not None and timeout["still_running"], timeout
        assert "Traceback" not in engine.output()
        await asyncio.wait_for(sender, 10)  # it saw the connection close
        assert sent.codes == {"LC-HELD-0": None}  # never ACKed: the sender sends it again
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
        engine.kill()


@pytest.mark.timeout(120)
async def test_a_second_signal_during_the_drain_exits_at_once(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    engine = EngineProcess(
        tmp_path, f"sqlite:///{db}", engine_yaml="  shutdown_grace_seconds: 60\n", log_level="DEBUG"
    )
    locker: sqlite3.Connection | None = None
    try:
        await engine.start()
        locker, sent, sender = await _hold_a_message_in_flight(engine, db)
        engine.signal(signal.SIGTERM)
        await engine.wait_for_event("engine.stopping", within=10)
        assert engine.proc is not None and engine.proc.poll() is None  # draining: the message waits
        engine.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await engine.wait(10)
        assert code == 128 + signal.SIGTERM and time.monotonic() - started < 5, code
        forced = engine.event("engine.stop_forced")
        assert forced is not None and forced["signal"] == "SIGTERM", engine.output()[-3000:]
        await asyncio.wait_for(sender, 10)  # it saw the connection close
        assert sent.codes == {"LC-HELD-0": None}
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
        engine.kill()


@pytest.mark.timeout(120)
async def test_a_poll_in_progress_stops_after_its_current_file(tmp_path: Path, store: Store) -> None:
    """The file_drop poll run by the scheduler ends after the file it is on; the files after it wait
    in the inbox for the next start, which takes them, each message stored once."""
    inbox = tmp_path / "drop"
    inbox.mkdir()
    files = 40
    for n in range(files):
        (inbox / f"{n:03d}.hl7").write_bytes(a01(f"FD-{n}", f"FD{n}"))
    (tmp_path / "channels.yaml").write_text(
        f"engine:\n  mappings: {ROOT / 'mappings'}\n  watch: false\nhttp:\n  enabled: false\n"
        f"channels:\n  - name: drop_in\n    type: file_drop\n    directory: {inbox}\n"
        f"    poll_interval_seconds: 0.2\n    min_file_age_seconds: 0\n    stable_seconds: 0\n"
        f"    work_dir: {tmp_path / 'work'}\n"
    )
    processed = inbox / "processed"

    def done() -> int:
        return len(list(processed.glob("*.hl7"))) if processed.exists() else 0

    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await engine.start()
    try:
        deadline = time.monotonic() + 30
        while done() == 0:
            assert time.monotonic() < deadline, "the poll did not start"
            await asyncio.sleep(0.01)
    finally:
        started = time.monotonic()
        await engine.stop()
    assert time.monotonic() - started < 10
    first = done()
    assert 0 < first < files, first
    assert len(list(inbox.glob("*.hl7"))) == files - first  # the rest wait, untouched

    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await engine.start()
    try:
        deadline = time.monotonic() + 60
        while done() < files:
            assert time.monotonic() < deadline, done()
            await asyncio.sleep(0.05)
    finally:
        await engine.stop()
    counts = stored_counts(store, [f"FD-{n}" for n in range(files)])
    assert set(counts.values()) == {1}, {c: n for c, n in counts.items() if n != 1}


async def _refused(connect: Callable[[], Awaitable[object]], within: float = 10) -> None:
    """``connect()`` fails (nothing listens any more) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            await connect()
        except (OSError, httpx.TransportError):
            return
        assert time.monotonic() < deadline, "still accepting"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_the_drain_stops_accepting_and_answers_what_is_in_flight(tmp_path: Path) -> None:
    """An MLLP message and a FHIR write wait for the store when SIGTERM comes: the ports close at
    once, yet both are committed and answered (AA, 201) once the store commits, and the exit is 0."""
    db = tmp_path / "store.db"
    engine = EngineProcess(
        tmp_path,
        f"sqlite:///{db}",
        engine_yaml="  shutdown_grace_seconds: 30\n",
        http=True,
        log_level="DEBUG",
        channels_yaml="  - name: fhir_in\n    type: fhir_rest\n",
    )
    locker: sqlite3.Connection | None = None
    try:
        await engine.start()
        base = f"http://127.0.0.1:{engine.http_port}"
        token = auth_headers(local_authenticator(tmp_path / "data"))  # the engine's own issuer
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=token) as http:
            locker, sent, sender = await _hold_a_message_in_flight(engine, db)
            write = asyncio.create_task(
                http.post(
                    "/fhir/Patient",
                    content=b'{"resourceType": "Patient", "name": [{"family": "Drain"}]}',
                    headers={"content-type": "application/fhir+json"},
                )
            )
            await asyncio.sleep(1.0)  # the request is in the engine (nothing logs it), waiting for the store
            engine.signal(signal.SIGTERM)
            await engine.wait_for_event("engine.stopping", within=10)

            async def mllp() -> None:
                _reader, writer = await asyncio.open_connection("127.0.0.1", engine.mllp_port)
                writer.close()

            async def fresh_http() -> None:
                async with httpx.AsyncClient(base_url=base, timeout=2) as other:
                    await other.get("/health/live")

            await _refused(mllp)  # no new connections while the old ones finish
            await _refused(fresh_http)
            assert engine.proc is not None and engine.proc.poll() is None
            locker.execute("ROLLBACK")  # the store commits again
            locker.close()
            locker = None
            response = await asyncio.wait_for(write, 30)
            await asyncio.wait_for(sender, 30)
        assert response.status_code == 201, response.text
        assert sent.codes == {"LC-HELD-0": "AA"}
        assert await engine.wait(30) == 0, engine.output()[-3000:]
        assert engine.event("engine.stopped") is not None
        assert sqlite_stored_counts(db, ["LC-HELD-0"]) == {"LC-HELD-0": 1}
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
        engine.kill()
