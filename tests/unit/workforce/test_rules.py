"""The workforce rules on their own: over an in-memory roster, with no HTTP and no database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from hms_ach.workforce import rules
from hms_ach.workforce.compliance import Inputs, compliance
from hms_ach.workforce.rules import InvalidRequest
from tests.unit.workforce.memory_roster import MONDAY, TUESDAY, MemoryRoster


def stored_shift(rid: str, who: str | None, start: datetime, hours: int = 12, **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "id": rid,
        "meta": {"versionId": "1"},
        "resourceType": "Shift",
        "identifier": [{"system": rules.SHIFT_SYSTEM, "value": f"S-{rid}"}],
        "start": rules.iso(start),
        "end": rules.iso(start + timedelta(hours=hours)),
        "status": "planned",
        **extra,
    }
    if who:
        res["practitioner"] = {"reference": f"Practitioner/{who}"}
    return res


def card(rid: str, who: str, clock_in: datetime, minutes: int) -> dict[str, Any]:
    return {
        "id": rid,
        "identifier": [{"system": rules.TIMECARD_SYSTEM, "value": f"T-{rid}"}],
        "practitioner": {"reference": f"Practitioner/{who}"},
        "clockIn": rules.iso(clock_in),
        "workedMinutes": minutes,
    }


@pytest.fixture
def roster() -> MemoryRoster:
    ward = {"extension": [{"url": rules.DEPARTMENT_EXT, "valueString": "4 West"}]}
    return MemoryRoster(
        employees={"ann": {"id": "ann", **ward}, "bob": {"id": "bob"}},
        shifts={"s1": stored_shift("s1", "ann", TUESDAY), "s2": stored_shift("s2", "bob", MONDAY)},
    )


# ---------------------------------------------------------------------------- times
def test_times_need_a_utc_offset() -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.aware(datetime(2026, 12, 1, 7), "start")
    assert (err.value.title, err.value.field, err.value.reason) == (
        "Invalid request",
        "start",
        "no UTC offset",
    )
    assert rules.iso(datetime(2026, 12, 1, 2, tzinfo=UTC) - timedelta(hours=5)) == "2026-11-30T21:00:00Z"


# ---------------------------------------------------------------------------- overlaps
def test_the_earliest_live_overlapping_shift_of_that_employee_is_named() -> None:
    shifts = [
        stored_shift("late", "ann", TUESDAY + timedelta(hours=6)),
        stored_shift("early", "ann", TUESDAY),
        stored_shift("gone", "ann", TUESDAY - timedelta(hours=6), status="cancelled"),
        stored_shift("other", "bob", TUESDAY - timedelta(hours=6)),
        {"id": "broken", "practitioner": {"reference": "Practitioner/ann"}, "start": "soon"},
    ]
    ann = "Practitioner/ann"
    assert rules.overlapping_shift(
        shifts, ann, TUESDAY + timedelta(hours=8), TUESDAY + timedelta(hours=9), None
    ) == ("early")
    assert (
        rules.overlapping_shift(shifts, ann, TUESDAY - timedelta(hours=6), TUESDAY, None) is None
    )  # back to back
    assert (
        rules.overlapping_shift(shifts, ann, TUESDAY, TUESDAY + timedelta(hours=1), "early") is None
    )  # itself
    assert rules.overlapping_shift(
        shifts, ann, TUESDAY + timedelta(hours=11), TUESDAY + timedelta(hours=13), "early"
    ) == ("late")


def test_weeks_start_on_monday_utc() -> None:
    sunday_night = datetime(2026, 12, 6, 23, 30, tzinfo=UTC) - timedelta(hours=5)  # still Sunday, UTC
    assert rules.week_start(sunday_night) == datetime(2026, 11, 30, tzinfo=UTC)
    assert rules.week_start(datetime(2026, 12, 7, 1, tzinfo=UTC)) == datetime(2026, 12, 7, tzinfo=UTC)


# ---------------------------------------------------------------------------- credentials and compliance
def test_credentials_due() -> None:
    today = date(2026, 12, 1)
    assert rules.days_left(None, today) is None
    assert rules.days_left("2026-12-31", today) == 30
    assert rules.days_left("2026-11-30T00:00:00Z", today) == -1
    assert rules.credential_due(None, None, False) and rules.credential_due(-5, None, False)
    assert rules.credential_due(30, 30, False) and not rules.credential_due(31, 30, False)
    assert not rules.credential_due(None, 30, True)
    assert not rules.credential_due(-1, 30, False) and rules.credential_due(-1, 30, True)


@dataclass(frozen=True)
class Alert:
    practitioner_id: str
    credential: str
    expires: str
    threshold: str
    created_at: datetime


@dataclass(frozen=True)
class Run:
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    detail: str | None


def practitioner(rid: str, dept: str | None, *ends: str, active: bool = True) -> dict[str, Any]:
    res: dict[str, Any] = {
        "id": rid,
        "active": active,
        "qualification": [
            {"identifier": [{"value": f"{rid}-{i}"}], "period": {"end": end}} for i, end in enumerate(ends)
        ],
    }
    if dept:
        res["extension"] = [{"url": rules.DEPARTMENT_EXT, "valueString": dept}]
    return res


def test_compliance_figures_by_department() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    staff = [
        practitioner("p1", "ICU", "2026-11-01", "2026-12-20", "2027-12-31"),
        practitioner("p2", "ICU", "2026-12-10", active=False),
        practitioner("p3", None, "2026-12-31"),
    ]
    shifts = [
        {
            "id": "u1",
            "status": "planned",
            "end": "2026-12-02T00:00:00+00:00",
            "department": {"display": "ICU"},
        },
        {
            "id": "u2",
            "status": "cancelled",
            "end": "2026-12-02T00:00:00+00:00",
            "department": {"display": "ICU"},
        },
        {
            "id": "u3",
            "status": "planned",
            "end": "2026-11-30T00:00:00+00:00",
            "department": {"display": "ICU"},
        },
    ]
    timecards = [
        {**card("t1", "p1", now - timedelta(hours=10), 600), "department": "ICU"},
        {**card("t2", "p3", now, 60), "department": "ER"},
    ]
    alerts = [
        Alert("p1", "p1-0", "2026-11-01", "expired", now - timedelta(hours=2)),
        Alert(
            "p1", "p1-1", "2026-12-01", "expiring-30d", datetime(2026, 11, 1, tzinfo=UTC)
        ),  # renewed since: closed
        Alert("p3", "p3-0", "2026-12-31", "expiring-30d", now - timedelta(days=3)),
    ]
    run = Run("ok", now - timedelta(minutes=5), now, None)
    figures = compliance(Inputs(staff, shifts, timecards, list(alerts), run), now, 30)
    unresolved = {"organization": None, "resolution": "unresolved", "offboarded": 0, "overtime_cost": 0.0}
    no_time = {"hours_worked": 0.0, "overtime_hours": 0.0, "overtime_hours_unpriced": 0.0}
    assert figures.departments == {
        "(none)": {
            **unresolved,
            **no_time,
            "names": [],
            "active_staff": 1,
            "expired_credentials": 0,
            "expiring_credentials": 1,
            "unfilled_shifts": 0,
            "credential_alerts": {"expiring-30d": 1},
        },
        "ER": {
            **unresolved,
            **no_time,
            "names": ["ER"],
            "active_staff": 0,
            "expired_credentials": 0,
            "expiring_credentials": 0,
            "unfilled_shifts": 0,
            "hours_worked": 1.0,
            "credential_alerts": {},
        },
        "ICU": {
            **unresolved,
            "names": ["ICU"],
            "active_staff": 1,
            "expired_credentials": 1,
            "expiring_credentials": 1,
            "unfilled_shifts": 1,
            "hours_worked": 10.0,
            "overtime_hours": 2.0,
            "overtime_hours_unpriced": 2.0,
            "credential_alerts": {"expired": 1},
        },
    }
    assert figures.totals == {
        "active_staff": 2,
        "expired_credentials": 1,
        "expiring_credentials": 2,
        "unfilled_shifts": 1,
        "offboarded": 0,
        "hours_worked": 11.0,
        "overtime_hours": 2.0,
        "overtime_hours_unpriced": 2.0,
        "overtime_cost": 0.0,
        "credential_alerts": {"expired": 1, "expiring-30d": 1},
    }
    assert figures.credential_scan == {
        "last_run": {
            "status": "ok",
            "started_at": "2026-12-01T11:55:00Z",
            "finished_at": "2026-12-01T12:00:00Z",
            "detail": None,
        },
        "alerts_raised": 3,
        "raised_by_threshold": {"expired": 1, "expiring-30d": 2},
        "raised_last_24h": 1,
        "open_by_threshold": {"expired": 1, "expiring-30d": 1},
        "last_alert_at": "2026-12-01T10:00:00Z",
    }


def test_no_scan_yet() -> None:
    figures = compliance(Inputs([], [], [], [], None), datetime(2026, 12, 1, tzinfo=UTC), 30)
    assert figures.departments == {} and figures.totals["active_staff"] == 0
    assert figures.credential_scan["last_run"] is None and figures.credential_scan["last_alert_at"] is None
