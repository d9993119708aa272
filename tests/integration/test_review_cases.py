"""Review cases end to end (issue 18, the start of REVIEW use case 5.1), on SQLite and PostgreSQL.

Three reviewers hold the ``reviewer`` role: one with a valid MD licence on shift, one whose licence
expired, one whose shift starts later. A case POSTed to /api/v1/review/cases goes to the first; the
case's audit entry says why the others were passed over; a signed ``case.assigned`` webhook reaches
a loopback receiver; fhirpy finds the Task by owner and status. A case no one qualifies for is
queued and announced ``case.unassigned``.
"""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.task import Task as R4BTask
from fhirpy import AsyncFHIRClient

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from hms_ach.workforce.rules import CREDENTIAL_SYSTEM
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers, basic_shift, nurse
from tests.integration.outbound_helpers import SECRET, Receiver, wait_for

pytestmark = pytest.mark.timeout(240)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _reviewer(number: str, licence_end: date) -> dict[str, Any]:
    licence = {
        "identifier": [{"value": f"MD-{number}"}],
        "code": {"coding": [{"system": CREDENTIAL_SYSTEM, "code": "MD"}]},
        "period": {"start": "2020-01-01", "end": licence_end.isoformat()},
    }
    return nurse(number, family=f"Reviewer{number}", qualification=[licence])


async def add_reviewer(
    http: httpx.AsyncClient, admin: dict[str, str], number: str, licence_end: date, shift_start: datetime
) -> str:
    """Over FHIR: a Practitioner with an MD licence until ``licence_end``, the reviewer role and an
    8-hour shift from ``shift_start``; its id."""
    r = await http.post(
        "/fhir/Practitioner", json=_reviewer(number, licence_end), headers={**admin, **FHIR_JSON}
    )
    assert r.status_code == 201, r.text
    pid = str(r.json()["id"])
    role = {
        "resourceType": "PractitionerRole",
        "identifier": [{"system": "urn:hms-ach:id:role", "value": f"{number}-reviewer"}],
        "active": True,
        "practitioner": {"reference": f"Practitioner/{pid}"},
        "code": [{"coding": [{"system": "urn:hms-ach:code:case-role", "code": "reviewer"}]}],
    }
    r = await http.post("/fhir/PractitionerRole", json=role, headers={**admin, **FHIR_JSON})
    assert r.status_code == 201, r.text
    shift = basic_shift(f"S-{number}", pid, _iso(shift_start), _iso(shift_start + timedelta(hours=8)))
    r = await http.post("/fhir/Basic", json=shift, headers={**admin, **FHIR_JSON})
    assert r.status_code == 201, r.text
    return pid


async def _engine(tmp_path: Path, store: Store, hook: str) -> Engine:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n"
        "sinks:\n"
        f"  - name: review_hook\n    type: webhook\n    url: {hook}\n    secret: {SECRET}\n"
        "    events: ['case.*']\n"
    )
    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await engine.start()
    return engine


async def test_a_case_goes_to_the_one_qualified_reviewer_and_is_announced(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    engine = await _engine(tmp_path, store, await receiver.start())
    try:
        base = f"http://127.0.0.1:{engine.http_port}"
        admin = auth_headers(engine)
        now = datetime.now(UTC)
        today = now.date()
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            ids: dict[str, str] = {}
            for number, licence_end, start in (
                ("R1", today + timedelta(days=365), now - timedelta(hours=2)),  # qualifies
                ("R2", today - timedelta(days=3), now - timedelta(hours=2)),  # licence expired
                ("R3", today + timedelta(days=365), now + timedelta(hours=3)),  # off shift now
            ):
                ids[number] = await add_reviewer(http, admin, number, licence_end, start)

            supervisor = auth_headers(engine, roles=("supervisor",))
            body = {
                "case_type": "clinical-review",
                "case_id": "REV-1",
                "focus": "Encounter/enc-1",
                "priority": "urgent",
            }
            r = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert r.status_code == 201, r.text
            case = r.json()
            assert case["assignee"] == ids["R1"]
            assert (case["case_type"], case["state"], case["status"]) == (
                "clinical-review",
                "triage",
                "ready",
            )
            assert case["due"] is not None and case["overdue"] is False
            reasons = {c["practitioner"]: c["reasons"] for c in case["assignment"]["considered"]}
            assert reasons[f"Practitioner/{ids['R1']}"] == []
            assert reasons[f"Practitioner/{ids['R2']}"] == [
                f"credential MD expired on {(today - timedelta(days=3)).isoformat()}"
            ]
            assert reasons[f"Practitioner/{ids['R3']}"] == ["not on shift now"]

            # sent again: the stored case, nobody assigned again
            again = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert again.status_code == 200 and again.json()["id"] == case["id"]

            # the case's audit entry explains the choice
            auditor = auth_headers(engine, roles=("auditor",))
            r = await http.get("/api/v1/audit", params={"entity": f"Task/{case['id']}"}, headers=auditor)
            assert r.status_code == 200, r.text
            (entry,) = r.json()["items"]
            trail = str(entry)
            assert f"assigned to Practitioner/{ids['R1']}: the only qualified reviewer" in trail
            assert f"Passed over Practitioner/{ids['R2']}: credential MD expired" in trail
            assert f"Passed over Practitioner/{ids['R3']}: not on shift now" in trail

            # a case only reviewers of another department may take: queued
            queued = {**body, "case_id": "REV-2", "department": "CARDIOLOGY", "priority": "stat"}
            r = await http.post("/api/v1/review/cases", json=queued, headers=supervisor)
            assert r.status_code == 201, r.text
            assert r.json()["assignee"] is None
            assert r.json()["assignment"]["explanation"].startswith("queued: none of the 3")

            # the lists: by assignee and state, by overdue, a reviewer sees their own cases only
            r = await http.get(
                "/api/v1/review/cases", params={"assignee": ids["R1"], "status": "triage"}, headers=supervisor
            )
            assert [c["case_id"] for c in r.json()["items"]] == ["REV-1"]
            r = await http.get("/api/v1/review/cases", params={"overdue": "true"}, headers=supervisor)
            assert r.json()["items"] == []
            own = auth_headers(engine, roles=("reviewer",), employee_id=ids["R1"])
            r = await http.get("/api/v1/review/cases", headers=own)
            assert [c["case_id"] for c in r.json()["items"]] == ["REV-1"]
            other = auth_headers(engine, roles=("reviewer",), employee_id=ids["R2"])
            assert (await http.get("/api/v1/review/cases", headers=other)).json()["items"] == []
            # a reviewer may not open cases; an unknown case type is a problem naming the field
            r = await http.post("/api/v1/review/cases", json=body, headers=own)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
            r = await http.post("/api/v1/review/cases", json={**body, "case_type": "x"}, headers=supervisor)
            assert r.status_code == 422 and r.json()["errors"][0]["location"] == "body.case_type"

        # the signed webhooks (the receiver checks every signature)
        await wait_for(lambda: len(receiver.events) >= 4, timeout=60)
        assert receiver.bad_signatures == 0
        assert receiver.names() == ["case.created", "case.assigned", "case.created", "case.unassigned"]
        assigned = receiver.events[1]["data"]
        assert assigned["resource"] == f"Task/{case['id']}"
        assert assigned["owner"] == f"Practitioner/{ids['R1']}"
        assert receiver.events[3]["data"]["considered"] == 3

        # over FHIR: fhirpy finds the Task by owner and status, and it is a valid R4 Task
        client = AsyncFHIRClient(
            f"{base}/fhir",
            authorization=admin["authorization"],
            extra_headers={"Accept": "application/fhir+json"},
        )
        tasks = (
            await client.resources("Task").search(owner=f"Practitioner/{ids['R1']}", status="ready").fetch()
        )
        assert [t["id"] for t in tasks] == [case["id"]]
        R4BTask.model_validate(tasks[0].serialize())  # type: ignore[no-untyped-call]
        assert not await client.resources("Task").search(owner=f"Practitioner/{ids['R2']}").fetch()
    finally:
        await engine.stop()
        await receiver.stop()
