"""Complaints end to end (issue 18, PROTECTION), on SQLite and PostgreSQL.

Two complaints officers are on shift: one in the privacy office, one in the billing office. A
privacy complaint POSTed to /api/v1/complaints is routed by its category to PRIVACY and given to
that department's officer (the other is passed over for their department); the complainant's
acknowledgement reaches a real SMTP server on loopback (aiosmtpd) at their address; the officer
resolves it and the complainant gets the notice. The complaint events reach a signed webhook on
loopback. Neither the engine's log nor any event payload holds the complainant's name or address.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.store import outbox
from hms_ach.store.db import Store
from hms_ach.workforce.rules import DEPARTMENT_EXT
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, basic_shift, nurse, start_engine
from tests.integration.notify_helpers import SmtpServer
from tests.integration.outbound_helpers import SECRET, Receiver, wait_for

pytestmark = pytest.mark.timeout(240)

NAME = "Eleanor Vance"
MAIL = "eleanor.vance@example.org"
OTHER_NAME = "Walter Brandt"
OTHER_MAIL = "walter.brandt@example.org"
OTHER_PHONE = "+44 20 7946 0018"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _config(smtp: SmtpServer, hook: str) -> str:
    return (
        "  - name: fhir_in\n    type: fhir_rest\n"
        "sinks:\n"
        "  - name: people\n    type: notify\n    channel: email\n"
        f"    templates_dir: mappings/notifications\n    smtp_host: 127.0.0.1\n    smtp_port: {smtp.port}\n"
        "    smtp_security: none\n    from_address: complaints@hospital.test\n"
        "    events: ['complaint.*']\n    retry_initial_seconds: 0.05\n"
        f"  - name: complaint_hook\n    type: webhook\n    url: {hook}\n    secret: {SECRET}\n"
        "    events: ['complaint.*']\n"
    )


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


async def _create(http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]) -> str:
    r = await http.post(f"/fhir/{body['resourceType']}", json=body, headers={**headers, **FHIR_JSON})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _officer(http: httpx.AsyncClient, headers: dict[str, str], number: str, department: str) -> str:
    """A complaints officer of ``department``, on shift now."""
    body = nurse(number, family=f"Officer{number}")
    body["extension"] = [{"url": DEPARTMENT_EXT, "valueString": department}]
    pid = await _create(http, body, headers)
    role = {
        "resourceType": "PractitionerRole",
        "identifier": [{"system": "urn:hms-ach:id:role", "value": f"{number}-complaints"}],
        "active": True,
        "practitioner": {"reference": f"Practitioner/{pid}"},
        "code": [{"coding": [{"system": "urn:hms-ach:code:case-role", "code": "complaints-officer"}]}],
    }
    await _create(http, role, headers)
    start = datetime.now(UTC) - timedelta(hours=1)
    await _create(
        http, basic_shift(f"S-{number}", pid, _iso(start), _iso(start + timedelta(hours=8))), headers
    )
    return pid


def _officer_headers(engine: Engine, pid: str, department: str) -> dict[str, str]:
    return auth_headers(engine, roles=("complaints-officer",), employee_id=pid, departments=(department,))


async def test_a_complaint_is_routed_acknowledged_and_resolved(
    tmp_path: Path, store: Store, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hms_ach")
    receiver = Receiver()
    engine = await start_engine(tmp_path, store, _config(smtp, await receiver.start()))
    try:
        admin = auth_headers(engine)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            privacy = await _officer(http, admin, "C1", "PRIVACY")
            billing = await _officer(http, admin, "C2", "BILLING-OFFICE")
            patient = await _create(
                http,
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:example:mrn", "value": "MRN-77"}],
                    "name": [{"family": "Vance", "given": ["Theo"]}],
                },
                admin,
            )
            intake = auth_headers(engine, roles=("integration",))
            body = {
                "complaint_id": "CMP-100",
                "category": "privacy",
                "description": "My son's results were read aloud in the waiting room.",
                "complainant": {"name": NAME, "email": MAIL, "preferred": "email"},
                "patient": f"Patient/{patient}",
                "occurred_at": "2026-12-01T10:30:00Z",
            }
            r = await http.post("/api/v1/complaints", json=body, headers=intake)
            assert r.status_code == 201, r.text
            complaint = r.json()
            cid = complaint["id"]
            assert r.headers["location"] == f"/api/v1/complaints/{cid}"
            assert (complaint["complaint_id"], complaint["category"], complaint["department"]) == (
                "CMP-100",
                "privacy",
                "PRIVACY",
            )
            assert (complaint["state"], complaint["status"], complaint["priority"]) == (
                "logged",
                "received",
                "asap",
            )
            assert complaint["assignee"] == privacy  # the officer of the department of its category
            assert complaint["due"] is not None
            assert complaint["complainant"].startswith("RelatedPerson/")
            reasons = {c["practitioner"]: c["reasons"] for c in complaint["assignment"]["considered"]}
            assert reasons == {
                f"Practitioner/{privacy}": [],
                f"Practitioner/{billing}": ["not in department PRIVACY"],
            }
            assert NAME not in r.text and MAIL not in r.text

            # sent again: the stored complaint, nothing new
            again = await http.post("/api/v1/complaints", json=body, headers=intake)
            assert again.status_code == 200 and again.json()["id"] == cid

            # the complainant is a record of its own (over FHIR, audited), the Task's requester
            r = await http.get(f"/fhir/{complaint['complainant']}", headers=admin)
            assert r.status_code == 200, r.text
            person = r.json()
            assert (
                person["name"][0]["text"] == NAME and person["patient"]["reference"] == f"Patient/{patient}"
            )
            assert {"system": "email", "value": MAIL, "rank": 1} in person["telecom"]
            r = await http.get(f"/fhir/Task/{cid}", headers=admin)
            task = r.json()
            assert task["requester"]["reference"] == complaint["complainant"]
            assert task["for"]["reference"] == f"Patient/{patient}"
            assert NAME not in r.text and MAIL not in r.text

            # the acknowledgement reaches the complainant
            await wait_for(lambda: len(smtp.mailbox.to(MAIL)) == 1, timeout=60)
            ack = smtp.mailbox.to(MAIL)[0]
            assert ack["Subject"] == "We have received your complaint CMP-100"
            text = ack.get_body(("plain",))
            assert text is not None and text.get_content().startswith(f"Dear {NAME},")

            # who sees it: its department's officer and a supervisor; another department's officer not
            own = _officer_headers(engine, privacy, "PRIVACY")
            other = _officer_headers(engine, billing, "BILLING-OFFICE")
            supervisor = auth_headers(engine, roles=("supervisor",))
            assert (await http.get(f"/api/v1/complaints/{cid}", headers=own)).json()["state"] == "logged"
            r = await http.get(f"/api/v1/complaints/{cid}", headers=other)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
            r = await http.get("/api/v1/complaints", params={"department": "PRIVACY"}, headers=supervisor)
            assert [c["id"] for c in r.json()["items"]] == [cid]
            assert (await http.get("/api/v1/complaints", headers=other)).json()["items"] == []
            r = await http.get("/api/v1/complaints", params={"status": "resolved"}, headers=supervisor)
            assert r.json()["items"] == []

            # a facilities complaint: nobody in FACILITIES is on shift, so it is queued; its
            # complainant prefers sms, so the e-mail sink does not write to them
            second = {
                "complaint_id": "CMP-101",
                "category": "facilities",
                "description": "The lift on level 2 has been out of order for a week.",
                "complainant": {
                    "name": OTHER_NAME,
                    "email": OTHER_MAIL,
                    "phone": OTHER_PHONE,
                    "preferred": "sms",
                },
            }
            r = await http.post("/api/v1/complaints", json=second, headers=own)
            assert r.status_code == 201, r.text
            queued = r.json()
            assert (queued["department"], queued["assignee"], queued["priority"]) == (
                "FACILITIES",
                None,
                "routine",
            )
            assert queued["complainant"].startswith("Patient/")  # about no patient: a Patient of their own

            # resolution: not by another department's officer; by the complaint's officer, through
            # investigating to resolved, once
            resolution = {"resolution": "Staff retrained on discussing results in private.", "upheld": True}
            r = await http.post(f"/api/v1/complaints/{cid}/resolve", json=resolution, headers=other)
            assert r.status_code == 403, r.text
            r = await http.post(f"/api/v1/complaints/{cid}/resolve", json=resolution, headers=own)
            assert r.status_code == 200, r.text
            resolved = r.json()
            assert (resolved["state"], resolved["status"], resolved["upheld"]) == (
                "resolved",
                "completed",
                True,
            )
            assert resolved["due"] is None and resolved["resolution"].startswith("QuestionnaireResponse/")
            r = await http.post(f"/api/v1/complaints/{cid}/resolve", json=resolution, headers=own)
            assert r.status_code == 409 and "resolved" in r.json()["detail"]

            qr = (await http.get(f"/fhir/{resolved['resolution']}", headers=admin)).json()
            assert qr["questionnaire"] == "Questionnaire/complaint-resolution"
            assert qr["author"]["reference"] == f"Practitioner/{privacy}"
            assert {
                "url": "urn:hms-ach:fhir:StructureDefinition/case",
                "valueReference": {"reference": f"Task/{cid}"},
            } in qr["extension"]
            assert [i["answer"][0] for i in qr["item"]] == [
                {"valueString": resolution["resolution"]},
                {"valueBoolean": True},
            ]
            history = (await http.get(f"/fhir/Task/{cid}/_history", headers=admin)).json()
            states = [e["resource"]["businessStatus"]["coding"][0]["code"] for e in history["entry"]]
            assert sorted(states) == ["investigating", "logged", "resolved"]

            # the notice reaches the complainant
            await wait_for(lambda: len(smtp.mailbox.to(MAIL)) == 2, timeout=60)
            notice = smtp.mailbox.to(MAIL)[1]
            assert notice["Subject"] == "Your complaint CMP-100 has been resolved"
            text = notice.get_body(("plain",))
            assert text is not None and "justified (upheld)" in text.get_content()

        # the events, at the signed webhook: references and codes, never the complainant
        expected = ["complaint.logged", "complaint.routed", "complaint.acknowledged"] * 2 + [
            "complaint.resolved"
        ]
        await wait_for(lambda: len(receiver.events) >= len(expected), timeout=60)
        assert receiver.bad_signatures == 0
        assert receiver.names() == expected
        routed = receiver.events[1]["data"]
        assert (routed["department"], routed["owner"], routed["category"]) == (
            "PRIVACY",
            f"Practitioner/{privacy}",
            "privacy",
        )
        assert receiver.events[4]["data"]["owner"] is None
        done = receiver.events[6]["data"]
        assert (done["upheld"], done["resolution"], done["complaint"]) == (
            True,
            resolved["resolution"],
            "CMP-100",
        )
        payloads = str(receiver.events)
        for secret in (NAME, MAIL, OTHER_NAME, OTHER_MAIL, OTHER_PHONE, "waiting room", "retrained"):
            assert secret not in payloads

        # the sms-preferring complainant got no e-mail; the sink says why, without the address
        def acknowledged() -> list[dict[str, Any]]:
            with store.read() as conn:
                rows = outbox.list_rows(conn, destination="people")
            return [r for r in rows if r["event"] == "complaint.acknowledged" and r["status"] == "delivered"]

        await wait_for(lambda: len(acknowledged()) == 2, timeout=60)
        assert not smtp.mailbox.to(OTHER_MAIL)
        responses = [str(r["response"]) for r in acknowledged()]
        assert any("requester (prefers sms)" in text for text in responses)
        assert not any(OTHER_MAIL in text or MAIL in text for text in responses)
    finally:
        await engine.stop()
        await receiver.stop()
    logged = [str(r.__dict__) for r in caplog.records if r.name.startswith("hms_ach")]
    assert any("complaint.logged" in line for line in logged)
    for secret in (NAME, MAIL, OTHER_NAME, OTHER_MAIL, OTHER_PHONE):
        assert not any(secret in line for line in logged), secret


async def test_bad_complaints_are_422_problems(tmp_path: Path, store: Store, smtp: SmtpServer) -> None:
    receiver = Receiver()
    engine = await start_engine(tmp_path, store, _config(smtp, await receiver.start()))
    try:
        headers = auth_headers(engine, roles=("integration",))
        good = {
            "category": "billing",
            "description": "Charged twice for one visit.",
            "complainant": {"name": "A Person", "email": "a.person@example.org"},
        }
        cases: list[tuple[dict[str, Any], str]] = [
            ({**good, "category": "parking"}, "body.category"),
            ({**good, "complainant": {"name": "A Person"}}, "body.complainant"),
            (
                {**good, "complainant": {"name": "A Person", "email": "not-an-address"}},
                "body.complainant.email",
            ),
            (
                {**good, "complainant": {"name": "A Person", "email": "a@example.org", "preferred": "sms"}},
                "body.complainant",
            ),
            ({**good, "patient": "Encounter/1"}, "body.patient"),
            ({**good, "patient": "Patient/not-stored"}, "body.patient"),
            ({**good, "priority": "soon"}, "body.priority"),
            ({**good, "occurred_at": "2026-12-01T10:30:00"}, "body"),
            ({**good, "description": ""}, "body.description"),
        ]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            for body, location in cases:
                r = await http.post("/api/v1/complaints", json=body, headers=headers)
                assert r.status_code == 422, (body, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert location in [e["location"] for e in r.json()["errors"]], (body, r.json())
            r = await http.post(
                "/api/v1/complaints/nope/resolve",
                json={"resolution": "x", "upheld": False},
                headers=auth_headers(engine, roles=("supervisor",)),
            )
            assert r.status_code == 404, r.text
            r = await http.post(
                "/api/v1/complaints/nope/resolve",
                json={"resolution": "x"},
                headers=auth_headers(engine, roles=("supervisor",)),
            )
            assert r.status_code == 422, r.text
            # without a role for it: 403; the integration role may log but not resolve
            r = await http.post(
                "/api/v1/complaints", json=good, headers=auth_headers(engine, roles=("reviewer",))
            )
            assert r.status_code == 403
            r = await http.post(
                "/api/v1/complaints/x/resolve", json={"resolution": "x", "upheld": True}, headers=headers
            )
            assert r.status_code == 403
            # nothing was logged
            r = await http.get("/api/v1/complaints", headers=headers)
            assert r.json()["items"] == []
    finally:
        await engine.stop()
        await receiver.stop()
