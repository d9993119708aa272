"""The audit trail: one chained row per record change, readable as FHIR AuditEvent and /api/v1/audit,
checked by ``hms-ach audit verify`` (which fails once a row is edited by hand)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.runtime import Engine
from hms_ach.core.records import RecordWrite
from hms_ach.store import audit
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, nurse


def verify(url: str, config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["audit", "verify", "--config", str(config), "--database", url])
    return result.exit_code, result.output


async def test_audit_rows_events_and_verify(fhir_engine: Engine, store: Store, tmp_path: Path) -> None:
    port = fhir_engine.http_port
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers=auth_headers(fhir_engine)
    ) as http:
        created = (await http.post("/fhir/Practitioner", json=nurse(), headers=FHIR_JSON)).json()
        rid = created["id"]
        await http.put(f"/fhir/Practitioner/{rid}", json=nurse(family="Mensah", id=rid), headers=FHIR_JSON)
        await http.delete(f"/fhir/Practitioner/{rid}")
        await http.post("/fhir/Practitioner", json=nurse("E7"), headers=FHIR_JSON)

        events = (await http.get("/fhir/AuditEvent", params={"entity": f"Practitioner/{rid}"})).json()
        assert [e["resource"]["action"] for e in events["entry"]] == ["C", "U", "D"]
        first = events["entry"][0]["resource"]
        assert first["agent"][0]["name"] == "fhir_in"
        assert first["entity"][0]["what"]["reference"] == f"Practitioner/{rid}/_history/1"
        update = events["entry"][1]["resource"]
        assert "Mensah" in update["entity"][0]["detail"][0]["valueString"]
        by_agent = (
            await http.get("/fhir/AuditEvent", params={"agent": "fhir_in", "date": "ge2000-01-01"})
        ).json()
        assert len(by_agent["entry"]) == 4
        none = (await http.get("/fhir/AuditEvent", params={"date": "lt2000-01-01"})).json()
        assert none.get("entry", []) == []
        strict = {"prefer": "handling=strict"}  # else an unknown parameter is ignored, with a warning
        assert (await http.get("/fhir/AuditEvent", params={"bogus": "1"}, headers=strict)).status_code == 400

        api = (await http.get("/api/v1/audit", params={"entity": f"Practitioner/{rid}", "limit": 2})).json()
        assert [r["action"] for r in api["items"]] == ["create", "update"]
        assert api["next_cursor"]
        rest = (
            await http.get(
                "/api/v1/audit", params={"entity": f"Practitioner/{rid}", "cursor": api["next_cursor"]}
            )
        ).json()
        assert [r["action"] for r in rest["items"]] == ["delete"]
        diff = api["items"][1]["diff"]
        assert {
            "op": "replace",
            "path": "name",
            "old": [{"family": "Osei", "given": ["Amara"]}],
            "new": [{"family": "Mensah", "given": ["Amara"]}],
        } in diff

    code, out = verify(store.url, tmp_path / "channels.yaml")
    assert code == 0, out
    assert "6 entries" in out  # the 4 writes and the 2 shipped forms published at start
    with store.writer.begin() as conn:
        conn.execute(text("UPDATE audit_entry SET agent = 'mallory' WHERE seq = 2"))
    code, out = verify(store.url, tmp_path / "channels.yaml")
    assert code == 1
    assert "entry 2" in out


async def test_chain_stays_linear_under_concurrent_writers(store: Store) -> None:
    """Two writer threads, each with its own connection (as two engine processes would be)."""
    other = Store(store.url)
    writers = [StoreWriter(store), StoreWriter(other)]

    def job(n: int):  # type: ignore[no-untyped-def]
        def run(conn):  # type: ignore[no-untyped-def]
            rec = RecordWrite("p", "Practitioner", "urn:x", f"P{n}", {"name": [{"family": f"F{n}"}]})
            return Repository(conn).upsert(rec, rec.content, None)

        return run

    try:
        await asyncio.gather(*(writers[n % 2].run(job(n)) for n in range(40)))
    finally:
        for w in writers:
            w.stop()
        other.dispose()
    with store.reader.connect() as conn:
        result = audit.verify(conn)
        assert audit.count(conn) == 40
    assert result.ok and result.checked == 40, result
