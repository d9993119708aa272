"""The workforce rules against a running engine, on /api/v1, FHIR and CSV alike: each broken rule is
refused with its code (a problem's ``code``, an OperationOutcome's diagnostics, a CSV row's reason);
offboarding from every source; kiosk clock events; the overtime event."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.csv_rows import CsvFileSettings, CsvIngest
from hms_ach.ingest.files import FileReport
from hms_ach.store.models import OutboxEvent
from hms_ach.workforce import settings as workforce_settings
from hms_ach.workforce.settings import WorkforceSettings
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers

pytestmark = pytest.mark.timeout(180)

WARD = "4 West"
RULES = WorkforceSettings(role_credentials={"RN": ["RN", "BLS"]}, max_weekly_hours=30)
#: Monday 07:00 UTC two weeks ahead: every shift below is in the future, in one ISO week.
MONDAY = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0) + timedelta(
    days=14 - datetime.now(UTC).weekday()
)


def credential(kind: str, valid_to: str | None = None) -> dict[str, Any]:
    return {
        "type": kind,
        "number": f"{kind}-{valid_to or 'x'}",
        "valid_from": "2020-01-01",
        "valid_to": valid_to,
    }


def employee(number: str, *creds: dict[str, Any], active: bool = True) -> dict[str, Any]:
    return {
        "employee_number": number,
        "family": f"Staff{number}",
        "department": WARD,
        "active": active,
        "credentials": list(creds),
    }


@dataclass
class World:
    engine: Engine
    api: httpx.AsyncClient
    ids: dict[str, str]  # employee number -> Practitioner id
    shift_ann: dict[str, Any]  # Ann's Tuesday shift, 07:00-19:00


@pytest.fixture
def rules_in_force(fhir_engine: Engine) -> Iterator[None]:
    workforce_settings.use(RULES)
    yield
    workforce_settings.use(WorkforceSettings())


@pytest.fixture
async def world(fhir_engine: Engine, rules_in_force: None) -> AsyncIterator[World]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}",
        timeout=30,
        headers=auth_headers(fhir_engine, sub="hr-admin"),
    ) as api:
        soon = (MONDAY + timedelta(days=2)).date().isoformat()  # Old's RN licence ends on Wednesday
        people = {
            "ANN": employee("ANN", credential("RN"), credential("BLS")),
            "BOB": employee("BOB", credential("RN"), credential("BLS")),
            "OLD": employee("OLD", credential("RN", soon), credential("BLS")),
            "LPN": employee("LPN", credential("LPN")),
            "GONE": employee("GONE", credential("RN"), credential("BLS"), active=False),
        }
        ids = {}
        for number, body in people.items():
            resp = await api.post("/api/v1/employees", json=body)
            assert resp.status_code == 201, resp.text
            ids[number] = resp.json()["id"]
        made = await api.post("/api/v1/shifts", json=shift(ids["ANN"], MONDAY + timedelta(days=1)))
        assert made.status_code == 201, made.text
        yield World(fhir_engine, api, ids, made.json())


def shift(emp: str | None, start: datetime, hours: float = 12, **extra: Any) -> dict[str, Any]:
    return {
        "employee_id": emp,
        "department": WARD,
        "role": "RN",
        "start": start.isoformat(),
        "end": (start + timedelta(hours=hours)).isoformat(),
        **extra,
    }


def refused(
    resp: httpx.Response, code: str, status: int = 422, location: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["code"] == code, body
    if location:
        assert [e["location"] for e in body["errors"]] == [location], body
    return body


#: (code, employee, start after Monday 07:00 in hours, length in hours, status, the API's field)
SHIFT_CASES = [
    ("shift.too_long", "ANN", 72, 20, "planned", "body.end"),
    ("shift.employee_inactive", "GONE", 72, 8, "planned", "body.employee_id"),
    ("shift.role_not_held", "LPN", 72, 8, "planned", "body.role"),
    ("shift.credential_expired", "OLD", 72, 8, "planned", "body.employee_id"),
    ("shift.overlap", "ANN", 30, 8, "planned", "body.start"),
    ("shift.rest_too_short", "ANN", 38, 8, "planned", "body.start"),
    ("shift.open_with_employee", "ANN", 72, 8, "open", "body.status"),
    ("shift.weekly_hours_exceeded", "ANN", 72, 12, "planned", "body.start"),  # 12 + 12 + the case's
]


async def _weekly_setup(w: World) -> None:
    """Ann works Wednesday too: 24 h this week, so a third 12 h shift is over the 30 h limit."""
    made = await w.api.post(
        "/api/v1/shifts", json=shift(w.ids["ANN"], MONDAY + timedelta(days=2, hours=1), 12)
    )
    assert made.status_code == 201, made.text


async def test_each_shift_rule_refuses_on_the_api(world: World) -> None:
    await _weekly_setup(world)
    for code, who, at, hours, status, location in SHIFT_CASES:
        body = shift(world.ids[who], MONDAY + timedelta(hours=at), hours, status=status)
        refused(await world.api.post("/api/v1/shifts", json=body), code, location=location)
    # an unfilled shift may be open; an unknown employee is refused
    assert (
        await world.api.post("/api/v1/shifts", json=shift(None, MONDAY, 8, status="open"))
    ).status_code == 201
    refused(await world.api.post("/api/v1/shifts", json=shift("nobody", MONDAY, 8)), "shift.unknown_employee")


def basic_shift(key: str, who: str | None, start: datetime, hours: float, status: str) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Basic",
        "identifier": [{"system": "urn:hms-ach:id:shift", "value": key}],
        "code": {"coding": [{"system": "urn:hms-ach:code:basic-type", "code": "shift"}]},
        "extension": [
            {
                "url": "urn:hms-ach:fhir:StructureDefinition/shift-period",
                "valuePeriod": {
                    "start": start.isoformat(),
                    "end": (start + timedelta(hours=hours)).isoformat(),
                },
            },
            {"url": "urn:hms-ach:fhir:StructureDefinition/shift-status", "valueCode": status},
            {"url": "urn:hms-ach:fhir:StructureDefinition/shift-role", "valueString": "RN"},
            {"url": "urn:hms-ach:fhir:StructureDefinition/shift-department", "valueString": WARD},
        ],
    }
    if who:
        res["subject"] = {"reference": f"Practitioner/{who}"}
    return res


async def test_each_shift_rule_refuses_on_fhir(world: World) -> None:
    await _weekly_setup(world)
    for i, (code, who, at, hours, status, _loc) in enumerate(SHIFT_CASES):
        body = basic_shift(f"F-{i}", world.ids[who], MONDAY + timedelta(hours=at), hours, status)
        resp = await world.api.post("/fhir/Basic", json=body, headers=FHIR_JSON)
        assert resp.status_code == 422, resp.text
        issue = resp.json()["issue"][0]
        assert issue["diagnostics"].startswith(f"[{code}] "), issue
        assert issue["code"] == "business-rule"
        where = (
            "Basic.subject"
            if code in ("shift.employee_inactive", "shift.credential_expired")
            else "Basic.extension"
        )
        assert issue["expression"] == [where], issue
    ok = basic_shift("F-ok", world.ids["BOB"], MONDAY + timedelta(hours=72), 8, "planned")
    assert (await world.api.post("/fhir/Basic", json=ok, headers=FHIR_JSON)).status_code == 201


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


async def ingest(engine: Engine, tmp_path: Path, dataset: str, data: bytes) -> FileReport:
    path = tmp_path / f"{dataset}-{len(data)}.csv"
    path.write_bytes(data)
    csv_in = CsvIngest(engine.pipeline, f"{dataset}_in", CsvFileSettings(dataset=dataset), "test")
    _mid, report = await csv_in.ingest(path, path.name, f"test:{path.name}", {"path": path.name})
    return report


async def test_each_shift_rule_refuses_a_csv_row(world: World, tmp_path: Path) -> None:
    await _weekly_setup(world)
    header = ["shift_id", "employee_id", "npi", "role", "department", "start", "end", "status"]
    rows = []
    for i, (_code, who, at, hours, status, _loc) in enumerate(SHIFT_CASES):
        start = MONDAY + timedelta(hours=at)
        rows.append(
            [
                f"C-{i}",
                who,
                "",
                "RN",
                WARD,
                start.isoformat(),
                (start + timedelta(hours=hours)).isoformat(),
                status,
            ]
        )
    rows.append(
        [
            "C-ok",
            "BOB",
            "",
            "RN",
            WARD,
            (MONDAY + timedelta(hours=72)).isoformat(),
            (MONDAY + timedelta(hours=80)).isoformat(),
            "planned",
        ]
    )
    rows.append(
        [
            "C-who",
            "E-NOBODY",
            "",
            "RN",
            WARD,
            MONDAY.isoformat(),
            (MONDAY + timedelta(hours=8)).isoformat(),
            "planned",
        ]
    )
    report = await ingest(world.engine, tmp_path, "shifts", csv_bytes(header, rows))
    assert report.stored == 1 and report.status == "error", [e[:2] for e in report.errors]
    reasons = {line: (column, reason) for line, column, reason in report.errors}
    expected = [c[0] for c in SHIFT_CASES] + ["shift.unknown_employee"]
    lines = [i + 2 for i in range(len(SHIFT_CASES))] + [len(SHIFT_CASES) + 3]  # the header is line 1
    for line, code in zip(lines, expected, strict=True):
        column, reason = reasons[line]
        assert reason.startswith(f"[{code}] "), (line, reason)
        assert column in ("employee_id", "start", "end", "role", "status"), column
    shifts = (await world.api.get("/api/v1/shifts", params={"limit": 200})).json()["items"]
    assert {s["shift_id"] for s in shifts if s["shift_id"].startswith("C-")} == {
        "C-ok"
    }  # no refused row stored


async def test_timecard_rules_on_the_api_and_csv_and_kiosk_events(world: World, tmp_path: Path) -> None:
    ann, bob = world.ids["ANN"], world.ids["BOB"]
    tuesday = MONDAY + timedelta(days=1)
    first = {
        "employee_id": ann,
        "clock_in": tuesday.isoformat(),
        "clock_out": (tuesday + timedelta(hours=8)).isoformat(),
    }
    assert (await world.api.post("/api/v1/timecards", json=first)).status_code == 201
    later = tuesday + timedelta(hours=4)
    cases = [
        ({**first, "employee_id": "nobody"}, "timecard.unknown_employee", "body.employee_id"),
        (
            {
                **first,
                "timecard_id": "T-2",
                "clock_in": later.isoformat(),
                "clock_out": (later + timedelta(hours=6)).isoformat(),
            },
            "timecard.overlap",
            "body.clock_in",
        ),
        (
            {**first, "employee_id": bob, "shift_id": world.shift_ann["id"]},
            "timecard.shift_of_another_employee",
            "body.shift_id",
        ),
        (
            {**first, "employee_id": bob, "shift_id": "no-such-shift"},
            "timecard.unknown_shift",
            "body.shift_id",
        ),
        (
            {**first, "clock_out": (tuesday - timedelta(hours=1)).isoformat()},
            "timecard.ends_before_start",
            "body.clock_out",
        ),
    ]
    for body, code, location in cases:
        refused(await world.api.post("/api/v1/timecards", json=body), code, location=location)

    # the same rules on CSV rows: an unknown employee is an error row, never a stored orphan
    header = ["timecard_id", "employee_id", "npi", "department", "clock_in", "clock_out", "shift_id"]
    day = (MONDAY + timedelta(days=3)).isoformat()
    rows = [
        ["K-1", "E-NOBODY", "", WARD, day, (MONDAY + timedelta(days=3, hours=4)).isoformat(), ""],
        ["K-2", "ANN", "", WARD, later.isoformat(), (later + timedelta(hours=2)).isoformat(), ""],
        [
            "K-3",
            "BOB",
            "",
            WARD,
            day,
            (MONDAY + timedelta(days=3, hours=4)).isoformat(),
            world.shift_ann["shift_id"],
        ],
        ["K-4", "BOB", "", WARD, day, (MONDAY + timedelta(days=3, hours=4)).isoformat(), ""],
    ]
    report = await ingest(world.engine, tmp_path, "timecards", csv_bytes(header, rows))
    assert report.stored == 1
    got = {line: (column, reason.split("]")[0] + "]") for line, column, reason in report.errors}
    assert got == {
        2: ("employee_id", "[timecard.unknown_employee]"),
        3: ("clock_in", "[timecard.overlap]"),
        4: ("shift_id", "[timecard.shift_of_another_employee]"),
    }
    cards = (await world.api.get("/api/v1/timecards", params={"limit": 200})).json()["items"]
    assert all(c["employee_id"] for c in cards) and len(cards) == 2

    # kiosk: clock in, not twice; clock out, not twice
    friday = MONDAY + timedelta(days=4)
    opened = await world.api.post(
        "/api/v1/timecards/clock-in", json={"employee_id": bob, "at": friday.isoformat()}
    )
    assert opened.status_code == 201 and opened.json()["clock_out"] is None, opened.text
    refused(
        await world.api.post(
            "/api/v1/timecards/clock-in",
            json={"employee_id": bob, "at": (friday + timedelta(hours=1)).isoformat()},
        ),
        "timecard.already_clocked_in",
        location="body.at",
    )
    out = {"employee_id": bob, "at": (friday + timedelta(hours=9, minutes=40)).isoformat()}
    closed = await world.api.post("/api/v1/timecards/clock-out", json=out)
    assert closed.status_code == 200, closed.text
    assert closed.json()["worked_minutes"] == 580 and closed.json()["id"] == opened.json()["id"]
    refused(
        await world.api.post("/api/v1/timecards/clock-out", json=out), "timecard.not_clocked_in", status=409
    )
    # 9 h 40 min: 1 h 40 min over the 8 h day, an event, and hours rounded (1.67, never 1.6666...)
    events = outbox(world.engine, "overtime.threshold_reached")
    assert {"resource": f"Timecard/{opened.json()['id']}", "overtimeMinutes": 100, "overtimeHours": 1.67} in [
        {k: e[k] for k in ("resource", "overtimeMinutes", "overtimeHours")} for e in events
    ]
    status = (await world.api.get("/api/v1/compliance/status")).json()
    assert status["departments"][WARD]["overtime_hours"] == 1.67


def outbox(engine: Engine, event: str) -> list[dict[str, Any]]:
    table = OutboxEvent.__table__  # type: ignore[attr-defined]
    with engine.store.reader.connect() as conn:
        rows = conn.execute(
            select(table.c.payload).where(table.c.event == event).order_by(table.c.id)
        ).scalars()
        return [orjson.loads(r) for r in rows]


async def test_swap_rules(world: World) -> None:
    engine, ann, bob = world.engine, world.ids["ANN"], world.ids["BOB"]
    base = f"http://127.0.0.1:{engine.http_port}"
    sid = world.shift_ann["id"]
    as_bob = auth_headers(engine, "", ("employee",), sub="bob", employee_id=bob)
    as_ann = auth_headers(engine, "", ("employee",), sub="ann", employee_id=ann)
    as_er = auth_headers(engine, "", ("scheduler",), sub="er-sched", departments=("ER",))
    as_ward = auth_headers(engine, "", ("scheduler",), sub="ward-sched", departments=(WARD,))
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        swap = {"requested_by": ann, "replacement": bob}
        refused(
            await http.post(f"/api/v1/shifts/{sid}/swap", json=swap, headers=as_bob), "swap.not_owner", 403
        )
        lpn = {"requested_by": ann, "replacement": world.ids["LPN"]}
        refused(
            await http.post(f"/api/v1/shifts/{sid}/swap", json=lpn, headers=as_ann),
            "shift.role_not_held",
            location="body.replacement",
        )
        past = await world.api.post(
            "/api/v1/shifts", json=shift(ann, datetime.now(UTC) - timedelta(days=3), 8)
        )
        assert past.status_code == 201, past.text
        refused(
            await http.post(f"/api/v1/shifts/{past.json()['id']}/swap", json=swap, headers=as_ann),
            "swap.shift_not_future",
        )
        asked = await http.post(f"/api/v1/shifts/{sid}/swap", json=swap, headers=as_ann)
        assert asked.status_code == 200, asked.text
        decision = {"approve": True, "decided_by": "anyone"}
        refused(
            await http.post(f"/api/v1/shifts/{sid}/swap/decision", json=decision, headers=as_er),
            "swap.not_department_scheduler",
            403,
        )
        decided = await http.post(f"/api/v1/shifts/{sid}/swap/decision", json=decision, headers=as_ward)
        assert decided.status_code == 200, decided.text
        done = decided.json()
        assert done["employee_id"] == bob and done["swap_request"]["decidedBy"] == "ward-sched"
        assert done["swap_request"]["payrollFlag"] == {"hoursMoved": 12.0, "from": f"Practitioner/{ann}"}


async def test_offboarding_from_every_source(world: World, tmp_path: Path) -> None:
    engine, api = world.engine, world.api
    ann, bob, old = world.ids["ANN"], world.ids["BOB"], world.ids["OLD"]
    for who, day in ((bob, 3), (old, 0)):
        made = await api.post("/api/v1/shifts", json=shift(who, MONDAY + timedelta(days=day), 8))
        assert made.status_code == 201, made.text
    assert engine.scheduler is not None
    assert (await engine.scheduler.run_job("credential_expiry"))[0] == "ok"  # OLD's RN licence: an alert
    alerts = (await api.get("/api/v1/compliance/status")).json()["departments"][WARD]["credential_alerts"]
    assert alerts == {"expiring-30d": 1}

    # /api/v1: Ann leaves; her future shift is open again, an event says so; no new shift for her
    left = employee("ANN", credential("RN"), credential("BLS"), active=False)
    assert (await api.put(f"/api/v1/employees/{ann}", json=left)).status_code == 200
    unfilled = (await api.get("/api/v1/shifts", params={"unfilled": "true"})).json()["items"]
    assert [(s["id"], s["status"]) for s in unfilled] == [(world.shift_ann["id"], "open")]
    refused(
        await api.post("/api/v1/shifts", json=shift(ann, MONDAY + timedelta(days=5), 8)),
        "shift.employee_inactive",
    )
    event = outbox(engine, "practitioner.offboarded")[-1]
    assert event == {
        "version": 1,
        "resource": f"Practitioner/{ann}",
        "versionId": 2,
        "releasedShifts": [f"Shift/{world.shift_ann['id']}"],
        "alertsClosed": 0,
    }

    # FHIR: Bob's Practitioner set inactive
    fhir = (await api.get(f"/fhir/Practitioner/{bob}")).json()
    put = await api.put(f"/fhir/Practitioner/{bob}", json={**fhir, "active": False}, headers=FHIR_JSON)
    assert put.status_code == 200, put.text
    assert len((await api.get("/api/v1/shifts", params={"unfilled": "true"})).json()["items"]) == 2

    # CSV roster: Old marked inactive; her credential alert is closed
    roster = csv_bytes(
        ["employee_id", "npi", "family_name", "given_name", "active"],
        [["OLD", "", "StaffOLD", "Test", "N"]],
    )
    report = await ingest(engine, tmp_path, "staff_roster", roster)
    assert report.errors == [] and report.stored == 1, report.errors
    assert len((await api.get("/api/v1/shifts", params={"unfilled": "true"})).json()["items"]) == 3
    status = (await api.get("/api/v1/compliance/status")).json()
    assert status["credential_scan"]["open_by_threshold"] == {}
    offboarded = outbox(engine, "practitioner.offboarded")
    assert [e["resource"] for e in offboarded] == [f"Practitioner/{p}" for p in (ann, bob, old)]
    assert offboarded[-1]["alertsClosed"] == 1


async def test_offboarding_from_an_mfn_m02_deactivation(world: World) -> None:
    raw = (ROOT / "samples" / "hl7" / "mfn_m02.hl7").read_bytes()
    added = await world.engine.pipeline.process_hl7(raw, Hl7Policy("mfn_in"))
    assert added.ack_code == "AA", added.ack
    staff = (await world.api.get("/api/v1/employees", params={"limit": 200})).json()["items"]
    amara = next(e["id"] for e in staff if e["npi"] == "1356702989")
    made = await world.api.post("/api/v1/shifts", json=shift(amara, MONDAY + timedelta(days=4), 8, role=None))
    assert made.status_code == 201, made.text
    # MFE-1 MDC: the master file deactivates her
    segments = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    kept = [s for s in segments if s.startswith((b"MSH", b"MFI"))] + segments[2:5]
    deactivate = b"\r".join(kept).replace(b"S-M02-0001", b"S-M02-0099").replace(b"MFE|MAD|", b"MFE|MDC|")
    done = await world.engine.pipeline.process_hl7(deactivate + b"\r", Hl7Policy("mfn_in"))
    assert done.ack_code == "AA", done.ack
    unfilled = (await world.api.get("/api/v1/shifts", params={"unfilled": "true"})).json()["items"]
    assert [(s["id"], s["status"]) for s in unfilled] == [(made.json()["id"], "open")]
    assert outbox(world.engine, "practitioner.offboarded")[-1]["resource"] == f"Practitioner/{amara}"
    refused(
        await world.api.post("/api/v1/shifts", json=shift(amara, MONDAY + timedelta(days=5), 8)),
        "shift.employee_inactive",
    )
