"""Per-employee overtime contracts against a running engine: the contract an employee carries (set
on /api/v1, on a FHIR Practitioner, or by the CSV roster's ``overtime_contract`` column) wins over
the department's; an unknown contract name is refused with ``employee.unknown_contract`` on every
path, and a timecard of an employee whose contract is no longer configured with
``timecard.unknown_contract``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.workforce import settings as workforce_settings
from hms_ach.workforce.overtime import CONTRACT_EXT
from hms_ach.workforce.settings import ContractOvertime, OvertimeSettings, WorkforceSettings
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, nurse
from tests.integration.test_workforce_rules import csv_bytes, ingest

pytestmark = pytest.mark.timeout(180)

WARD = "4 West"
#: The default: overtime past 8 h a day; the contract NIGHTS-12: past 12 h a day.
RULES = WorkforceSettings(
    overtime=OvertimeSettings(
        rule_set="daily", contracts={"NIGHTS-12": ContractOvertime(rule_set="daily", daily_hours=12)}
    )
)
DAY = datetime(2026, 11, 2, 7, tzinfo=UTC)


@pytest.fixture
def contracts_in_force(fhir_engine: Engine) -> Iterator[None]:
    workforce_settings.use(RULES)
    yield
    workforce_settings.use(WorkforceSettings())


@pytest.fixture
async def api(fhir_engine: Engine, contracts_in_force: None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}", timeout=30, headers=auth_headers(fhir_engine)
    ) as client:
        yield client


def employee(number: str, contract: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"employee_number": number, "family": f"Staff{number}", "department": WARD}
    if contract:
        body["overtime_contract"] = contract
    return body


async def ten_hours(api: httpx.AsyncClient, employee_id: str, day: int) -> int:
    """Overtime minutes of a 10 h timecard of ``employee_id`` on day ``day`` after DAY."""
    start = DAY + timedelta(days=day)
    body = {
        "employee_id": employee_id,
        "clock_in": start.isoformat(),
        "clock_out": (start + timedelta(hours=10)).isoformat(),
    }
    resp = await api.post("/api/v1/timecards", json=body)
    assert resp.status_code == 201, resp.text
    return int(resp.json()["overtime_minutes"])


async def test_the_contract_set_on_the_api_wins_over_the_department(api: httpx.AsyncClient) -> None:
    made = await api.post("/api/v1/employees", json=employee("C-ANN", "NIGHTS-12"))
    assert made.status_code == 201, made.text
    assert made.json()["overtime_contract"] == "NIGHTS-12"
    plain = await api.post("/api/v1/employees", json=employee("C-BOB"))
    assert plain.status_code == 201, plain.text
    assert await ten_hours(api, made.json()["id"], 0) == 0  # under her 12 h contract
    assert await ten_hours(api, plain.json()["id"], 0) == 120  # the default: past 8 h
    # the list counts again, with the employee's contract
    listed = await api.get("/api/v1/timecards", params={"employee_id": made.json()["id"]})
    assert [t["overtime_minutes"] for t in listed.json()["items"]] == [0], listed.text

    bad = await api.post("/api/v1/employees", json=employee("C-EVE", "NOPE"))
    assert bad.status_code == 422, bad.text
    assert bad.json()["code"] == "employee.unknown_contract"
    assert [e["location"] for e in bad.json()["errors"]] == ["body.overtime_contract"]

    # the contract leaves the configuration: her next timecard is refused, not counted by a guess
    workforce_settings.use(WorkforceSettings())
    start = DAY + timedelta(days=2)
    body = {
        "employee_id": made.json()["id"],
        "clock_in": start.isoformat(),
        "clock_out": (start + timedelta(hours=1)).isoformat(),
    }
    gone = await api.post("/api/v1/timecards", json=body)
    assert gone.status_code == 422, gone.text
    assert gone.json()["code"] == "timecard.unknown_contract"


async def test_the_contract_set_on_fhir(api: httpx.AsyncClient, fhir_engine: Engine, tmp_path: Path) -> None:
    carried = [{"url": CONTRACT_EXT, "valueCode": "NIGHTS-12"}]
    made = await api.post("/fhir/Practitioner", json=nurse("F-ANN", extension=carried), headers=FHIR_JSON)
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    assert (await api.get(f"/api/v1/employees/{rid}")).json()["overtime_contract"] == "NIGHTS-12"
    assert await ten_hours(api, rid, 0) == 0
    # the roster without the column updates her name and keeps the contract (extensions merge by url)
    row = csv_bytes(["employee_id", "family_name", "department", "active"], [["F-ANN", "Renamed", WARD, "Y"]])
    assert not (await ingest(fhir_engine, tmp_path, "staff_roster", row)).errors
    after = (await api.get(f"/api/v1/employees/{rid}")).json()
    assert (after["family"], after["overtime_contract"]) == ("Renamed", "NIGHTS-12"), after

    wrong = [{"url": CONTRACT_EXT, "valueCode": "NOPE"}]
    bad = await api.post("/fhir/Practitioner", json=nurse("F-EVE", extension=wrong), headers=FHIR_JSON)
    assert bad.status_code == 422, bad.text
    issue = bad.json()["issue"][0]
    assert issue["code"] == "business-rule"
    assert issue["diagnostics"].startswith("[employee.unknown_contract]"), issue
    assert issue["expression"] == ["Practitioner.extension"]


async def test_the_contract_set_by_the_csv_roster(
    api: httpx.AsyncClient, fhir_engine: Engine, tmp_path: Path
) -> None:
    header = ["employee_id", "family_name", "department", "overtime_contract", "active"]
    rows = [["R-ANN", "Roster", WARD, "NIGHTS-12", "Y"], ["R-EVE", "Wrong", WARD, "NOPE", "Y"]]
    report = await ingest(fhir_engine, tmp_path, "staff_roster", csv_bytes(header, rows))
    assert [(line, column) for line, column, _ in report.errors] == [(3, "overtime_contract")], report.errors
    assert report.errors[0][2].startswith("[employee.unknown_contract]"), report.errors
    staff = (await api.get("/api/v1/employees", params={"department": WARD})).json()["items"]
    mine = {e["employee_number"]: e for e in staff}
    assert "R-EVE" not in mine  # nothing of the refused row is stored
    assert mine["R-ANN"]["overtime_contract"] == "NIGHTS-12"
    # a CSV timecard of hers counts by her contract too
    start = DAY + timedelta(days=3)
    cards = csv_bytes(
        ["timecard_id", "employee_id", "department", "clock_in", "clock_out"],
        [["T-R1", "R-ANN", WARD, start.isoformat(), (start + timedelta(hours=10)).isoformat()]],
    )
    assert not (await ingest(fhir_engine, tmp_path, "timecards", cards)).errors
    listed = await api.get("/api/v1/timecards", params={"employee_id": mine["R-ANN"]["id"]})
    assert [t["overtime_minutes"] for t in listed.json()["items"]] == [0], listed.text
