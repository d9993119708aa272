"""SSNs never reach the audit trail (issue 14 item 6): an ADT carrying an SSN (PID-3 repetition of
assigning authority SSA, and PID-19) and a FHIR Patient with a us-ssn identifier leave no SSN in the
audit rows, in /fhir/AuditEvent or in /api/v1/audit, while an auditor still sees that it changed."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import text

from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import commit_hl7, evaluate
from hms_ach.store.audit_settings import US_SSN
from hms_ach.store.db import Store
from tests.integration.engine_helpers import FHIR_JSON, auth_headers

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SSNS = ["123-45-6789", "987-65-4321", "555-12-3456", "555123456"]


def adt_with_ssn() -> bytes:
    """The A01 sample with SSN 555-12-3456 in PID-3 (SSA) and 555123456 in PID-19."""
    raw = (ROOT / "samples/hl7/adt_a01.hl7").read_bytes().replace(b"123-45-6789", b"555-12-3456")
    segments = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    for i, seg in enumerate(segments):
        if seg.startswith(b"PID|"):
            fields = seg.split(b"|")
            fields += [b""] * (20 - len(fields))
            fields[19] = b"555123456"
            segments[i] = b"|".join(fields)
    return b"\r".join(segments)


def patient(ssn: str, pid: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-77"}, {"system": US_SSN, "value": ssn}],
        "name": [{"family": "Okafor", "given": ["Ada"]}],
    }
    if pid:
        body["id"] = pid
    return body


def assert_no_ssn(where: str, text_: str) -> None:
    for ssn in SSNS:
        assert ssn not in text_, f"{ssn} in {where}"


async def test_ssn_masked_in_rows_audit_events_and_api(fhir_engine: Engine, store: Store) -> None:
    policy = Hl7Policy("adt_in")
    outcome = await fhir_engine.writer.run(
        commit_hl7(evaluate(adt_with_ssn(), policy, fhir_engine.pipeline.engine), policy)
    )
    assert outcome.ack_code == "AA", outcome.ack_code
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}", timeout=30, headers=auth_headers(fhir_engine)
    ) as http:
        created = await http.post("/fhir/Patient", json=patient("123-45-6789"), headers=FHIR_JSON)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        updated = await http.put(f"/fhir/Patient/{pid}", json=patient("987-65-4321", pid), headers=FHIR_JSON)
        assert updated.status_code == 200, updated.text
        assert "987-65-4321" in (await http.get(f"/fhir/Patient/{pid}")).text  # the record itself keeps it

        admitted = await http.get("/fhir/Patient", params={"identifier": "urn:hms-ach:id:GENHOSP|100001"})
        assert "555-12-3456" in admitted.text  # the ADT's SSN is in the record (not vacuous below)

        events = await http.get("/fhir/AuditEvent", params={"entity": "Patient", "_count": "200"})
        assert events.status_code == 200 and len(events.json()["entry"]) >= 3
        assert_no_ssn("/fhir/AuditEvent", events.text)
        api = await http.get("/api/v1/audit", params={"entity": "Patient", "limit": "200"})
        assert api.status_code == 200 and len(api.json()["items"]) >= 3
        assert_no_ssn("/api/v1/audit", api.text)

    with store.read() as conn:
        stored = [r.diff for r in conn.execute(text("SELECT diff FROM audit_entry ORDER BY seq"))]
    assert_no_ssn("audit_entry.diff", "\n".join(stored))

    change = next(
        item for item in api.json()["items"] if item["entity_id"] == pid and item["action"] == "update"
    )
    ident = next(d for d in change["diff"] if d["path"] == "identifier")
    old, new = (next(i["value"] for i in ident[side] if i["system"] == US_SSN) for side in ("old", "new"))
    assert old.startswith("masked:") and new.startswith("masked:") and old != new  # changed, not shown
    assert orjson.dumps(ident).count(b"MRN-77") == 2  # other identifiers stay readable
