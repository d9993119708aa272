"""The timecard rules and kiosk clock events over an in-memory roster: one case per rule code."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from hms_ach.workforce import rules
from hms_ach.workforce.rules import InvalidRequest, RuleBroken, StateConflict
from hms_ach.workforce.settings import WorkforceSettings
from hms_ach.workforce.timecard_rules import (
    ClockedPeriod,
    check_clock_times,
    check_timecard,
    clock_in_record,
    clock_out_record,
    timecard_record,
)
from tests.unit.workforce.memory_roster import MONDAY, TUESDAY, MemoryRoster, card, nurse, stored_shift


@pytest.fixture
def roster() -> MemoryRoster:
    return MemoryRoster(
        employees={"ann": nurse("ann"), "bob": nurse("bob")},
        shifts={"s1": stored_shift("s1", "ann", TUESDAY), "s2": stored_shift("s2", "bob", TUESDAY)},
        timecards=[card("c1", "ann", MONDAY, 480)],
    )


def content(who: str, start: datetime, minutes: int, **extra: Any) -> dict[str, Any]:
    res = card("new", who, start, minutes, **extra)
    res.pop("id")
    return res


@pytest.mark.parametrize(
    ("tc", "expected", "element"),
    [
        (content("eve", TUESDAY, 60), "timecard.unknown_employee", "practitioner"),
        (
            {**content("ann", TUESDAY, 60), "practitioner": {"reference": ""}},
            "timecard.unknown_employee",
            "practitioner",
        ),
        ({**content("ann", TUESDAY, 60), "clockIn": "07:00"}, "timecard.invalid_time", "clockIn"),
        (
            {**content("ann", TUESDAY, 60), "clockOut": "2026-12-01T06:00:00Z"},
            "timecard.ends_before_start",
            "clockOut",
        ),
        (content("ann", TUESDAY, 25 * 60), "timecard.too_long", "clockOut"),
        (content("ann", TUESDAY, 60, shift={"reference": "Shift/nope"}), "timecard.unknown_shift", "shift"),
        (
            content("ann", TUESDAY, 60, shift={"reference": "Shift/s2"}),
            "timecard.shift_of_another_employee",
            "shift",
        ),
        (content("ann", MONDAY + timedelta(hours=7), 60), "timecard.overlap", "clockIn"),
    ],
)
def test_each_rule_refuses_with_its_code(
    roster: MemoryRoster, tc: dict[str, Any], expected: str, element: str
) -> None:
    with pytest.raises(RuleBroken) as err:
        check_timecard(roster, tc, None)
    assert (err.value.code, err.value.element) == (expected, element), err.value.detail


def test_a_valid_timecard_passes(roster: MemoryRoster) -> None:
    check_timecard(roster, content("ann", TUESDAY, 600, shift={"reference": "Shift/s1"}), None)
    check_timecard(roster, content("ann", MONDAY + timedelta(hours=8), 60), None)  # back to back
    check_timecard(roster, content("ann", MONDAY, 300), "c1")  # itself, rewritten
    check_timecard(roster, {**content("ann", MONDAY, 300), "identifier": [{"value": "T-c1"}]}, None)


def test_an_open_timecard_counts_as_running(roster: MemoryRoster) -> None:
    roster.timecards.append({**card("open", "ann", TUESDAY, 0), "clockOut": None})
    with pytest.raises(RuleBroken) as err:
        check_timecard(
            roster, content("ann", TUESDAY + timedelta(hours=3), 60), None, now=TUESDAY + timedelta(hours=4)
        )
    assert err.value.code == "timecard.overlap"


def test_kiosk_clock_in_and_out(roster: MemoryRoster) -> None:
    opened = clock_in_record(roster, "ann", TUESDAY, "K1", "s1")
    assert opened.key_value == "K1" and "clockOut" not in opened.content
    assert opened.content["department"] == "4 West" and opened.content["shift"] == {"reference": "Shift/s1"}
    roster.timecards.append({**opened.content, "id": "k1"})
    with pytest.raises(RuleBroken) as twice:
        clock_in_record(roster, "ann", TUESDAY + timedelta(hours=1))
    assert twice.value.code == "timecard.already_clocked_in"
    closed = clock_out_record(roster, "ann", TUESDAY + timedelta(hours=8, minutes=30))
    assert closed.key_value == "K1"
    assert (closed.content["clockOut"], closed.content["workedMinutes"]) == ("2026-12-01T15:30:00Z", 510)
    with pytest.raises(StateConflict) as none:
        clock_out_record(roster, "bob", TUESDAY)
    assert none.value.code == "timecard.not_clocked_in"
    with pytest.raises(RuleBroken) as nobody:
        clock_in_record(roster, "eve", TUESDAY)
    assert nobody.value.code == "timecard.unknown_employee"


def test_whole_timecards_from_a_request(roster: MemoryRoster) -> None:
    with pytest.raises(RuleBroken) as err:
        check_clock_times(TUESDAY, TUESDAY - timedelta(hours=1))
    assert (err.value.code, err.value.field) == ("timecard.ends_before_start", "clock_out")
    with pytest.raises(InvalidRequest) as naive:
        check_clock_times(TUESDAY.replace(tzinfo=None), TUESDAY)
    assert naive.value.field == "clock_in"
    roster.timecards.append(card("c2", "ann", TUESDAY - timedelta(hours=2), 60))  # 1 h earlier that day
    rec = timecard_record(roster, ClockedPeriod("ann", TUESDAY, TUESDAY + timedelta(hours=10), "T9", "s1"))
    assert rec.content["workedMinutes"] == 600 and rec.content["overtimeMinutes"] == 180
    assert rec.content["department"] == "4 West" and rec.content["shift"] == {"reference": "Shift/s1"}
    with pytest.raises(RuleBroken) as err:
        timecard_record(roster, ClockedPeriod("eve", MONDAY, TUESDAY))
    assert (err.value.code, err.value.field) == ("timecard.unknown_employee", "employee_id")
    with pytest.raises(RuleBroken) as err:
        timecard_record(roster, ClockedPeriod("ann", TUESDAY, TUESDAY + timedelta(hours=1), shift_id="s2"))
    assert (err.value.code, err.value.field) == ("timecard.shift_of_another_employee", "shift_id")
    limited = WorkforceSettings(max_timecard_hours=4)
    with pytest.raises(RuleBroken) as err:
        timecard_record(roster, ClockedPeriod("bob", TUESDAY, TUESDAY + timedelta(hours=5)), limited)
    assert (err.value.code, err.value.field) == ("timecard.too_long", "clock_out")
    assert rules.iso(TUESDAY) == "2026-12-01T07:00:00Z"
