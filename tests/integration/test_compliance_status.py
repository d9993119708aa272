"""GET /api/v1/compliance/status against a running engine: hours worked, overtime hours and cost
(from the role's rate), rule violations by code (refused on /api/v1, FHIR and as a CSV row), offboardings, the
department names resolved to one Organization, and the department and period filters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.ingest.csv_rows import CsvFileSettings, CsvIngest
from hms_ach.workforce import settings as workforce_settings
from hms_ach.workforce.settings import WorkforceSettings
from tests.integration.engine_helpers import FHIR_JSON, auth_headers

pytestmark = pytest.mark.timeout(120)

#: Monday 07:00 UTC two weeks back: the timecards below are worked that day.
MONDAY = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0) - timedelta(
    days=14 + datetime.now(UTC).weekday()
)
RATES = WorkforceSettings.model_validate({"pay_rates": {"RN": "40.00"}, "overtime_pay_multiplier": "1.5"})
WARD = "4 West nursing"


def organization(code: str, name: str, *aliases: str) -> dict[str, Any]:
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:hms-ach:id:department", "value": code}],
        "active": True,
        "name": name,
    }
    if aliases:
        org["alias"] = list(aliases)
    return org


def employee(number: str, department: str, active: bool = True) -> dict[str, Any]:
    return {"employee_number": number, "family": f"Staff{number}", "department": department, "active": active}


@pytest.fixture
async def api(fhir_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    workforce_settings.use(RATES)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{fhir_engine.http_port}",
            timeout=30,
            headers=auth_headers(fhir_engine, sub="hr-admin"),
        ) as client:
            yield client
    finally:
        workforce_settings.use(WorkforceSettings())


async def created(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code in (200, 201), resp.text
    body: dict[str, Any] = resp.json()
    return body


async def status(api: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    resp = await api.get("/api/v1/compliance/status", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def csv_timecard_of_nobody(engine: Engine, tmp_path: Path) -> None:
    """A timecards CSV whose one row names an unknown employee: an error row, not a stored card."""
    path = tmp_path / "timecards.csv"
    clock_in, clock_out = MONDAY.isoformat(), (MONDAY + timedelta(hours=8)).isoformat()
    path.write_text(
        "timecard_id,employee_id,npi,department,clock_in,clock_out,shift_id\n"
        f"T-X,NOBODY,,4W,{clock_in},{clock_out},\n"
    )
    csv_in = CsvIngest(engine.pipeline, "timecards_in", CsvFileSettings(dataset="timecards"), "test")
    _mid, report = await csv_in.ingest(path, path.name, f"test:{path.name}", {"path": path.name})
    assert (report.stored, len(report.errors)) == (0, 1), report
    assert report.errors[0][2].startswith("[timecard.unknown_employee]"), report


async def test_compliance_gains_and_filters(
    api: httpx.AsyncClient, fhir_engine: Engine, tmp_path: Path
) -> None:
    for code, name, aliases in (("NURS-4W", WARD, ("4W",)), ("ED", "Emergency", ())):
        url = f"/fhir/Organization?identifier=urn:hms-ach:id:department|{code}"
        await created(await api.put(url, json=organization(code, name, *aliases), headers=FHIR_JSON))
    ids = {}
    for number, dept in (("A", WARD), ("B", "4W"), ("C", "ED"), ("D", "Pharmacy")):
        ids[number] = (await created(await api.post("/api/v1/employees", json=employee(number, dept))))["id"]
    shift = {
        "employee_id": ids["A"],
        "role": "RN",
        "department": "NURS-4W",
        "start": MONDAY.isoformat(),
        "end": (MONDAY + timedelta(hours=10)).isoformat(),
    }
    shift_id = (await created(await api.post("/api/v1/shifts", json=shift)))["id"]
    cards = [  # A: 10 h on an RN shift (2 h overtime, priced); B: 9 h 05 min without a shift (unpriced)
        {"employee_id": ids["A"], "department": WARD, "shift_id": shift_id, "minutes": 600},
        {"employee_id": ids["B"], "department": "4W", "minutes": 545},
        {"employee_id": ids["D"], "department": "Pharmacy", "minutes": 240},
    ]
    for card in cards:
        body = {k: v for k, v in card.items() if k != "minutes"}
        body["clock_in"] = MONDAY.isoformat()
        body["clock_out"] = (MONDAY + timedelta(minutes=int(card["minutes"]))).isoformat()
        await created(await api.post("/api/v1/timecards", json=body))
    # refused writes: a 36 h shift on /api/v1 and on FHIR, a timecard overlapping A's
    too_long = {**shift, "start": (MONDAY + timedelta(days=3)).isoformat()}
    too_long["end"] = (MONDAY + timedelta(days=4, hours=12)).isoformat()
    resp = await api.post("/api/v1/shifts", json=too_long)
    assert resp.status_code == 422 and resp.json()["code"] == "shift.too_long", resp.text
    basic = {
        "resourceType": "Basic",
        "identifier": [{"system": "urn:hms-ach:id:shift", "value": "F-long"}],
        "code": {"coding": [{"system": "urn:hms-ach:code:basic-type", "code": "shift"}]},
        "subject": {"reference": f"Practitioner/{ids['A']}"},
        "extension": [
            {
                "url": "urn:hms-ach:fhir:StructureDefinition/shift-period",
                "valuePeriod": {"start": too_long["start"], "end": too_long["end"]},
            },
            {"url": "urn:hms-ach:fhir:StructureDefinition/shift-status", "valueCode": "planned"},
        ],
    }
    assert (await api.post("/fhir/Basic", json=basic, headers=FHIR_JSON)).status_code == 422
    overlap = {
        "employee_id": ids["A"],
        "clock_in": (MONDAY + timedelta(hours=1)).isoformat(),
        "clock_out": (MONDAY + timedelta(hours=2)).isoformat(),
    }
    resp = await api.post("/api/v1/timecards", json=overlap)
    assert resp.status_code == 422 and resp.json()["code"] == "timecard.overlap", resp.text
    await csv_timecard_of_nobody(fhir_engine, tmp_path)
    # C leaves: offboarded
    c = employee("C", "ED", active=False)
    await created(await api.put(f"/api/v1/employees/{ids['C']}", json=c))

    every = await status(api)
    assert sorted(every["departments"]) == ["4 West nursing", "Emergency", "Pharmacy"]
    ward, er, pharmacy = (every["departments"][k] for k in ("4 West nursing", "Emergency", "Pharmacy"))
    assert ward["organization"].startswith("Organization/") and ward["names"] == ["4 West nursing", "4W"]
    assert (er["resolution"], er["names"]) == ("identifier", ["ED"])
    assert (pharmacy["organization"], pharmacy["resolution"]) == (None, "unresolved")
    assert ward["active_staff"] == 2 and er["active_staff"] == 0 and er["offboarded"] == 1
    assert ward["hours_worked"] == round(1145 / 60, 2) and pharmacy["hours_worked"] == 4.0
    assert ward["overtime_hours"] == round(185 / 60, 2) and ward["overtime_hours_unpriced"] == 1.08
    assert ward["overtime_cost"] == 120.0  # 2 h x 40.00 x 1.5
    assert every["totals"]["hours_worked"] == round(1385 / 60, 2) and every["totals"]["offboarded"] == 1
    assert every["rule_violations"] == {
        "shift.too_long": 2,  # /api/v1 and FHIR
        "timecard.overlap": 1,  # /api/v1
        "timecard.unknown_employee": 1,  # a CSV row
    }

    # the department filter: by code, name or alias, all to the one Organization
    for name in ("NURS-4W", "4 west nursing", "4w"):
        one = await status(api, department=name)
        assert list(one["departments"]) == ["4 West nursing"], name
        assert (
            one["totals"]["hours_worked"] == ward["hours_worked"] and one["totals"]["overtime_cost"] == 120.0
        )
    assert list((await status(api, department="Pharmacy"))["departments"]) == ["Pharmacy"]
    assert (await status(api, department="Nowhere"))["departments"] == {}

    # the period filter: the timecards' week, then a period after everything
    week = await status(api, **{"from": MONDAY.isoformat(), "to": (MONDAY + timedelta(days=7)).isoformat()})
    assert week["totals"]["hours_worked"] == every["totals"]["hours_worked"]
    assert week["rule_violations"] == {} and week["totals"]["offboarded"] == 0  # refused and left today
    later = await status(api, **{"from": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
    assert later["totals"]["hours_worked"] == 0.0 and later["rule_violations"] == {}
    assert later["totals"]["active_staff"] == every["totals"]["active_staff"]  # as of now, not of the period
    today = await status(api, **{"from": (datetime.now(UTC) - timedelta(hours=1)).isoformat()})
    assert today["rule_violations"] == every["rule_violations"] and today["totals"]["offboarded"] == 1
    assert today["totals"]["hours_worked"] == 0.0

    bad = await api.get(
        "/api/v1/compliance/status", params={"from": "2026-12-02T00:00:00Z", "to": "2026-12-01T00:00:00Z"}
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["location"] == "query.to", bad.text
    naive = await api.get("/api/v1/compliance/status", params={"from": "2026-12-01T00:00:00"})
    assert naive.status_code == 422 and naive.json()["errors"][0]["location"] == "query.from", naive.text
