"""The workforce rules on their own: over an in-memory roster, with no HTTP and no database."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from hms_ach.workforce import rules
from hms_ach.workforce.rules import (
    ClockedPeriod,
    InvalidRequest,
    OvertimeLimits,
    RecordNotFound,
    ShiftPlan,
    StateConflict,
)

MONDAY = datetime(2026, 11, 30, 7, tzinfo=UTC)  # ISO week 49 of 2026
TUESDAY = MONDAY + timedelta(days=1)


@dataclass
class Roster:
    """Employees, shifts and timecards by record id; the lookups answer exactly (no index superset)."""

    employees: dict[str, dict[str, Any]] = field(default_factory=dict)
    shifts: dict[str, dict[str, Any]] = field(default_factory=dict)
    timecards: list[dict[str, Any]] = field(default_factory=list)

    def employee(self, employee_id: str) -> dict[str, Any] | None:
        return self.employees.get(employee_id)

    def shift(self, shift_record_id: str) -> dict[str, Any] | None:
        return self.shifts.get(shift_record_id)

    def shifts_around(self, practitioner: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return list(self.shifts.values())  # a superset: the rule decides

    def timecards_between(self, practitioner: str, since: datetime, before: datetime) -> list[dict[str, Any]]:
        return [
            tc
            for tc in self.timecards
            if rules.practitioner_of(tc) == practitioner
            and since <= datetime.fromisoformat(tc["clockIn"]) < before
        ]


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
def roster() -> Roster:
    ward = {"extension": [{"url": rules.DEPARTMENT_EXT, "valueString": "4 West"}]}
    return Roster(
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


# ---------------------------------------------------------------------------- shifts
def test_a_shift_ends_after_it_starts(roster: Roster) -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.shift_record(roster, ShiftPlan(start=TUESDAY, end=TUESDAY), None)
    assert (err.value.title, err.value.field) == ("Invalid shift", "end")


def test_a_shift_names_a_known_employee(roster: Roster) -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.shift_record(roster, ShiftPlan(start=MONDAY, end=TUESDAY, employee_id="eve"), None)
    assert (err.value.field, err.value.reason, err.value.detail) == (
        "employee_id",
        "unknown employee",
        "no employee eve",
    )


def test_an_employee_works_one_shift_at_a_time_unless_it_is_cancelled(roster: Roster) -> None:
    plan = ShiftPlan(start=TUESDAY + timedelta(hours=2), end=TUESDAY + timedelta(hours=4), employee_id="ann")
    with pytest.raises(InvalidRequest) as err:
        rules.shift_record(roster, plan, None)
    assert (err.value.title, err.value.field, err.value.reason) == (
        "Overlapping shift",
        "start",
        "overlaps shift s1",
    )
    assert err.value.detail == "the employee already works shift s1 then"
    cancelled = rules.shift_record(roster, replace(plan, status="cancelled"), None)
    assert cancelled.content["practitioner"] == {"reference": "Practitioner/ann"}
    # moving s1 itself is no clash with itself
    moved = rules.shift_record(roster, plan, roster.shifts["s1"])
    assert moved.key_value == "S-s1" and moved.content["start"] == "2026-12-01T09:00:00Z"


def test_a_new_shift_record(roster: Roster) -> None:
    plan = ShiftPlan(
        start=MONDAY + timedelta(days=3),
        end=MONDAY + timedelta(days=3, hours=8),
        status="confirmed",
        shift_id="N1",
        employee_id="bob",
        role="RN",
        department="4 West",
        location_id="ward-4w",
    )
    rec = rules.shift_record(roster, plan, None)
    assert (rec.resource_type, rec.key_system, rec.key_value, rec.mode) == (
        "Shift",
        rules.SHIFT_SYSTEM,
        "N1",
        "replace",
    )
    assert rec.content == {
        "resourceType": "Shift",
        "start": "2026-12-03T07:00:00Z",
        "end": "2026-12-03T15:00:00Z",
        "status": "confirmed",
        "identifier": [{"system": rules.SHIFT_SYSTEM, "value": "N1"}],
        "practitioner": {"reference": "Practitioner/bob"},
        "role": {"text": "RN"},
        "department": {"display": "4 West"},
        "location": {"reference": "Location/ward-4w"},
    }
    unfilled = rules.shift_record(roster, ShiftPlan(start=MONDAY, end=TUESDAY), None)
    assert "practitioner" not in unfilled.content and unfilled.key_value  # a new shift id


def test_a_replaced_shift_keeps_its_swap_request(roster: Roster) -> None:
    roster.shifts["s1"]["swapRequest"] = {"status": "requested"}
    rec = rules.shift_record(
        roster, ShiftPlan(start=TUESDAY, end=TUESDAY + timedelta(hours=1)), roster.shifts["s1"]
    )
    assert rec.content["swapRequest"] == {"status": "requested"} and rec.key_value == "S-s1"


# ---------------------------------------------------------------------------- swaps
def test_a_swap_request(roster: Roster) -> None:
    with pytest.raises(RecordNotFound):
        rules.swap_request(roster, "nope", "ann", "bob")
    with pytest.raises(InvalidRequest) as err:
        rules.swap_request(roster, "s1", "ann", "eve")
    assert (err.value.title, err.value.field, err.value.detail) == (
        "Invalid swap",
        "replacement",
        "unknown replacement",
    )
    rec = rules.swap_request(roster, "s1", "ann", "bob", now=MONDAY)
    assert "id" not in rec.content and "meta" not in rec.content and rec.key_value == "S-s1"
    assert rec.content["swapRequest"] == {
        "requestedBy": {"reference": "Practitioner/ann"},
        "replacement": {"reference": "Practitioner/bob"},
        "status": "requested",
        "requestedAt": "2026-11-30T07:00:00Z",
    }
    assert rec.content["practitioner"] == {"reference": "Practitioner/ann"}  # until it is approved


def test_only_a_waiting_swap_is_decided(roster: Roster) -> None:
    with pytest.raises(StateConflict) as err:
        rules.swap_decision(roster, "s1", True, "mgr")
    assert err.value.title == "No open swap request"
    roster.shifts["s1"]["swapRequest"] = {"status": "rejected"}
    with pytest.raises(StateConflict):
        rules.swap_decision(roster, "s1", False, None)


def test_an_approved_swap_moves_the_shift_to_the_replacement(roster: Roster) -> None:
    roster.shifts["s1"] = rules.swap_request(roster, "s1", "ann", "bob").content | {"id": "s1"}
    rec = rules.swap_decision(roster, "s1", True, "mgr", now=TUESDAY)
    assert (
        rec.content["practitioner"] == {"reference": "Practitioner/bob"}
        and rec.content["status"] == "swapped"
    )
    swap = rec.content["swapRequest"]
    assert (swap["status"], swap["decidedBy"], swap["decidedAt"]) == (
        "approved",
        "mgr",
        "2026-12-01T07:00:00Z",
    )
    rejected = rules.swap_decision(roster, "s1", False, None)
    assert rejected.content["practitioner"] == {"reference": "Practitioner/ann"}
    assert rejected.content["status"] == "planned" and "decidedBy" not in rejected.content["swapRequest"]


def test_a_swap_is_not_approved_onto_a_replacement_already_working(roster: Roster) -> None:
    roster.shifts["s3"] = stored_shift("s3", "bob", TUESDAY + timedelta(hours=10))
    roster.shifts["s1"] = rules.swap_request(roster, "s1", "ann", "bob").content | {"id": "s1"}
    with pytest.raises(InvalidRequest) as err:
        rules.swap_decision(roster, "s1", True, None)
    assert (err.value.field, err.value.detail) == ("approve", "the replacement already works shift s3 then")
    assert rules.swap_decision(roster, "s1", False, None).content["swapRequest"]["status"] == "rejected"


# ---------------------------------------------------------------------------- timecards and overtime
def test_a_timecard_clocks_out_after_it_clocks_in() -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.check_clock_times(TUESDAY, TUESDAY - timedelta(hours=1))
    assert (err.value.title, err.value.field) == ("Invalid timecard", "clock_out")
    with pytest.raises(InvalidRequest) as naive:
        rules.check_clock_times(datetime(2026, 12, 1, 7), TUESDAY)
    assert naive.value.field == "clock_in"
    assert rules.check_clock_times(TUESDAY, TUESDAY + timedelta(hours=1)) == (
        TUESDAY,
        TUESDAY + timedelta(hours=1),
    )


def test_overtime_minutes_over_the_day_or_the_week() -> None:
    limits = OvertimeLimits(daily_minutes=480, weekly_minutes=2400)
    assert rules.overtime_minutes(0, 0, 480, limits) == 0
    assert rules.overtime_minutes(420, 420, 120, limits) == 60  # crosses the daily line
    assert rules.overtime_minutes(600, 600, 60, limits) == 60  # already over: all of it
    assert rules.overtime_minutes(0, 2300, 240, limits) == 140  # the weekly line is more
    assert rules.overtime_minutes(0, 0, 600, OvertimeLimits(720, 2400)) == 0


def test_overtime_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HMS_ACH_OVERTIME_DAILY_HOURS", raising=False)
    monkeypatch.delenv("HMS_ACH_OVERTIME_WEEKLY_HOURS", raising=False)
    assert OvertimeLimits.from_env() == OvertimeLimits(480, 2400)
    monkeypatch.setenv("HMS_ACH_OVERTIME_DAILY_HOURS", "7.5")
    assert OvertimeLimits.from_env().daily_minutes == 450
    assert rules.overtime_minutes(0, 0, 480) == 30


def test_weeks_start_on_monday_utc() -> None:
    sunday_night = datetime(2026, 12, 6, 23, 30, tzinfo=UTC) - timedelta(hours=5)  # still Sunday, UTC
    assert rules.week_start(sunday_night) == datetime(2026, 11, 30, tzinfo=UTC)
    assert rules.week_start(datetime(2026, 12, 7, 1, tzinfo=UTC)) == datetime(2026, 12, 7, tzinfo=UTC)
    cards = [card("a", "ann", MONDAY, 60), card("b", "ann", MONDAY + timedelta(days=8), 60), {"id": "x"}]
    assert rules.weeks_by_employee(cards) == {
        "Practitioner/ann": {datetime(2026, 11, 30, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC)}
    }


def test_prior_minutes_count_earlier_cards_of_that_day_and_week() -> None:
    ann = "Practitioner/ann"
    cards = [
        card("mon", "ann", MONDAY, 600),
        card("tue", "ann", TUESDAY, 240),
        card("later", "ann", TUESDAY + timedelta(hours=9), 60),  # clocks in after: not before it
        card("same", "ann", TUESDAY + timedelta(hours=1), 60),  # the card being replaced
        card("bob", "bob", TUESDAY, 480),
    ]
    assert rules.prior_minutes(cards, ann, "T-same", TUESDAY + timedelta(hours=5)) == (240, 840)


def test_a_timecard_record_carries_its_worked_and_overtime_minutes(
    roster: Roster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HMS_ACH_OVERTIME_DAILY_HOURS", raising=False)
    monkeypatch.delenv("HMS_ACH_OVERTIME_WEEKLY_HOURS", raising=False)
    roster.timecards = [card("c1", "ann", TUESDAY, 420), card("c0", "ann", MONDAY - timedelta(days=1), 600)]
    period = ClockedPeriod("ann", TUESDAY + timedelta(hours=8), TUESDAY + timedelta(hours=10), "T9", "s1")
    rec = rules.timecard_record(roster, period)
    assert (rec.resource_type, rec.key_system, rec.key_value) == ("Timecard", rules.TIMECARD_SYSTEM, "T9")
    assert rec.content == {
        "resourceType": "Timecard",
        "identifier": [{"system": rules.TIMECARD_SYSTEM, "value": "T9"}],
        "practitioner": {"reference": "Practitioner/ann"},
        "clockIn": "2026-12-01T15:00:00Z",
        "clockOut": "2026-12-01T17:00:00Z",
        "workedMinutes": 120,
        "overtimeMinutes": 60,  # 7 h before it that day (the Sunday card is last week)
        "department": "4 West",  # the employee's
        "shift": {"reference": "Shift/s1"},
    }
    other = rules.timecard_record(
        roster, ClockedPeriod("bob", MONDAY, MONDAY + timedelta(hours=1), department="ER")
    )
    assert other.content["department"] == "ER" and other.key_value and "shift" not in other.content
    assert "department" not in rules.timecard_record(roster, ClockedPeriod("bob", MONDAY, TUESDAY)).content
    with pytest.raises(InvalidRequest) as err:
        rules.timecard_record(roster, ClockedPeriod("eve", MONDAY, TUESDAY))
    assert (err.value.title, err.value.field) == ("Invalid timecard", "employee_id")


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
    figures = rules.compliance(staff, shifts, timecards, list(alerts), run, now, 30)
    assert figures.departments == {
        "(none)": {
            "active_staff": 1,
            "expired_credentials": 0,
            "expiring_credentials": 1,
            "unfilled_shifts": 0,
            "overtime_hours": 0.0,
            "credential_alerts": {"expiring-30d": 1},
        },
        "ER": {
            "active_staff": 0,
            "expired_credentials": 0,
            "expiring_credentials": 0,
            "unfilled_shifts": 0,
            "overtime_hours": 0.0,
            "credential_alerts": {},
        },
        "ICU": {
            "active_staff": 1,
            "expired_credentials": 1,
            "expiring_credentials": 1,
            "unfilled_shifts": 1,
            "overtime_hours": 2.0,
            "credential_alerts": {"expired": 1},
        },
    }
    assert figures.totals == {
        "active_staff": 2,
        "expired_credentials": 1,
        "expiring_credentials": 2,
        "unfilled_shifts": 1,
        "overtime_hours": 2.0,
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
    figures = rules.compliance([], [], [], [], None, datetime(2026, 12, 1, tzinfo=UTC), 30)
    assert figures.departments == {} and figures.totals["active_staff"] == 0
    assert figures.credential_scan["last_run"] is None and figures.credential_scan["last_alert_at"] is None
