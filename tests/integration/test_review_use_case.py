"""REVIEW use case 5.1 end to end, over the API only (issue 18's acceptance), on SQLite and PostgreSQL.

A triage engine POSTs a case; it goes to the one reviewer who holds a valid licence and is on shift
(one whose licence expired and one off shift are passed over, and the case's audit entry says why);
a signed webhook reaches a receiver. The reviewer takes the case and submits findings without a
signature: the policy flags the case ``escalated`` and it is in the supervisors' queue. Signed, the
findings resolve the case. The case's audit log lists every action in order, and its PDF renders
with the same entries (read back with pypdf).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fhirpy import AsyncFHIRClient
from pypdf import PdfReader

from hms_ach.store.db import Store
from tests.integration.engine_helpers import ROOT, auth_headers
from tests.integration.outbound_helpers import Receiver, wait_for
from tests.integration.test_review_cases import _engine, add_reviewer

pytestmark = pytest.mark.timeout(240)

FINDINGS = json.loads((ROOT / "samples" / "fhir" / "review_findings.json").read_text())


async def test_review_use_case_5_1(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    engine = await _engine(tmp_path, store, await receiver.start())
    try:
        admin = auth_headers(engine)
        now = datetime.now(UTC)
        today = now.date()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            r1 = await add_reviewer(http, admin, "U1", today + timedelta(days=365), now - timedelta(hours=1))
            r2 = await add_reviewer(http, admin, "U2", today - timedelta(days=1), now - timedelta(hours=1))
            r3 = await add_reviewer(http, admin, "U3", today + timedelta(days=365), now + timedelta(hours=4))

            # the triage engine (role integration) posts the case
            triage = auth_headers(engine, roles=("integration",), sub="triage-engine")
            body = {
                "case_type": "clinical-review",
                "case_id": "UC-5.1",
                "focus": "Encounter/e51",
                "priority": "urgent",
            }
            r = await http.post("/api/v1/review/cases", json=body, headers=triage)
            assert r.status_code == 201, r.text
            case = r.json()
            cid = case["id"]
            assert case["assignee"] == r1
            reasons = {c["practitioner"]: c["reasons"] for c in case["assignment"]["considered"]}
            assert reasons[f"Practitioner/{r2}"] == [
                f"credential MD expired on {(today - timedelta(days=1)).isoformat()}"
            ]
            assert reasons[f"Practitioner/{r3}"] == ["not on shift now"]

            # the reviewer takes it and submits findings without a signature: escalated, queued
            reviewer = auth_headers(engine, roles=("reviewer",), employee_id=r1, sub="rev-u1")
            r = await http.post(
                f"/api/v1/review/{cid}/transitions", json={"to": "in-review"}, headers=reviewer
            )
            assert r.status_code == 200, r.text
            r = await http.post(f"/api/v1/review/{cid}/findings", json=FINDINGS, headers=reviewer)
            assert r.status_code == 201, r.text
            assert r.json()["state"] == "escalated"
            assert [(v["policy"], v["severity"]) for v in r.json()["violations"]] == [
                ("signature-required", "error")
            ]
            supervisor = auth_headers(engine, roles=("supervisor",), sub="sup-u")
            r = await http.get("/api/v1/review/queue", headers=supervisor)
            assert r.status_code == 200, r.text
            assert [c["id"] for c in r.json()["items"]] == [cid]
            assert (await http.get("/api/v1/review/queue", headers=reviewer)).status_code == 403

            # signed, the findings resolve the case
            r = await http.post(f"/api/v1/review/{cid}/sign", headers=reviewer)
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "resolved" and r.json()["violations"] == []
            r = await http.get(f"/api/v1/review/{cid}/signatures", headers=reviewer)
            assert [s["valid"] for s in r.json()["items"]] == [True]

            # the audit log: every action, in order; the audit entry of the creation says why
            auditor = auth_headers(engine, roles=("auditor",), sub="aud-u")
            url = f"/api/v1/review/{cid}/audit-log"
            r = await http.get(url, headers=auditor)
            assert r.status_code == 200, r.text
            log = r.json()
            assert log["integrity"]["intact"] is True
            changes = [
                (e["action"], e["actor"], e["detail"]) for e in log["entries"] if e["action"] != "read"
            ]
            task_changes = [c for c in changes if c[0] in ("created", "state-changed")]
            assert task_changes == [
                ("created", "triage-engine", f"triage, assigned to Practitioner/{r1}"),
                ("state-changed", "rev-u1", "triage -> in-review"),
                ("state-changed", "rev-u1", "in-review -> escalated"),
                ("state-changed", "rev-u1", "escalated -> resolved"),
            ]
            order = [c[0] for c in changes]
            assert order.index("findings") < order.index("signed") < len(order) - 1
            assert [e["at"] for e in log["entries"]] == sorted(e["at"] for e in log["entries"])
            r = await http.get("/api/v1/audit", params={"entity": f"Task/{cid}"}, headers=auditor)
            trail = str(r.json()["items"])
            assert f"Passed over Practitioner/{r2}: credential MD expired" in trail
            assert f"Passed over Practitioner/{r3}: not on shift now" in trail

            # its PDF renders the same entries in the same order
            r = await http.get(url, headers={**auditor, "accept": "application/pdf"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
            text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(r.content)).pages)
            marks = [detail for _, _, detail in task_changes]
            at = [text.find(m) for m in marks]
            assert -1 not in at and at == sorted(at), (marks, at)

            # everything over FHIR too: fhirpy creates a Task, finds it by owner and status, and reads
            # the case's findings
            client = AsyncFHIRClient(
                f"http://127.0.0.1:{engine.http_port}/fhir",
                authorization=admin["authorization"],
                extra_headers={"Accept": "application/fhir+json"},
            )
            task = client.resource(
                "Task",
                identifier=[{"system": "urn:test:task", "value": "T-51"}],
                status="in-progress",
                intent="order",
                owner={"reference": f"Practitioner/{r1}"},
                description="Call the ward about the missing notes",
            )
            await task.save()
            found = (
                await client.resources("Task")
                .search(owner=f"Practitioner/{r1}", status="in-progress")
                .fetch()
            )
            assert [t["id"] for t in found] == [task["id"]]
            stored = (await http.get(f"/fhir/Task/{cid}", headers=admin)).json()
            (output,) = stored["output"]
            qr_id = output["valueReference"]["reference"].split("/", 1)[1]
            qr = await client.reference("QuestionnaireResponse", qr_id).to_resource()
            content = qr.serialize()  # type: ignore[no-untyped-call]
            assert content["questionnaire"] == "Questionnaire/clinical-review-findings"
            assert content["author"] == {"reference": f"Practitioner/{r1}"}

        # the signed webhooks: created, assigned, ..., escalated, ..., resolved
        await wait_for(lambda: "case.resolved" in receiver.names(), timeout=60)
        assert receiver.bad_signatures == 0
        names = receiver.names()
        assert names[:2] == ["case.created", "case.assigned"]
        assert names.index("case.escalated") < names.index("case.signed") < names.index("case.resolved")
    finally:
        await engine.stop()
        await receiver.stop()
