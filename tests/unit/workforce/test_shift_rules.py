"""The shift assignment rules over an in-memory roster: one case per rule code."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from hms_ach.workforce import rules
from hms_ach.workforce.rules import RuleBroken
from hms_ach.workforce.settings import OvertimeSettings, WorkforceSettings
from hms_ach.workforce.shift_rules import check_shift, valid_between
from tests.unit.workforce.memory_roster import (
    MONDAY,
    RN_RULES,
    TUESDAY,
    MemoryRoster,
    nurse,
    qualification,
    stored_shift,
)


@pytest.fixture
def roster() -> MemoryRoster:
    return MemoryRoster(
        employees={
            "ann": nurse("ann"),
            "old": nurse("old", qualification("RN", "2026-12-01"), qualification("BLS")),
            "lpn": nurse("lpn", qualification("LPN")),
            "gone": nurse("gone", active=False),
            "nobls": nurse("nobls", qualification("RN")),
            "failed": nurse("failed", qualification("RN", status="failed"), qualification("BLS")),
        },
        shifts={"s1": stored_shift("s1", "ann", TUESDAY)},
    )


def shift(who: str | None, start: Any = MONDAY, hours: float = 12, **extra: Any) -> dict[str, Any]:
    content = stored_shift("new", who, start, hours, **extra)
    return {k: v for k, v in content.items() if k not in ("id", "meta")}


def code(roster: MemoryRoster, content: dict[str, Any], settings: WorkforceSettings = RN_RULES) -> str:
    with pytest.raises(RuleBroken) as err:
        check_shift(roster, content, None, settings)
    return err.value.code or ""


def test_a_valid_assignment_passes(roster: MemoryRoster) -> None:
    check_shift(roster, shift("ann", MONDAY - timedelta(days=3)), None, RN_RULES)
    check_shift(roster, shift(None, TUESDAY, status="open"), None, RN_RULES)  # open: unfilled
    check_shift(roster, shift("gone", TUESDAY, status="cancelled"), None, RN_RULES)  # cancelled: times only


@pytest.mark.parametrize(
    ("who", "change", "expected", "element"),
    [
        ("ann", {"start": "tomorrow"}, "shift.invalid_time", "start"),
        ("ann", {"end": "2026-11-30T06:00:00Z"}, "shift.ends_before_start", "end"),
        ("ann", {"status": "maybe"}, "shift.unknown_status", "status"),
        ("ann", {"status": "open"}, "shift.open_with_employee", "status"),
        ("ann", {"end": "2026-12-01T07:00:00Z"}, "shift.too_long", "end"),
        ("eve", {}, "shift.unknown_employee", "practitioner"),
        ("gone", {}, "shift.employee_inactive", "practitioner"),
        ("lpn", {}, "shift.role_not_held", "role"),
        ("ann", {"role": {"text": "MD"}}, "shift.role_not_held", "role"),
        ("nobls", {}, "shift.credential_missing", "practitioner"),
        (
            "old",
            {"start": "2026-12-01T20:00:00Z", "end": "2026-12-02T06:00:00Z"},
            "shift.credential_expired",
            "practitioner",
        ),
        ("failed", {}, "shift.credential_expired", "practitioner"),
        ("ann", {"start": "2026-12-01T13:00:00Z", "end": "2026-12-01T20:00:00Z"}, "shift.overlap", "start"),
        (
            "ann",
            {"start": "2026-12-01T20:00:00Z", "end": "2026-12-02T04:00:00Z"},
            "shift.rest_too_short",
            "start",
        ),
    ],
)
def test_each_rule_refuses_with_its_code(
    roster: MemoryRoster, who: str, change: dict[str, Any], expected: str, element: str
) -> None:
    content = {**shift(who), **change}
    with pytest.raises(RuleBroken) as err:
        check_shift(roster, content, None, RN_RULES)
    assert (err.value.code, err.value.element) == (expected, element), err.value.detail


def test_the_weekly_hours_limit(roster: MemoryRoster) -> None:
    # ann works Tuesday (12 h); four more 12 h days make 60 h, a fifth makes 72 h
    for i, day in enumerate((2, 3, 4)):
        roster.shifts[f"w{i}"] = stored_shift(f"w{i}", "ann", MONDAY + timedelta(days=day))
    check_shift(roster, shift("ann", MONDAY), None, RN_RULES)  # 60 h: at the limit
    roster.shifts["w9"] = stored_shift("w9", "ann", MONDAY)
    assert code(roster, shift("ann", MONDAY + timedelta(days=5))) == "shift.weekly_hours_exceeded"
    # the next week is another week
    check_shift(roster, shift("ann", MONDAY + timedelta(days=7)), None, RN_RULES)


def test_limits_come_from_the_settings(roster: MemoryRoster) -> None:
    short = WorkforceSettings(max_shift_hours=8, min_rest_hours=0)
    assert code(roster, shift(None), short) == "shift.too_long"
    # without role rules a role is not checked for qualifications
    check_shift(roster, shift("lpn", MONDAY - timedelta(days=3)), None, WorkforceSettings())
    # no rest needed: back to back is fine
    back_to_back = shift("ann", TUESDAY + timedelta(hours=12), hours=8)
    check_shift(roster, back_to_back, None, short)
    assert code(roster, back_to_back) == "shift.rest_too_short"


def test_moving_a_shift_is_no_clash_with_itself(roster: MemoryRoster) -> None:
    moved = {**shift("ann", TUESDAY + timedelta(hours=2))}
    check_shift(roster, moved, "s1", RN_RULES)
    with pytest.raises(RuleBroken):
        check_shift(roster, moved, None, RN_RULES)


def test_a_credential_is_valid_on_every_day_of_the_shift() -> None:
    q = qualification("RN", "2026-12-01")
    first, last = MONDAY.date(), TUESDAY.date()
    assert valid_between(q, first, last)
    assert not valid_between(q, first, last + timedelta(days=1))
    assert not valid_between(qualification("RN", status="expired"), first, last)
    assert valid_between(qualification("RN", None), first, last)  # no end
    assert not valid_between({**q, "period": {"end": "soon"}}, first, last)
    assert rules.practitioner_of({"practitioner": {"reference": "Practitioner/x"}}) == "Practitioner/x"


def test_the_weekly_limit_counts_the_local_week() -> None:
    # 4 West works at -05:00. Five 12 h shifts Monday to Friday of the local week of 30 Nov make 60 h;
    # a shift from 19:00 on Sunday 6 Dec local (00:00 Monday 7 Dec UTC) is in that local week.
    eastern = WorkforceSettings(
        role_credentials=RN_RULES.role_credentials,
        overtime=OvertimeSettings(department_timezones={"4 West": "America/New_York"}),
    )
    local_monday = MONDAY + timedelta(hours=5)  # 07:00 local
    roster = MemoryRoster(
        employees={"ann": nurse("ann")},
        shifts={f"w{d}": stored_shift(f"w{d}", "ann", local_monday + timedelta(days=d)) for d in range(5)},
    )
    sunday_evening = local_monday + timedelta(days=6, hours=12)  # 2026-12-07T00:00Z
    assert sunday_evening.weekday() == 0  # Monday, in UTC
    late = shift("ann", sunday_evening, hours=4)
    assert code(roster, late, eastern) == "shift.weekly_hours_exceeded"
    with pytest.raises(RuleBroken) as err:
        check_shift(roster, late, None, eastern)
    assert "week of 2026-11-30" in err.value.detail
    # counted per UTC week (no department time zone), the same shift is in the next week and passes
    check_shift(roster, late, None, RN_RULES)
    # without a shift department, the employee's department decides the zone
    late.pop("department", None)
    assert code(roster, late, eastern) == "shift.weekly_hours_exceeded"


def test_a_credential_is_checked_on_the_local_days() -> None:
    # the BLS certificate ends on 6 Dec; a shift from 20:00 on 6 Dec at -05:00 is 01:00 on 7 Dec in UTC
    eastern = WorkforceSettings(
        role_credentials=RN_RULES.role_credentials,
        overtime=OvertimeSettings(department_timezones={"4 West": "America/New_York"}),
    )
    roster = MemoryRoster(
        employees={"ann": nurse("ann", qualification("RN"), qualification("BLS", "2026-12-06"))}
    )
    evening = shift("ann", MONDAY + timedelta(days=6, hours=18), hours=3)  # 2026-12-07T01:00Z
    check_shift(roster, evening, None, eastern)
    assert code(roster, evening, RN_RULES) == "shift.credential_expired"
