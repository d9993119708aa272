"""The /api/v1 workforce API against a running engine: employees, credentials, shifts (overlaps,
swaps), timecards (overtime), compliance status, problem details and paging."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers


@pytest.fixture
async def api(fhir_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}", timeout=30, headers=auth_headers(fhir_engine)
    ) as client:
        yield client


def employee(number: str, department: str = "4 West nursing", **extra: Any) -> dict[str, Any]:
    soon = (datetime.now(UTC).date() + timedelta(days=10)).isoformat()
    return {
        "employee_number": number,
        "family": f"Staff{number}",
        "given": ["Test"],
        "gender": "female",
        "department": department,
        "credentials": [
            {
                "type": "RN",
                "number": f"RN-{number}",
                "issuer": "State Board of Nursing",
                "state": "CA",
                "valid_from": "2024-01-01",
                "valid_to": soon,
                "verification_status": "verified",
                "verification_source": "Nursys",
            },
            {"type": "BLS", "number": f"BLS-{number}", "valid_to": "2020-01-01"},
        ],
        **extra,
    }


def problem(resp: httpx.Response, status: int, location: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if location:
        assert location in [e["location"] for e in body.get("errors", [])], body
    return body


async def test_employees_credentials_and_paging(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/v1/employees", json=employee("E100"))
    assert resp.status_code == 201, resp.text
    emp = resp.json()
    assert emp["department"] == "4 West nursing" and len(emp["credentials"]) == 2
    again = await api.post("/api/v1/employees", json=employee("E100"))
    assert again.status_code == 200 and again.json()["id"] == emp["id"]
    for n in range(101, 104):
        assert (await api.post("/api/v1/employees", json=employee(f"E{n}", "Pharmacy"))).status_code == 201

    page1 = (await api.get("/api/v1/employees", params={"limit": 3})).json()
    page2 = (await api.get("/api/v1/employees", params={"limit": 3, "cursor": page1["next_cursor"]})).json()
    assert len(page1["items"]) == 3 and len(page2["items"]) == 1 and page2["next_cursor"] is None
    assert len({e["id"] for e in page1["items"] + page2["items"]}) == 4

    upd = employee("E100", active=False)
    resp = await api.put(f"/api/v1/employees/{emp['id']}", json=upd, headers={"If-Match": 'W/"1"'})
    assert resp.status_code == 200, resp.text
    problem(await api.put(f"/api/v1/employees/{emp['id']}", json=upd, headers={"If-Match": 'W/"1"'}), 412)
    problem(await api.put("/api/v1/employees/unknown", json=upd), 404)
    problem(await api.post("/api/v1/employees", json={"family": "X"}), 422, "body.employee_number")
    problem(await api.get("/api/v1/employees", params={"limit": 0}), 422, "query.limit")

    soon = (await api.get("/api/v1/credentials", params={"expiring_within_days": 30})).json()
    assert {c["number"] for c in soon["items"]} == {"RN-E101", "RN-E102", "RN-E103", "RN-E100"}
    # the FHIR view of the same employee
    fhir = (await api.get(f"/fhir/Practitioner/{emp['id']}")).json()
    assert fhir["qualification"][0]["identifier"][0]["value"] == "RN-E100"


async def test_shifts_swaps_timecards_and_compliance(api: httpx.AsyncClient) -> None:
    a = (await api.post("/api/v1/employees", json=employee("E200"))).json()
    b = (await api.post("/api/v1/employees", json=employee("E201"))).json()
    day = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0) + timedelta(days=2)

    def shift(emp: str | None, start: datetime, hours: int = 12, **extra: Any) -> dict[str, Any]:
        return {
            "employee_id": emp,
            "department": "4 West nursing",
            "role": "RN",
            "start": start.isoformat(),
            "end": (start + timedelta(hours=hours)).isoformat(),
            **extra,
        }

    s1 = await api.post("/api/v1/shifts", json=shift(a["id"], day))
    assert s1.status_code == 201, s1.text
    problem(
        await api.post("/api/v1/shifts", json=shift(a["id"], day + timedelta(hours=6))), 422, "body.start"
    )
    problem(await api.post("/api/v1/shifts", json=shift(a["id"], day, hours=-1)), 422, "body.end")
    assert (await api.post("/api/v1/shifts", json=shift(None, day + timedelta(days=1)))).status_code == 201
    b_shift = (await api.post("/api/v1/shifts", json=shift(b["id"], day + timedelta(days=3)))).json()

    sid = s1.json()["id"]
    swap = await api.post(
        f"/api/v1/shifts/{sid}/swap", json={"requested_by": a["id"], "replacement": b["id"]}
    )
    assert swap.status_code == 200 and swap.json()["swap_request"]["status"] == "requested"
    decided = await api.post(
        f"/api/v1/shifts/{sid}/swap/decision", json={"approve": True, "decided_by": "mgr"}
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["employee_id"] == b["id"] and decided.json()["status"] == "swapped"
    problem(await api.post(f"/api/v1/shifts/{sid}/swap/decision", json={"approve": True}), 409)
    mine = (await api.get("/api/v1/shifts", params={"employee_id": b["id"]})).json()
    assert {s["id"] for s in mine["items"]} == {sid, b_shift["id"]}
    assert len((await api.get("/api/v1/shifts", params={"unfilled": True})).json()["items"]) == 1

    problem(
        await api.post(
            "/api/v1/timecards",
            json={
                "employee_id": a["id"],
                "clock_in": day.isoformat(),
                "clock_out": (day - timedelta(hours=1)).isoformat(),
            },
        ),
        422,
        "body.clock_out",
    )
    tc = await api.post(
        "/api/v1/timecards",
        json={
            "employee_id": a["id"],
            "clock_in": day.isoformat(),
            "clock_out": (day + timedelta(hours=10)).isoformat(),
        },
    )
    assert tc.status_code == 201, tc.text
    assert tc.json()["worked_minutes"] == 600 and tc.json()["overtime_minutes"] == 120

    status = (await api.get("/api/v1/compliance/status")).json()
    ward = status["departments"]["4 West nursing"]
    assert {k: v for k, v in ward.items() if k not in ("names", "organization", "resolution")} == {
        "active_staff": 2,
        "expired_credentials": 2,
        "expiring_credentials": 2,
        "unfilled_shifts": 1,
        "overtime_hours": 2.0,
        "credential_alerts": {},
        "hours_worked": 10.0,
        "overtime_hours_unpriced": 2.0,
        "overtime_cost": 0.0,
        "offboarded": 0,
    }

    audit = (await api.get("/api/v1/audit", params={"entity": "Shift"})).json()
    assert len(audit["items"]) >= 5
    assert audit["items"][0]["agent"] == "api"
    openapi = (await api.get("/openapi.json")).json()
    assert {
        "/api/v1/employees",
        "/api/v1/shifts",
        "/api/v1/timecards",
        "/api/v1/credentials",
        "/api/v1/compliance/status",
        "/api/v1/audit",
    } <= set(openapi["paths"])
    # shifts and timecards are not FHIR resources
    assert (await api.get("/fhir/Shift")).status_code == 404


async def test_compliance_status_shows_the_credential_scan(
    api: httpx.AsyncClient, fhir_engine: Engine
) -> None:
    """The alerts written by the credential-expiry job, by threshold and department, open or closed."""
    before = (await api.get("/api/v1/compliance/status")).json()["credential_scan"]
    assert before == {
        "last_run": None,
        "alerts_raised": 0,
        "raised_by_threshold": {},
        "raised_last_24h": 0,
        "open_by_threshold": {},
        "last_alert_at": None,
    }
    a = (await api.post("/api/v1/employees", json=employee("E300"))).json()
    await api.post("/api/v1/employees", json=employee("E301", department="Emergency"))
    assert fhir_engine.scheduler is not None
    assert (await fhir_engine.scheduler.run_job("credential_expiry"))[0] == "ok"
    status = (await api.get("/api/v1/compliance/status")).json()
    scan = status["credential_scan"]
    assert scan["last_run"]["status"] == "ok" and scan["last_run"]["finished_at"]
    assert scan["alerts_raised"] == 4 and scan["raised_last_24h"] == 4 and scan["last_alert_at"]
    assert scan["raised_by_threshold"] == {"expired": 2, "expiring-30d": 2}
    assert scan["open_by_threshold"] == {"expired": 2, "expiring-30d": 2}
    assert status["departments"]["4 West nursing"]["credential_alerts"] == {"expired": 1, "expiring-30d": 1}
    assert status["departments"]["Emergency"]["credential_alerts"] == {"expired": 1, "expiring-30d": 1}
    assert status["totals"]["credential_alerts"] == {"expired": 2, "expiring-30d": 2}

    # the RN licence is renewed: its alert is closed (still counted as raised), and a new scan adds none
    renewed = employee("E300")
    renewed["credentials"][0]["valid_to"] = (datetime.now(UTC).date() + timedelta(days=400)).isoformat()
    assert (await api.put(f"/api/v1/employees/{a['id']}", json=renewed)).status_code == 200
    assert (await fhir_engine.scheduler.run_job("credential_expiry"))[0] == "ok"
    status = (await api.get("/api/v1/compliance/status")).json()
    assert status["credential_scan"]["alerts_raised"] == 4
    assert status["credential_scan"]["open_by_threshold"] == {"expired": 2, "expiring-30d": 1}
    assert status["departments"]["4 West nursing"]["credential_alerts"] == {"expired": 1}


def readme_token(engine: Engine) -> str:
    """The README's token: ``hms-ach token --scope "user/*.cruds" --role hr_admin --role auditor``,
    run on the engine's channels.yaml (so on its data directory and signing key)."""
    args = ["token", "--scope", "user/*.cruds", "--role", "hr_admin", "--role", "auditor"]
    result = CliRunner().invoke(cli_app, [*args, "--config", engine.config.source])
    assert result.exit_code == 0, result.output
    return result.output.strip()


async def test_readme_walkthrough(fhir_engine: Engine) -> None:
    headers = {"authorization": f"Bearer {readme_token(fhir_engine)}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}", timeout=30, headers=headers
    ) as api:
        await walkthrough(api)


async def walkthrough(api: httpx.AsyncClient) -> None:
    bundle = json.loads((ROOT / "samples" / "fhir" / "onboard_nurse_bundle.json").read_text())
    assert (await api.post("/fhir", json=bundle, headers=FHIR_JSON)).status_code == 200
    nurse = (await api.get("/fhir/Practitioner", params={"identifier": "urn:hms-ach:id:staff|E2001"})).json()
    rid = nurse["entry"][0]["resource"]["id"]
    roles = (await api.get("/fhir/PractitionerRole", params={"practitioner": rid})).json()
    assert roles["total"] == 1
    creds = (await api.get("/api/v1/credentials")).json()["items"]
    assert {c["number"] for c in creds if c["employee_id"] == rid} == {"RN-884213", "BLS-20934"}
    week = (await api.get("/api/v1/shifts", params={"employee_id": rid})).json()["items"]
    assert len(week) == 5
    assert sorted(date.fromisoformat(s["start"][:10]).day for s in week) == [1, 2, 3, 4, 5]
    assert {s["status"] for s in week} == {"confirmed", "planned"}
    # a shift overlapping one of hers, sent the same way, is refused and changes nothing
    clash = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Basic")
    clash = json.loads(json.dumps(clash))
    clash["resource"]["identifier"][0]["value"] = "CLASH"
    clash["resource"]["subject"] = {"reference": f"Practitioner/{rid}"}
    clash["request"]["url"] = "Basic?identifier=urn:hms-ach:id:shift|CLASH"
    resp = await api.post(
        "/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [clash]}, headers=FHIR_JSON
    )
    assert resp.status_code == 422, resp.text
    assert len((await api.get("/api/v1/shifts", params={"employee_id": rid})).json()["items"]) == 5
