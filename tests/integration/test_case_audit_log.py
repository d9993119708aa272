"""A review case's audit log (GET /api/v1/review/{caseId}/audit-log), on SQLite and PostgreSQL.

A case is opened over the API and assigned to the one qualified reviewer, moved to in-review by
them (``transitions.move`` through the writer), answered with findings over FHIR and resolved by a
supervisor. Its audit log lists those changes in order with who made them, says the trails are
intact, lists its own earlier read (the access log), renders the same entries in a PDF (read back
with pypdf), and is refused to a reviewer who does not own the case.
"""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader
from sqlalchemy import text

from hms_ach.app.runtime import Engine
from hms_ach.cases.audit_log import CASE_EXT
from hms_ach.cases.transitions import move, write_case
from hms_ach.cases.workflow import workflows
from hms_ach.core.records import RecordWrite
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.workforce.rules import CREDENTIAL_SYSTEM
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, basic_shift, nurse, start_engine
from tests.integration.review_writes import reviewer_role, write_as

pytestmark = pytest.mark.timeout(240)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _move(engine: Engine, task_id: str, to: str, sub: str, actor: str, roles: tuple[str, ...]) -> None:
    wf = workflows(engine.pipeline.engine.mset)["clinical-review"]

    def work(tx: Tx, message_id: int) -> None:
        task = wq.get_record(tx, "Task", task_id) or {}
        move(tx, wf, task, to, actor=actor, now=datetime.now(UTC), message_id=message_id, roles=roles)

    await write_as(engine, sub, f"move_to_{to}", work)


async def _submit_findings(engine: Engine, task_id: str, focus: str, author: str) -> str:
    """Findings as the contract shapes them (docs/review-cases.md): a QuestionnaireResponse with
    the case extension, named in the Task's output, written in one request of the reviewer."""

    def work(tx: Tx, message_id: int) -> str:
        content: dict[str, Any] = {
            "identifier": {"system": "urn:hms-ach:id:findings", "value": f"F-{task_id}"},
            "status": "completed",
            "questionnaire": "Questionnaire/clinical-review-findings",
            "subject": {"reference": focus},
            "author": {"reference": author},
            "authored": _iso(datetime.now(UTC)),
            "extension": [{"url": CASE_EXT, "valueReference": {"reference": f"Task/{task_id}"}}],
        }
        rec = RecordWrite(
            "findings", "QuestionnaireResponse", "urn:hms-ach:id:findings", f"F-{task_id}", content
        )
        out = Repository(tx).upsert(rec, content, message_id)
        assert out is not None
        task = wq.get_record(tx, "Task", task_id) or {}
        task["output"] = [{"type": {"text": "findings"}, "valueReference": {"reference": out.reference}}]
        write_case(tx, task, message_id)
        return out.reference

    return await write_as(engine, "rev-a1", "findings", work)


async def test_the_audit_log_lists_every_action_in_order_and_renders_a_pdf(
    tmp_path: Path, store: Store
) -> None:
    engine = await start_engine(tmp_path, store, "  - name: fhir_in\n    type: fhir_rest\n")
    try:
        admin = {**auth_headers(engine), **FHIR_JSON}
        now = datetime.now(UTC)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            ids: dict[str, str] = {}
            licence = {
                "code": {"coding": [{"system": CREDENTIAL_SYSTEM, "code": "MD"}]},
                "period": {"start": "2020-01-01", "end": (now.date() + timedelta(days=365)).isoformat()},
            }
            for number in ("A1", "A2"):
                r = await http.post(
                    "/fhir/Practitioner", json=nurse(number, qualification=[licence]), headers=admin
                )
                assert r.status_code == 201, r.text
                ids[number] = r.json()["id"]
            # only A1 holds the role and is on shift: the case goes to A1
            r = await http.post("/fhir/PractitionerRole", json=reviewer_role("A1", ids["A1"]), headers=admin)
            assert r.status_code == 201, r.text
            shift = basic_shift(
                "S-A1", ids["A1"], _iso(now - timedelta(hours=1)), _iso(now + timedelta(hours=7))
            )
            assert (await http.post("/fhir/Basic", json=shift, headers=admin)).status_code == 201

            encounter = {
                "resourceType": "Encounter",
                "identifier": [{"system": "urn:test:encounter", "value": "ENC-9"}],
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            }
            r = await http.post("/fhir/Encounter", json=encounter, headers=admin)
            assert r.status_code == 201, r.text
            focus = f"Encounter/{r.json()['id']}"

            supervisor = auth_headers(engine, roles=("supervisor",), sub="sup-1")
            body = {"case_type": "clinical-review", "case_id": "AUD-1", "focus": focus}
            r = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert r.status_code == 201, r.text
            case = r.json()
            task_id, a1 = case["id"], f"Practitioner/{ids['A1']}"
            assert case["assignee"] == ids["A1"]

            await _move(engine, task_id, "in-review", "rev-a1", a1, ("reviewer",))
            qr = await _submit_findings(engine, task_id, focus, a1)
            await _move(engine, task_id, "resolved", "sup-1", "supervisor", ("supervisor",))

            auditor = auth_headers(engine, roles=("auditor",), sub="aud-1")
            url = f"/api/v1/review/{task_id}/audit-log"
            r = await http.get(url, headers=auditor)
            assert r.status_code == 200, r.text
            log = r.json()
            assert log["case"] == f"Task/{task_id}" and log["case_id"] == "AUD-1"
            assert log["integrity"]["intact"] is True
            changes = [
                (e["action"], e["resource"], e["version"], e["actor"], e["detail"])
                for e in log["entries"]
                if e["action"] != "read"
            ]
            assert changes == [
                ("created", f"Task/{task_id}", 1, "sup-1", f"triage, assigned to {a1}"),
                ("state-changed", f"Task/{task_id}", 2, "rev-a1", "triage -> in-review"),
                ("findings", qr, 1, "rev-a1", "status completed"),
                ("findings", f"Task/{task_id}", 3, "rev-a1", f"output {qr}"),
                ("state-changed", f"Task/{task_id}", 4, "sup-1", "in-review -> resolved"),
            ]
            stamps = [e["at"] for e in log["entries"]]
            assert stamps == sorted(stamps)

            # the first read of the audit log is itself in it (the access log), by its caller
            def read_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [e for e in entries if e["action"] == "read" and e["actor"] == "aud-1"]

            latest: list[dict[str, Any]] = []

            async def poll() -> bool:
                latest[:] = (await http.get(url, headers=auditor)).json()["entries"]
                return bool(read_of(latest))

            deadline = datetime.now(UTC) + timedelta(seconds=30)
            while not await poll():
                assert datetime.now(UTC) < deadline, "the read never reached the access log"
                await asyncio.sleep(0.1)
            (first_read, *_) = read_of(latest)
            assert first_read["detail"] == f"read {url} -> 200"
            assert latest[-1]["action"] == "read"  # after every change

            # the PDF: the same entries, in the same order
            r = await http.get(url, headers={**auditor, "accept": "application/pdf"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
            pdf_text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(r.content)).pages)
            assert "Audit log of case AUD-1" in pdf_text and "intact" in pdf_text
            marks = [
                f"triage, assigned to {a1}",
                "triage -> in-review",
                "status completed",
                f"output {qr}",
                "in-review -> resolved",
                f"read {url} -> 200",
            ]
            places = [pdf_text.find(m) for m in marks]
            assert all(p >= 0 for p in places), (places, pdf_text)
            assert places == sorted(places)

            # a reviewer sees the log of their own case only; an unknown case is a 404
            own = auth_headers(engine, roles=("reviewer",), employee_id=ids["A1"])
            assert (await http.get(url, headers=own)).status_code == 200
            other = auth_headers(engine, roles=("reviewer",), employee_id=ids["A2"])
            r = await http.get(url, headers=other)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
            r = await http.get("/api/v1/review/no-such-case/audit-log", headers=auditor)
            assert r.status_code == 404

            # an edited entry of the trail: the log says where the chain breaks, as audit verify does
            with store.transaction() as tx:
                seq = tx.execute(
                    text("SELECT seq FROM audit_entry WHERE entity_id = :id AND version_id = 2"),
                    {"id": task_id},
                ).scalar_one()
                tx.execute(text("UPDATE audit_entry SET agent = 'mallory' WHERE seq = :seq"), {"seq": seq})
            integrity = (await http.get(url, headers=auditor)).json()["integrity"]
            assert (integrity["intact"], integrity["problem"], integrity["broken_at"]) == (
                False,
                "edited",
                seq,
            )
    finally:
        await engine.stop()
