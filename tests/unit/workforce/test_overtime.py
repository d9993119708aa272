"""Overtime from stored timecards of any source: per local day, by rule set, in integer minutes."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from hms_ach.workforce.overtime import (
    CONTRACT_EXT,
    check_contract,
    contract_code,
    hours,
    overtime_by_timecard,
)
from hms_ach.workforce.rules import RuleBroken
from hms_ach.workforce.settings import ContractOvertime, OvertimeSettings, WorkforceSettings


def card(rid: str, who: str, clock_in: str, minutes: int, department: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {
        "id": rid,
        "practitioner": {"reference": f"Practitioner/{who}"},
        "clockIn": clock_in,
        "workedMinutes": minutes,
    }
    if department:
        res["department"] = department
    return res


def rules(**overtime: Any) -> WorkforceSettings:
    return WorkforceSettings(overtime=OvertimeSettings(**overtime))


def test_the_card_that_crosses_the_daily_line_carries_the_overtime() -> None:
    # stored out of order (a CSV file need not be sorted): the 12:00 card is the second of the day
    cards = [
        card("b", "p1", "2026-12-01T12:00:00+00:00", 300),
        card("a", "p1", "2026-12-01T06:00:00+00:00", 300),
        card("c", "p2", "2026-12-01T06:00:00+00:00", 300),
    ]
    assert overtime_by_timecard(cards, WorkforceSettings()) == {"a": 0, "b": 120, "c": 0}


def test_a_long_shift_and_the_weekly_line() -> None:
    # Monday to Thursday of ISO week 49, 2026: 4 x 11 h = 44 h, so 4 h over the week on Thursday
    days = ["2026-11-30", "2026-12-01", "2026-12-02", "2026-12-03"]
    cards = [card(d, "p1", f"{d}T07:00:00-05:00", 660) for d in days]
    cards.append(card("long", "p2", "2026-12-01T06:55:00-05:00", 745))  # 12 h 25 min: 25 min over the day
    settings = rules(daily_hours=12, weekly_hours=40)
    assert overtime_by_timecard(cards, settings) == {
        days[0]: 0,
        days[1]: 0,
        days[2]: 0,
        days[3]: 240,
        "long": 25,
    }


def test_days_are_local_to_the_department() -> None:
    # two night shifts at -05:00: 13:00-19:00 and 19:00-23:00 local on Dec 1 are one local day (10 h),
    # though the second starts on Dec 2 in UTC
    cards = [
        card("day", "p1", "2026-12-01T18:00:00+00:00", 360, "4 West"),
        card("night", "p1", "2026-12-02T00:00:00+00:00", 240, "4 West"),
    ]
    local = rules(department_timezones={"4 West": "America/New_York"})
    assert overtime_by_timecard(cards, local) == {"day": 0, "night": 120}
    assert overtime_by_timecard(cards, WorkforceSettings()) == {"day": 0, "night": 0}  # UTC days: split


def test_rule_sets() -> None:
    # ten 9 h days in a 14-day period (90 h): daily 1 h each; 8/80 the more of 10 h daily or 10 h over 80
    days = [f"2026-12-{d:02d}" for d in (7, 8, 9, 10, 11, 14, 15, 16, 17, 18)]
    cards = [card(d, "p1", f"{d}T08:00:00+00:00", 540) for d in days]
    period = {"period_start": date(2026, 12, 7)}

    def total(**kw: Any) -> int:
        return sum(overtime_by_timecard(cards, rules(**period, **kw)).values())

    assert total(rule_set="daily") == 600
    assert total(rule_set="weekly") == 600  # 45 h in each week
    assert total(rule_set="8/80") == 600
    assert total(rule_set="8/80", daily_hours=12) == 600  # all of it from the 80 h line now
    assert total(rule_set="weekly", weekly_hours=50) == 0
    # per contract: the ER works 12 h days, weekly only
    er = rules(contracts={"ER": ContractOvertime(rule_set="daily", daily_hours=12)})
    assert overtime_by_timecard([card("x", "p1", "2026-12-07T08:00:00+00:00", 660, "ER")], er) == {"x": 0}
    assert overtime_by_timecard([card("x", "p1", "2026-12-07T08:00:00+00:00", 660, "ICU")], er) == {"x": 180}


def test_the_employee_contract_wins_over_the_department() -> None:
    er = rules(
        contracts={
            "ER": ContractOvertime(rule_set="daily", daily_hours=12),
            "SHORT": ContractOvertime(rule_set="daily", daily_hours=6),
        }
    )
    ann = [card("x", "p1", "2026-12-07T08:00:00+00:00", 660, "ER")]
    assert overtime_by_timecard(ann, er, {"Practitioner/p1": "SHORT"}) == {"x": 300}
    assert overtime_by_timecard(ann, er, {"Practitioner/p2": "SHORT"}) == {"x": 0}  # another's contract
    assert overtime_by_timecard(ann, er, {"Practitioner/p1": "GONE"}) == {"x": 0}  # unknown: the department's
    assert er.overtime.contract("ICU", "SHORT").daily_hours == 6


def test_an_unknown_contract_is_a_rule_error() -> None:
    carrying = {"extension": [{"url": CONTRACT_EXT, "valueCode": "NOPE"}]}
    assert contract_code(carrying) == "NOPE" and contract_code({}) is None and contract_code(None) is None
    with pytest.raises(RuleBroken) as err:
        check_contract(carrying, "employee.unknown_contract", settings=WorkforceSettings())
    assert (err.value.code, err.value.element) == ("employee.unknown_contract", "overtimeContract")
    check_contract({}, "employee.unknown_contract", settings=WorkforceSettings())  # none carried: fine


def test_hours_are_rounded_and_unreadable_cards_left_out() -> None:
    assert hours(760) == 12.67 and hours(0) == 0.0 and hours(1) == 0.02
    assert overtime_by_timecard([card("x", "p1", "not a time", 60), {"id": "y"}], WorkforceSettings()) == {}
    naive = card("z", "p1", "2026-12-01T08:00:00", 600)
    assert overtime_by_timecard([naive], WorkforceSettings()) == {}
