"""Every access audited with its caller (issue 14 item 5), against a running engine: uvicorn on a
loopback port with authentication on (the local issuer), an MLLP listener, httpx as the client.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set.

The access records are queued by the routes and written in batches by a background thread: each test
waits for them with a deadline (:func:`events`), or stops the engine, which flushes the queue.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Connection, select, text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.client import send_messages
from hms_ach.store import access_log, audit
from hms_ach.store.audit_keys import seal_for
from hms_ach.store.db import Store
from hms_ach.store.models import AccessRecord, AuditEntry
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, mllp_channel

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
A01 = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes()
MRN = "urn:hms-ach:id:mrn"
AUDITOR = ("auditor",)


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    """An engine with a fhir_rest channel, an MLLP listener and the HTTP API, on the test's store."""
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 65536\n"
        "  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


def _base(engine: Engine) -> str:
    return f"http://127.0.0.1:{engine.http_port}"


async def _create_patient(engine: Engine, mrn: str = "M-1") -> str:
    body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "gender": "female"}
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:
        r = await client.post(
            "/fhir/Patient",
            content=orjson.dumps(body),
            headers=FHIR_JSON | auth_headers(engine, sub="writer"),
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def events(
    engine: Engine, query: str, want: int = 1, deadline_seconds: float = 15
) -> list[dict[str, Any]]:
    """The AuditEvents of ``GET /fhir/AuditEvent?{query}`` once there are ``want`` of them (the
    batches are written in the background), as an auditor sees them."""
    headers = auth_headers(engine, "user/AuditEvent.rs", AUDITOR, sub="auditor-1")
    deadline = time.monotonic() + deadline_seconds
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30, headers=headers) as client:
        while True:
            r = await client.get(f"/fhir/AuditEvent?{query}")
            assert r.status_code == 200, r.text
            found = [e["resource"] for e in r.json()["entry"]]
            if len(found) >= want or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.1)


def _agent(event: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in event["agent"] if a["requestor"])


def _refs(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event["entity"] if "reference" in e.get("what", {})]


async def test_a_patient_read_names_the_caller_and_the_patient(engine: Engine) -> None:
    pid = await _create_patient(engine)
    headers = auth_headers(engine, "user/Patient.rs", sub="dr-alice")
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30, headers=headers) as client:
        assert (await client.get(f"/fhir/Patient/{pid}")).status_code == 200

    found = await events(engine, "subtype=read&agent=dr-alice")
    assert len(found) == 1
    event = found[0]
    assert event["type"]["code"] == "rest" and event["subtype"][0]["code"] == "read"
    assert event["outcome"] == "0" and event["action"] == "R"
    agent = _agent(event)
    assert agent["who"]["identifier"]["value"] == "dr-alice"
    assert agent["altId"]  # the token's client_id
    assert agent["network"]["address"] == "127.0.0.1"
    assert f"Patient/{pid}" in _refs(event)
    patient_entity = next(
        e for e in event["entity"] if e.get("what", {}).get("reference") == f"Patient/{pid}"
    )
    assert patient_entity["role"]["code"] == "1"  # BALP: the patient entity
    # the same record found by patient
    assert [e["id"] for e in await events(engine, f"patient={pid}&subtype=read")] == [event["id"]]


async def test_a_search_records_its_query_and_what_it_returned(engine: Engine) -> None:
    pid = await _create_patient(engine, "M-2")
    headers = auth_headers(engine, "user/Patient.rs", sub="dr-bob")
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30, headers=headers) as client:
        r = await client.get("/fhir/Patient", params={"identifier": f"{MRN}|M-2"})
        assert r.status_code == 200 and len(r.json()["entry"]) == 1

    event = (await events(engine, "subtype=search-type&agent=dr-bob"))[0]
    assert event["action"] == "E"
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    text = base64.b64decode(query["query"]).decode()
    assert text.startswith("/fhir/Patient?") and "identifier=" in text  # parameter names and values
    assert query["detail"][0]["valueString"] == "1"  # the count
    assert f"Patient/{pid}" in _refs(event)


async def test_denied_requests_are_audited_with_the_failure(engine: Engine) -> None:
    pid = await _create_patient(engine, "M-3")
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:
        assert (await client.get(f"/fhir/Patient/{pid}?x=1")).status_code == 401  # no token
        forbidden = auth_headers(engine, "user/Practitioner.rs", sub="nosy")
        assert (await client.get("/fhir/Patient", headers=forbidden)).status_code == 403
        other = auth_headers(engine, "patient/*.rs", sub="app-of-other", patient="someone-else")
        assert (await client.get(f"/fhir/Patient/{pid}", headers=other)).status_code == 404

    anonymous = [e for e in await events(engine, "subtype=read", want=2) if "display" in _agent(e)["who"]]
    assert len(anonymous) == 1 and anonymous[0]["outcome"] == "4"
    assert anonymous[0]["outcomeDesc"] == "HTTP 401"
    assert _agent(anonymous[0])["network"]["address"] == "127.0.0.1"

    refused = (await events(engine, "agent=nosy"))[0]
    assert refused["outcomeDesc"] == "HTTP 403" and refused["subtype"][0]["code"] == "search-type"
    outside = (await events(engine, "agent=app-of-other"))[0]
    assert outside["outcomeDesc"] == "HTTP 404" and f"Patient/{pid}" in _refs(outside)


async def test_an_mllp_change_entry_names_channel_and_peer(engine: Engine) -> None:
    store = engine.store  # the engine's store carries the audit key
    port = int(mllp_channel(engine, "adt_in").port)
    acks = await send_messages("127.0.0.1", port, [A01], timeout=15)
    assert b"MSA|AA" in acks[0]
    with store.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(AuditEntry.__table__))]  # type: ignore[attr-defined]
        assert audit.verify(conn, seal_for(conn)).ok  # the actor is covered by the chain and verifies
    rows = [r for r in rows if r["entity_type"] != "Questionnaire"]  # the shipped forms, published at start
    assert rows
    actor = orjson.loads(rows[0]["actor"])
    assert actor["kind"] == "mllp" and actor["channel"] == "adt_in"
    assert actor["peer"].startswith("127.0.0.1:") and "certificate_subject" in actor
    # the hash covers the actor: an edited actor no longer verifies
    with store.transaction() as conn:
        conn.execute(
            AuditEntry.__table__.update()  # type: ignore[attr-defined]
            .where(AuditEntry.__table__.c.seq == rows[0]["seq"])  # type: ignore[attr-defined]
            .values(actor=audit.actor_json(kind="mllp", channel="adt_in", peer="10.9.9.9:1"))
        )
    with store.read() as conn:
        result = audit.verify(conn, seal_for(conn))
    assert not result.ok and result.problem == "edited"


async def test_a_fhir_write_entry_names_the_caller(engine: Engine) -> None:
    pid = await _create_patient(engine, "M-4")
    found = await events(engine, f"entity=Patient/{pid}&subtype=create")
    agent = _agent(found[0])
    assert agent["who"]["identifier"]["value"] == "writer" and agent["network"]["address"] == "127.0.0.1"


async def test_a_workforce_read_of_shifts_is_audited(engine: Engine) -> None:
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:
        ok = auth_headers(engine, "", ("scheduler",), sub="sched-1", departments=("ICU",))
        assert (await client.get("/api/v1/shifts", headers=ok)).status_code == 200
        employee = auth_headers(engine, "", ("employee",), sub="emp-1", employee_id="E-1")
        assert (await client.get("/api/v1/shifts?employee_id=E-2", headers=employee)).status_code == 403
        health = (await client.get("/health")).json()
        assert set(health["access_audit"]) == {"queued", "written", "dropped", "failed_batches"}
        assert health["access_audit"]["dropped"] == 0
    read = (await events(engine, "agent=sched-1"))[0]
    assert read["subtype"][0]["code"] == "search-type" and read["outcome"] == "0"
    assert _agent(read)["role"] == [{"text": "scheduler"}]
    denied = (await events(engine, "agent=emp-1"))[0]
    assert denied["outcomeDesc"] == "HTTP 403"


async def test_workforce_reads_of_staff_are_audited(engine: Engine) -> None:
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:
        hr = auth_headers(engine, "", ("hr_admin",), sub="hr-1")
        assert (await client.get("/api/v1/employees", headers=hr)).status_code == 200
        assert (await client.get("/api/v1/employees/nobody", headers=hr)).status_code == 404
        assert (await client.get("/api/v1/audit", headers=hr)).status_code == 403  # refused: recorded too
    found = await events(engine, "agent=hr-1", want=3)
    assert sorted((e["subtype"][0]["code"], e["outcomeDesc"]) for e in found) == [
        ("read", "HTTP 404"),
        ("search-type", "HTTP 200"),
        ("search-type", "HTTP 403"),
    ]
    queries = [next(x for x in e["entity"] if x.get("role", {}).get("code") == "24") for e in found]
    assert sorted(q["description"].split("?")[0] for q in queries) == [
        "/api/v1/audit",
        "/api/v1/employees",
        "/api/v1/employees/nobody",
    ]


async def test_queued_records_are_flushed_on_shutdown(tmp_path: Path, store: Store) -> None:
    eng = Engine(load_config(_minimal_config(tmp_path)), database=store.url)
    await eng.start()
    try:
        eng.access_audit.flush_interval_seconds = 3600  # nothing is written until the stop
        eng.access_audit.max_batch_entries = 10_000
        sub, actor = access_log.http_actor(None, "127.0.0.1")
        for n in range(50):
            eng.access_audit.record(access_log.Access("read", "Patient", 200, sub, actor, [f"Patient/{n}"]))
        await asyncio.sleep(0.2)
    finally:
        await eng.stop()
    reopened = Store(store.url)
    audit.install(reopened, eng.config.audit, eng.config.data_dir, create=False)  # its key, to verify
    with reopened.read() as conn:
        count = len(conn.execute(select(AccessRecord.__table__)).all())  # type: ignore[attr-defined]
        assert access_log.verify_chain(conn).ok
    reopened.dispose()
    assert count == 50 and eng.access_audit.queued == 0

    # `hms-ach audit verify` checks the access records too, and names an edited one
    args = ["audit", "verify", "--config", str(eng.config.source), "--database", store.url]
    verified = CliRunner().invoke(cli_app, args)
    assert verified.exit_code == 0, verified.output
    with store.writer.begin() as conn:  # someone with database access hides who read what
        conn.execute(text("UPDATE access_record SET sub = 'nobody' WHERE seq = 7"))
    tampered = CliRunner().invoke(cli_app, args)
    assert tampered.exit_code == 1 and "edited-access-record" in tampered.output, tampered.output
    assert "access record 7 " in tampered.output


def test_a_full_queue_drops_counts_and_fails_readiness(store: Store) -> None:
    def commit(job: Callable[[Connection], int]) -> int:
        with store.transaction() as conn:
            return job(conn)

    log = access_log.AccessLog(commit, max_queue_entries=2, overflow_wait_seconds=0.01)
    sub, actor = access_log.http_actor(None, None)
    results = [log.record(access_log.Access("read", "Patient", 200, sub, actor)) for _ in range(3)]
    assert results == [True, True, False]  # the thread is not started: the third finds no room
    assert log.dropped == 1 and log.problem() is not None
    log.start()
    assert log.stop(timeout=5) == 0 and log.queued == 0 and log.written == 2
    with store.read() as conn:
        assert len(conn.execute(select(AccessRecord.__table__)).all()) == 2  # type: ignore[attr-defined]


def _minimal_config(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    path = tmp_path / "channels.yaml"
    path.write_text("engine:\n  mappings: mappings\n  watch: false\nhttp:\n  host: 127.0.0.1\n  port: 0\n")
    return path


def test_a_store_of_an_earlier_version_gains_the_actor_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the audit_entry table as earlier versions created it
        db.execute(
            "CREATE TABLE audit_entry (seq INTEGER PRIMARY KEY, recorded VARCHAR(40) NOT NULL, agent VARCHAR(255) "
            "NOT NULL, action VARCHAR(16) NOT NULL, entity_type VARCHAR(64) NOT NULL, entity_id VARCHAR(64) NOT "
            "NULL, version_id INTEGER NOT NULL, message_id INTEGER, diff TEXT NOT NULL, prev_hash VARCHAR(64) "
            "NOT NULL, hash VARCHAR(64) NOT NULL UNIQUE)"
        )
        row = {
            "recorded": audit.instant(),
            "agent": "api",
            "action": "create",
            "entity_type": "Patient",
            "entity_id": "1",
            "version_id": 1,
            "message_id": None,
            "diff": "[]",
            "prev_hash": audit.GENESIS,
        }
        row["hash"] = audit.plain_hash(row)
        db.execute(
            "INSERT INTO audit_entry (recorded, agent, action, entity_type, entity_id, version_id, message_id, "
            "diff, prev_hash, hash) VALUES (:recorded, :agent, :action, :entity_type, :entity_id, :version_id, "
            ":message_id, :diff, :prev_hash, :hash)",
            row,
        )
    store = Store(f"sqlite:///{path}")
    try:
        with store.read() as conn:
            assert audit.verify(conn).ok  # the old entry, its actor NULL, verifies as before
            old = conn.execute(select(AuditEntry.__table__)).one()  # type: ignore[attr-defined]
        assert old.actor is None
    finally:
        store.dispose()


async def test_reading_the_trail_is_itself_recorded(engine: Engine) -> None:
    """The trail holds patient and staff data (diffs, queries): its readers are recorded too."""
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:
        writer = auth_headers(engine, "user/Patient.cruds", ("integration",), sub="writer-1")
        body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "TRAIL-1"}]}
        created = await client.post("/fhir/Patient", json=body, headers=writer | FHIR_JSON)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        reader = auth_headers(engine, "user/AuditEvent.rs", AUDITOR, sub="auditor-2")
        assert (await client.get(f"/fhir/AuditEvent?entity=Patient/{pid}", headers=reader)).status_code == 200
    found = await events(engine, "agent=auditor-2&subtype=search-type")
    assert len(found) == 1 and found[0]["outcomeDesc"] == "HTTP 200"
    assert f"Patient/{pid}" in _refs(found[0])  # whose trail was read
    query = next(x for x in found[0]["entity"] if x.get("role", {}).get("code") == "24")
    assert query["description"] == f"/fhir/AuditEvent?entity=Patient/{pid}"
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:  # no AuditEvent scope
        nosy = auth_headers(engine, "user/Patient.rs", ("integration",), sub="nosy-1")
        assert (await client.get("/fhir/AuditEvent", headers=nosy)).status_code == 403
    refused = await events(engine, "agent=nosy-1")
    assert len(refused) == 1 and refused[0]["outcomeDesc"] == "HTTP 403"
    async with httpx.AsyncClient(base_url=_base(engine), timeout=30) as client:  # a read by id, too
        reader = auth_headers(engine, "user/AuditEvent.rs", AUDITOR, sub="auditor-3")
        assert (await client.get("/fhir/AuditEvent/access-1", headers=reader)).status_code == 200
    read = await events(engine, "agent=auditor-3&subtype=read")
    assert len(read) == 1 and _refs(read[0]) == ["AuditEvent/access-1"]
