"""Roles on /api/v1 against a running engine: each caller holds a token of the engine's local issuer,
as ``hms-ach token --role ...`` prints it (docs/security.md, Roles on /api/v1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import auth_headers

pytestmark = pytest.mark.timeout(120)

ICU, PHARMACY = "ICU", "Pharmacy"


@dataclass
class Roster:
    """Three employees (A and B in ICU, C in Pharmacy), one shift each, made by hr_admin."""

    a: dict[str, Any]
    b: dict[str, Any]
    c: dict[str, Any]
    shift_a: dict[str, Any]
    shift_b: dict[str, Any]
    shift_c: dict[str, Any]


def employee(number: str, department: str) -> dict[str, Any]:
    return {"employee_number": number, "family": f"Staff{number}", "department": department}


def shift(employee_id: str | None, department: str, days: int, **extra: Any) -> dict[str, Any]:
    start = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0) + timedelta(days=days)
    return {
        "employee_id": employee_id,
        "department": department,
        "role": "RN",
        "start": start.isoformat(),
        "end": (start + timedelta(hours=12)).isoformat(),
        **extra,
    }


def denied(resp: httpx.Response) -> dict[str, Any]:
    """A 403 problem with the RFC 6750 insufficient_scope challenge."""
    assert resp.status_code == 403, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    body: dict[str, Any] = resp.json()
    assert body["status"] == 403 and body["detail"]
    return body


@pytest.fixture
async def base(fhir_engine: Engine) -> str:
    return f"http://127.0.0.1:{fhir_engine.http_port}"


@pytest.fixture
async def roster(fhir_engine: Engine, base: str) -> AsyncIterator[Roster]:
    hr = auth_headers(fhir_engine, "", ("hr_admin",), sub="hr")
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=hr) as http:

        async def made(path: str, body: dict[str, Any]) -> dict[str, Any]:
            resp = await http.post(path, json=body)
            assert resp.status_code == 201, resp.text  # hr_admin may do every workforce write
            out: dict[str, Any] = resp.json()
            return out

        a = await made("/api/v1/employees", employee("E300", ICU))
        b = await made("/api/v1/employees", employee("E301", ICU))
        c = await made("/api/v1/employees", employee("E302", PHARMACY))
        yield Roster(
            a,
            b,
            c,
            await made("/api/v1/shifts", shift(a["id"], ICU, 2)),
            await made("/api/v1/shifts", shift(b["id"], ICU, 3)),
            await made("/api/v1/shifts", shift(c["id"], PHARMACY, 4)),
        )


def client(engine: Engine, base: str, roles: tuple[str, ...], **claims: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(engine, "", roles, **claims))


async def test_an_employee_sees_and_acts_on_its_own_records_only(
    fhir_engine: Engine, base: str, roster: Roster
) -> None:
    a, b = roster.a, roster.b
    # the employee_id claim may be the employee number (as HR knows it) or the Practitioner id
    for claim in ("E300", a["id"]):
        async with client(fhir_engine, base, ("employee",), sub="carol", employee_id=claim) as http:
            mine = (await http.get("/api/v1/shifts")).json()["items"]
            assert [s["id"] for s in mine] == [roster.shift_a["id"]]
            assert (await http.get(f"/api/v1/employees/{a['id']}")).status_code == 200
            employees = (await http.get("/api/v1/employees")).json()["items"]
            assert [e["id"] for e in employees] == [a["id"]]

    async with client(fhir_engine, base, ("employee",), sub="carol", employee_id="E300") as http:
        denied(await http.get("/api/v1/shifts", params={"employee_id": b["id"]}))
        denied(await http.get("/api/v1/timecards", params={"employee_id": b["id"]}))
        denied(await http.get(f"/api/v1/employees/{b['id']}"))
        clock = {"clock_in": "2026-01-05T07:00:00+00:00", "clock_out": "2026-01-05T15:00:00+00:00"}
        assert (
            await http.post("/api/v1/timecards", json={"employee_id": a["id"], **clock})
        ).status_code == 201
        denied(await http.post("/api/v1/timecards", json={"employee_id": b["id"], **clock}))
        # a swap of another's shift, or asked in another's name, is refused; of its own shift allowed
        swap = {"requested_by": a["id"], "replacement": b["id"]}
        denied(await http.post(f"/api/v1/shifts/{roster.shift_b['id']}/swap", json=swap))
        denied(
            await http.post(
                f"/api/v1/shifts/{roster.shift_b['id']}/swap",
                json={"requested_by": b["id"], "replacement": a["id"]},
            )
        )
        asked = await http.post(f"/api/v1/shifts/{roster.shift_a['id']}/swap", json=swap)
        assert asked.status_code == 200, asked.text
        # but it cannot approve it, write shifts or employees, nor read the audit trail
        denied(
            await http.post(f"/api/v1/shifts/{roster.shift_a['id']}/swap/decision", json={"approve": True})
        )
        denied(await http.post("/api/v1/shifts", json=shift(a["id"], ICU, 9)))
        denied(await http.post("/api/v1/employees", json=employee("E399", ICU)))
        denied(await http.get("/api/v1/audit"))
    # an employee token without an employee_id claim, or naming nobody stored, may do nothing
    async with client(fhir_engine, base, ("employee",), sub="nobody") as http:
        denied(await http.get("/api/v1/shifts"))
    async with client(fhir_engine, base, ("employee",), sub="ghost", employee_id="E999") as http:
        assert "names no stored employee" in denied(await http.get("/api/v1/timecards"))["detail"]


async def test_a_scheduler_acts_in_its_departments_only(
    fhir_engine: Engine, base: str, roster: Roster
) -> None:
    async with client(fhir_engine, base, ("scheduler",), sub="bob", departments=(ICU,)) as http:
        shifts = (await http.get("/api/v1/shifts")).json()["items"]
        assert {s["id"] for s in shifts} == {roster.shift_a["id"], roster.shift_b["id"]}
        employees = (await http.get("/api/v1/employees")).json()["items"]
        assert {e["department"] for e in employees} == {ICU}
        assert (await http.post("/api/v1/shifts", json=shift(None, ICU, 6))).status_code == 201
        denied(await http.post("/api/v1/shifts", json=shift(None, PHARMACY, 6)))
        # another department's shift cannot be edited, not even moved into its own department
        c_shift = roster.shift_c["id"]
        denied(await http.put(f"/api/v1/shifts/{c_shift}", json=shift(roster.c["id"], PHARMACY, 4)))
        denied(await http.put(f"/api/v1/shifts/{c_shift}", json=shift(roster.c["id"], ICU, 4)))
        denied(await http.get(f"/api/v1/employees/{roster.c['id']}"))
        denied(await http.post("/api/v1/employees", json=employee("E398", ICU)))
    # swap decisions: in its department yes, in another no
    async with client(fhir_engine, base, ("employee",), employee_id=roster.a["id"]) as http:
        swap = {"requested_by": roster.a["id"], "replacement": roster.b["id"]}
        assert (await http.post(f"/api/v1/shifts/{roster.shift_a['id']}/swap", json=swap)).status_code == 200
    async with client(fhir_engine, base, ("scheduler",), sub="eve", departments=(PHARMACY,)) as http:
        denied(
            await http.post(f"/api/v1/shifts/{roster.shift_a['id']}/swap/decision", json={"approve": True})
        )
    async with client(fhir_engine, base, ("scheduler",), sub="bob", departments=(ICU,)) as http:
        decided = await http.post(
            f"/api/v1/shifts/{roster.shift_a['id']}/swap/decision", json={"approve": True}
        )
        assert decided.status_code == 200, decided.text
        assert decided.json()["employee_id"] == roster.b["id"]


async def test_an_auditor_reads_and_never_writes(fhir_engine: Engine, base: str, roster: Roster) -> None:
    async with client(fhir_engine, base, ("auditor",), sub="audrey") as http:
        trail = await http.get("/api/v1/audit", params={"entity": f"Practitioner/{roster.a['id']}"})
        assert trail.status_code == 200 and trail.json()["items"], trail.text
        assert (await http.get("/api/v1/compliance/status")).status_code == 200
        denied(await http.post("/api/v1/employees", json=employee("E397", ICU)))
        denied(await http.put(f"/api/v1/employees/{roster.a['id']}", json=employee("E300", ICU)))
        denied(await http.post("/api/v1/shifts", json=shift(None, ICU, 7)))
        denied(await http.get("/api/v1/shifts"))
    # the integration role is system use: every workforce read and write
    async with client(fhir_engine, base, ("integration",), sub="feed") as http:
        assert (await http.post("/api/v1/shifts", json=shift(None, PHARMACY, 8))).status_code == 201
        assert len((await http.get("/api/v1/employees")).json()["items"]) == 3


async def test_no_token_is_401_and_no_role_is_403(fhir_engine: Engine, base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await http.get("/api/v1/employees")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == 'Bearer realm="hms-ach"'
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["status"] == 401 and "Bearer" in resp.json()["detail"]
    async with client(fhir_engine, base, ()) as http:  # a valid token without roles
        body = denied(await http.get("/api/v1/employees"))
        assert "employees.read" in body["detail"]
