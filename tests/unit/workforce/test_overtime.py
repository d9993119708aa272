"""The overtime rule applied to stored timecards from any source, in clock-in order."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.workforce.rules import overtime_by_timecard


def card(rid: str, who: str, clock_in: str, minutes: int) -> dict[str, Any]:
    return {
        "id": rid,
        "practitioner": {"reference": f"Practitioner/{who}"},
        "clockIn": clock_in,
        "workedMinutes": minutes,
    }


def test_the_card_that_crosses_the_daily_line_carries_the_overtime() -> None:
    # stored out of order (a CSV file need not be sorted): the 12:00 card is the second of the day
    cards = [
        card("b", "p1", "2026-12-01T12:00:00+00:00", 300),
        card("a", "p1", "2026-12-01T06:00:00+00:00", 300),
        card("c", "p2", "2026-12-01T06:00:00+00:00", 300),
    ]
    assert overtime_by_timecard(cards) == {"a": 0, "b": 120, "c": 0}


def test_a_long_shift_and_the_weekly_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMS_ACH_OVERTIME_DAILY_HOURS", "12")
    monkeypatch.setenv("HMS_ACH_OVERTIME_WEEKLY_HOURS", "40")
    # Monday to Thursday of ISO week 49, 2026: 4 x 11 h = 44 h, so 4 h over the week on Thursday
    days = ["2026-11-30", "2026-12-01", "2026-12-02", "2026-12-03"]
    cards = [card(d, "p1", f"{d}T07:00:00-05:00", 660) for d in days]
    cards.append(card("long", "p2", "2026-12-01T06:55:00-05:00", 745))  # 12 h 25 min: 25 min over the day
    assert overtime_by_timecard(cards) == {days[0]: 0, days[1]: 0, days[2]: 0, days[3]: 240, "long": 25}


def test_cards_with_unreadable_times_are_left_out() -> None:
    assert overtime_by_timecard([card("x", "p1", "not a time", 60), {"id": "y"}]) == {}
