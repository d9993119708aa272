"""Poison messages: inputs that PostgreSQL refuses and SQLite takes (a NUL character, an identifier
longer than its column, a key over the btree row limit), structure past the channel's caps, and an
error of the store that nobody foresaw. On both databases, through a real MLLP channel, each gets an
ACK naming the field or the cap, and its raw bytes are stored for replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select, text

from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.ack import location_parts
from hms_ach.hl7v2.client import normalise_message, send_messages
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.messages import StoredMessage
from hms_ach.store.models import RECORD_TABLES
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, mllp_channel, mllp_yaml, running_engine

ROOT = Path(__file__).resolve().parents[2]
A01 = normalise_message((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
PID = b"PID|1||100001^^^GENHOSP^MR~123-45-6789^^^SSA^SS||Rivera^Maria^Elena^^Mrs^^L||"


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 10")) as eng:
        yield eng


def _erl(err: list[str]) -> str:
    """ERR-2 of an ERR segment's fields, without empty trailing components."""
    return err[2].rstrip("^")


def _erl_of(location: str) -> str:
    return "^".join(location_parts(location)).rstrip("^")


def _with(old: bytes, new: bytes, control_id: bytes) -> bytes:
    """The sample admission with ``old`` replaced by ``new``, under its own control id."""
    assert old in A01
    return A01.replace(old, new, 1).replace(b"|S-A01-0001|", b"|" + control_id + b"|", 1)


async def _send(engine: Engine, message: bytes) -> tuple[str, list[str], list[str]]:
    """Send ``message``; (MSA-1, MSA fields, ERR fields) of its ACK."""
    port = int(mllp_channel(engine).port)
    (ack,) = await send_messages("127.0.0.1", port, [message], timeout=20)
    segments = {s[:3]: s.split("|") for s in ack.decode("latin-1").split("\r") if s}
    return segments["MSA"][1], segments["MSA"], segments.get("ERR", [])


def _last(engine: Engine) -> StoredMessage:
    with engine.store.read() as conn:
        rows: list[Any] = messages.list_messages(conn, limit=1)
        row = messages.get(conn, int(rows[0].id))
    assert row is not None
    return row


def _records(engine: Engine, resource_type: str) -> int:
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    with engine.store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _assert_stored(engine: Engine, sent: bytes, status: str, location: str) -> StoredMessage:
    row = _last(engine)
    assert row.raw == sent  # as bytes, exactly as received: replayable
    assert (row.status, row.error_location) == (status, location)
    return row


NUL_CASES = [
    (b"|Rivera^Maria", b"|Riv\x00era^Maria", "PID-5.1"),  # a NUL byte
    (b"^Maria^Elena", b"^Ma\\X00\\ria^Elena", "PID-5.2"),  # an escape that decodes to NUL
    (b"~123-45-6789^", b"~123-45\\X4100\\^", "PID-3[2].1"),  # the same, in a repetition
    (b"|Hives", b"|Hi\x00ves", "AL1-5"),  # a field of one component, another segment
]


async def test_a_nul_character_gets_ae_naming_the_field(engine: Engine) -> None:
    for number, (old, new, location) in enumerate(NUL_CASES):
        control_id = b"NUL-%d" % number
        sent = _with(old, new, control_id)
        code, msa, err = await _send(engine, sent)
        assert (code, msa[2]) == ("AE", control_id.decode())
        assert _erl(err) == _erl_of(location) and err[3].startswith("102^"), location
        row = _assert_stored(engine, sent, "error", location)
        assert "NUL" in (row.error or "")
        again = await asyncio.to_thread(
            engine.pipeline.replay, row.id, {"adt_in": mllp_channel(engine).policy}
        )
        assert (again.status, again.ack_code) == ("error", "AE")  # replayable: the same answer
    assert _erl_of("PID-5.1") == "PID^1^5^1^1"
    assert _records(engine, "Patient") == 0


KEY_CASES = [
    (b"|S-A01-0001|", b"|S\x00A01|", "MSH-10", "102"),
    (b"|ADTSYS|", b"|AD\x00SYS|", "MSH-3", "102"),
    (b"|S-A01-0001|", b"|" + b"C" * 3000 + b"|", "MSH-10", "104"),  # over the btree row limit
    (b"|ADTSYS|", b"|" + b"A" * 3000 + b"|", "MSH-3", "104"),
    (b"|GENHOSP|HMSACH|", b"|" + b"F" * 3000 + b"|HMSACH|", "MSH-4", "104"),
]


async def test_nul_or_overlong_key_fields_get_ar_and_are_stored_unkeyed(engine: Engine) -> None:
    for old, new, location, err3 in KEY_CASES:
        sent = A01.replace(old, new, 1)
        for _ in range(2):  # each resend is answered the same, and stored again
            code, _msa, err = await _send(engine, sent)
            assert code == "AR" and _erl(err) == _erl_of(location), location
            assert err[3].startswith(err3 + "^"), location
            row = _assert_stored(engine, sent, "rejected", location)
            assert row.idempotency_key is None and "\x00" not in row.control_id + (row.ack or "")
    assert _records(engine, "Patient") == 0


async def test_an_identifier_longer_than_its_column_gets_ae_naming_the_field(engine: Engine) -> None:
    sent = _with(b"|100001^^^GENHOSP^MR", b"|" + b"9" * 300 + b"^^^GENHOSP^MR", b"LONG-ID")
    code, _msa, err = await _send(engine, sent)
    assert code == "AE" and err[3].startswith("104^")
    assert _erl(err) == _erl_of("PID-3[1].1")
    row = _assert_stored(engine, sent, "error", "PID-3[1].1")
    assert "at most 255" in (row.error or "")
    assert _records(engine, "Patient") == 0


@pytest.mark.timeout(120)
async def test_structure_past_the_caps_gets_ar_at_once_and_writes_nothing(engine: Engine) -> None:
    reps = b"~".join(b"%012d^^^GENHOSP^MRN" % i for i in range(200_000))
    sent = _with(b"|100001^^^GENHOSP^MR~123-45-6789^^^SSA^SS|", b"|" + reps + b"|", b"REPS")
    assert len(sent) > 5_000_000
    reader, writer = await asyncio.open_connection("127.0.0.1", int(mllp_channel(engine).port))
    start = time.perf_counter()
    writer.write(b"\x0b" + sent + b"\x1c\r")
    await writer.drain()
    ack = await asyncio.wait_for(reader.readuntil(b"\x1c"), 20)
    elapsed = time.perf_counter() - start
    writer.close()
    segments = {s[:3]: s.split("|") for s in ack.strip(b"\x0b\x1c").decode().split("\r") if s}
    code, err = segments["MSA"][1], segments["ERR"]
    print(f"200,000 PID-3 repetitions ({len(sent)} bytes): answered in {elapsed * 1000:.0f} ms")
    assert code == "AR" and _erl(err) == _erl_of("PID-3") and err[3].startswith("104^")
    assert "max_repetitions_per_field" in err[8]
    assert elapsed < 3.0  # measured well under 1 s; the bound leaves room for a loaded machine
    _assert_stored(engine, sent, "rejected", "PID-3")
    if engine.store.url.startswith("sqlite"):  # the raw message once, not hundreds of MB
        db = Path(engine.store.url.split("///", 1)[1])
        written = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
        print(f"SQLite files after it: {written / 1e6:.1f} MB")
        assert written < 30_000_000
    assert _records(engine, "Patient") == 0
    with engine.store.read() as conn:
        # nothing but the index rows of the shipped forms the engine published at start
        rows = "SELECT count(*) FROM search_token WHERE resource_type <> 'Questionnaire'"
        assert int(conn.execute(text(rows)).scalar_one()) == 0
    sent = _with(b"PV2|", b"NTE|1||x\r" * 10_001 + b"PV2|", b"SEGS")
    code, _msa, err = await _send(engine, sent)
    assert code == "AR" and err[3].startswith("104^") and "max_segments_per_message" in err[8]
    _assert_stored(engine, sent, "rejected", "MSH")


def _refuse_inserts(store: Store, table: str) -> None:
    """A real database refusal that no code path expects: a trigger that fails every insert."""
    with store.writer.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION poison_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused: secret value'; END $$"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER poison_refuse BEFORE INSERT ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION poison_refuse()"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE TRIGGER poison_refuse BEFORE INSERT ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'refused: secret value'); END"
                )
            )


async def test_an_unforeseen_store_error_gets_a_generic_ae_and_is_stored(engine: Engine) -> None:
    _refuse_inserts(engine.store, "patient")
    sent = _with(b"|Hives", b"|Rash", b"UNFORESEEN")
    for _ in range(2):
        code, msa, err = await _send(engine, sent)
        assert code == "AE" and msa[2] == "UNFORESEEN" and err[3].startswith("207^")
        assert "secret" not in "|".join(err + msa) and "Error" not in "|".join(err + msa)
        row = _assert_stored(engine, sent, "error", "")
        assert "secret" not in (row.error or "") and "store error:" in (row.error or "")
    assert _records(engine, "Patient") == 0
    # once the cause is gone, the stored message is replayed and processed
    with engine.store.writer.begin() as conn:
        on = " ON patient" if conn.dialect.name == "postgresql" else ""
        conn.execute(text(f"DROP TRIGGER poison_refuse{on}"))
    again = await asyncio.to_thread(engine.pipeline.replay, row.id, {"adt_in": mllp_channel(engine).policy})
    assert (again.status, again.ack_code) == ("processed", "AA")
    assert _records(engine, "Patient") == 1


async def test_http_writes_refuse_nul_and_overlong_identifiers_with_the_path(fhir_engine: Engine) -> None:
    def nurse(value: str = "E9001", family: str = "Osei") -> bytes:
        return orjson.dumps(
            {
                "resourceType": "Practitioner",
                "identifier": [{"system": "urn:hms-ach:id:staff", "value": value}],
                "name": [{"family": family, "given": ["Amara"]}],
            }
        )

    def issue(resp: httpx.Response, status: int) -> dict[str, Any]:
        assert resp.status_code == status, resp.text
        body: dict[str, Any] = resp.json()
        assert body["resourceType"] == "OperationOutcome" and "Error" not in resp.text
        return dict(body["issue"][0])

    base = f"http://127.0.0.1:{fhir_engine.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(fhir_engine)) as http:
        sent = nurse(family="Os\u0000ei")
        found = issue(await http.post("/fhir/Practitioner", content=sent, headers=FHIR_JSON), 400)
        assert found["code"] == "invalid" and found["expression"] == ["Practitioner.name[0].family"]
        with fhir_engine.store.read() as conn:
            row = messages.get(conn, int(messages.list_messages(conn, limit=1)[0].id))
        assert row is not None and row.raw == sent and row.status == "rejected"
        assert row.error_location == "Practitioner.name[0].family"

        resp = await http.post("/fhir/Practitioner", content=nurse("7" * 300), headers=FHIR_JSON)
        found = issue(resp, 422)
        assert found["code"] == "too-long" and found["expression"] == ["Practitioner.identifier.value"]
        resp = await http.put("/fhir/Practitioner/a%00b", content=nurse(), headers=FHIR_JSON)
        assert issue(resp, 400)["code"] == "invalid"

        resp = await http.post(
            "/api/v1/employees",
            content=b'{"employee_number": "E9002", "family": "Os\\u0000ei", "given": ["A"]}',
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 422, resp.text
        assert resp.json()["errors"][0]["location"] == "body.family"
        start = "2026-12-07T07:00:00+00:00"
        shift = {"shift_id": "S" * 300, "start": start, "end": "2026-12-07T15:00:00+00:00"}
        resp = await http.post("/api/v1/shifts", json=shift)
        assert resp.status_code == 422, resp.text
        assert resp.json()["errors"][0]["location"] == "body.shift_id"
    assert _records(fhir_engine, "Practitioner") == 0

    if not fhir_engine.store.url.startswith("postgresql"):
        return  # SQLite's RAISE() is a constraint error, which a FHIR write answers 409 (foreseen)
    _refuse_inserts(fhir_engine.store, "practitioner")
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(fhir_engine)) as http:
        sent = nurse("E9003")
        found = issue(await http.post("/fhir/Practitioner", content=sent, headers=FHIR_JSON), 500)
        assert found["code"] == "exception" and "secret" not in str(found)
    with fhir_engine.store.read() as conn:
        row = messages.get(conn, int(messages.list_messages(conn, limit=1)[0].id))
    assert row is not None and row.raw == sent and row.status == "error"
    assert "store error:" in (row.error or "") and "secret" not in (row.error or "")
