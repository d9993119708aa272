"""The timecard rules, one function for every path that writes a Timecard (/api/v1, CSV, kiosk events).

:func:`check_timecard` takes the canonical Timecard record (``practitioner.reference``, ``clockIn``,
``clockOut`` (absent while clocked in), ``shift.reference``) and raises
:class:`~hms_ach.workforce.rules.RuleBroken` with the code of the first rule it breaks:

| code | rule |
|---|---|
| ``timecard.unknown_employee`` | the timecard names a stored employee (never a stored orphan) |
| ``timecard.unknown_contract`` | the overtime contract the employee carries is configured |
| ``timecard.invalid_time`` | clockIn (and clockOut, when there) are dateTimes with a UTC offset |
| ``timecard.ends_before_start`` | it clocks out after it clocks in |
| ``timecard.too_long`` | no longer than ``workforce.max_timecard_hours`` |
| ``timecard.unknown_shift`` | a linked shift exists |
| ``timecard.shift_of_another_employee`` | a linked shift belongs to the same employee |
| ``timecard.overlap`` | no other timecard of the employee overlaps it (one still open counts as running) |

Kiosk events: :func:`clock_in_record` opens a timecard (refused with ``timecard.already_clocked_in``
when one is open), :func:`clock_out_record` closes the open one (``timecard.not_clocked_in`` when
there is none).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hms_ach.core.records import RecordWrite
from hms_ach.workforce.overtime import LOOKBACK, check_contract, contract_code, overtime_by_timecard
from hms_ach.workforce.rules import (
    TIMECARD_SYSTEM,
    Roster,
    RuleBroken,
    StateConflict,
    aware,
    department_of,
    iso,
    practitioner_of,
    without_meta,
)
from hms_ach.workforce.settings import WorkforceSettings, current
from hms_ach.workforce.shift_rules import instant


def _period(tc: dict[str, Any], now: datetime) -> tuple[datetime, datetime] | None:
    """A stored timecard's period; one still open runs until ``now`` (at least a minute)."""
    try:
        start = datetime.fromisoformat(str(tc["clockIn"]))
        end = datetime.fromisoformat(str(tc["clockOut"])) if tc.get("clockOut") else None
    except (KeyError, ValueError):
        return None
    if start.tzinfo is None or (end is not None and end.tzinfo is None):
        return None
    return start, end or max(now, start + timedelta(minutes=1))


def _employee(roster: Roster, ref: str) -> dict[str, Any]:
    rtype, _, rid = ref.partition("/")
    employee = roster.employee(rid) if rtype == "Practitioner" and rid else None
    if employee is None:
        raise RuleBroken(
            "timecard.unknown_employee",
            "the timecard names no stored employee" if not ref else f"no employee {ref[:80]}",
            "practitioner",
        )
    return employee


def open_timecards(
    roster: Roster, ref: str, before: datetime, settings: WorkforceSettings
) -> list[dict[str, Any]]:
    """The employee's timecards clocked in within ``max_timecard_hours`` before ``before`` and not
    clocked out."""
    since = before - timedelta(hours=settings.max_timecard_hours)
    return [
        tc
        for tc in roster.timecards_between(ref, since, before + timedelta(seconds=1))
        if practitioner_of(tc) == ref and not tc.get("clockOut")
    ]


def check_timecard(
    roster: Roster,
    content: dict[str, Any],
    rid: str | None,
    settings: WorkforceSettings | None = None,
    now: datetime | None = None,
) -> None:
    """Every timecard rule (see the module docstring) for ``content`` (record id ``rid``, None: new)."""
    settings = settings or current()
    ref = practitioner_of(content)
    check_contract(_employee(roster, ref), "timecard.unknown_contract", "practitioner", settings)
    start = instant(content.get("clockIn"), "clockIn", "timecard.invalid_time")
    end = (
        instant(content.get("clockOut"), "clockOut", "timecard.invalid_time")
        if content.get("clockOut")
        else None
    )
    if end is not None and end <= start:
        raise RuleBroken(
            "timecard.ends_before_start", "the timecard clocks out before it clocks in", "clockOut"
        )
    limit = timedelta(hours=settings.max_timecard_hours)
    if end is not None and end - start > limit:
        raise RuleBroken(
            "timecard.too_long",
            f"the timecard lasts {round((end - start) / timedelta(hours=1), 2):g} h "
            f"(at most {settings.max_timecard_hours:g} h)",
            "clockOut",
        )
    shift_ref = str((content.get("shift") or {}).get("reference") or "")
    if shift_ref:
        stype, _, sid = shift_ref.partition("/")
        shift = roster.shift(sid) if stype == "Shift" and sid else None
        if shift is None:
            raise RuleBroken("timecard.unknown_shift", f"no shift {shift_ref[:80]}", "shift")
        if practitioner_of(shift) != ref:
            raise RuleBroken(
                "timecard.shift_of_another_employee",
                f"shift {shift_ref[:80]} is not the employee's shift",
                "shift",
            )
    moment = now or datetime.now(start.tzinfo)
    mine_end = end or max(moment, start + timedelta(minutes=1))
    identity = (content.get("identifier") or [{}])[0].get("value")
    for other in roster.timecards_between(ref, start - limit, mine_end):
        if other.get("id") == rid or practitioner_of(other) != ref:
            continue
        if identity and (other.get("identifier") or [{}])[0].get("value") == identity:
            continue  # the same timecard, written again
        period = _period(other, moment)
        if period is not None and period[0] < mine_end and start < period[1]:
            raise RuleBroken(
                "timecard.overlap",
                f"the employee's timecard {other.get('id')} covers part of this period",
                "clockIn",
            )


@dataclass(frozen=True)
class ClockedPeriod:
    """A worked period as a request describes it."""

    employee_id: str
    clock_in: datetime
    clock_out: datetime
    timecard_id: str | None = None
    shift_id: str | None = None
    department: str | None = None


#: The /api/v1 request field of each Timecard element a rule may name.
TIMECARD_FIELDS = {
    "practitioner": "employee_id",
    "clockIn": "clock_in",
    "clockOut": "clock_out",
    "shift": "shift_id",
}


def check_clock_times(clock_in: datetime, clock_out: datetime) -> tuple[datetime, datetime]:
    """Both times have a UTC offset and the timecard clocks out after it clocks in."""
    clock_in, clock_out = aware(clock_in, "clock_in"), aware(clock_out, "clock_out")
    if clock_out <= clock_in:
        raise RuleBroken(
            "timecard.ends_before_start",
            "the timecard clocks out before it clocks in",
            "clockOut",
            "clock_out",
        )
    return clock_in, clock_out


def timecard_record(
    roster: Roster, period: ClockedPeriod, settings: WorkforceSettings | None = None
) -> RecordWrite:
    """The Timecard of ``period`` (times checked by :func:`check_clock_times`), checked by every
    timecard rule, with its worked minutes and its overtime as counted now (a read counts again)."""
    settings = settings or current()
    ref = f"Practitioner/{period.employee_id}"
    try:
        employee = _employee(roster, ref)
    except RuleBroken as exc:
        exc.field = "employee_id"
        raise
    tc_id = period.timecard_id or str(uuid.uuid4())
    worked = int((period.clock_out - period.clock_in) / timedelta(minutes=1))
    content: dict[str, Any] = {
        "resourceType": "Timecard",
        "identifier": [{"system": TIMECARD_SYSTEM, "value": tc_id}],
        "practitioner": {"reference": ref},
        "clockIn": iso(period.clock_in),
        "clockOut": iso(period.clock_out),
        "workedMinutes": worked,
        "department": period.department or department_of(employee),
        "shift": {"reference": f"Shift/{period.shift_id}"} if period.shift_id else None,
    }
    content = {k: v for k, v in content.items() if v is not None}
    try:
        check_timecard(roster, content, None, settings)
    except RuleBroken as exc:
        exc.field = TIMECARD_FIELDS.get(exc.element, exc.element)
        raise
    context = [
        tc
        for tc in roster.timecards_between(
            ref, period.clock_in - LOOKBACK, period.clock_in + timedelta(days=1)
        )
        if (tc.get("identifier") or [{}])[0].get("value") != tc_id
    ]
    counted = overtime_by_timecard(
        [*context, {**content, "id": "(new)"}], settings, {ref: contract_code(employee)}
    )
    content["overtimeMinutes"] = counted["(new)"]
    return _write(tc_id, content)


def _write(tc_id: str, content: dict[str, Any]) -> RecordWrite:
    body = {k: v for k, v in content.items() if v is not None}
    return RecordWrite("timecard", "Timecard", TIMECARD_SYSTEM, tc_id, body, mode="replace")


def clock_in_record(
    roster: Roster,
    employee_id: str,
    at: datetime,
    timecard_id: str | None = None,
    shift_id: str | None = None,
    department: str | None = None,
    settings: WorkforceSettings | None = None,
) -> RecordWrite:
    """A kiosk clock-in: an open Timecard (no clockOut yet) of ``employee_id`` from ``at``."""
    settings = settings or current()
    ref = f"Practitioner/{employee_id}"
    employee = _employee(roster, ref)
    if open_timecards(roster, ref, at, settings):
        raise RuleBroken(
            "timecard.already_clocked_in", "the employee is clocked in already: clock out first", "clockIn"
        )
    tc_id = timecard_id or str(uuid.uuid4())
    content: dict[str, Any] = {
        "resourceType": "Timecard",
        "identifier": [{"system": TIMECARD_SYSTEM, "value": tc_id}],
        "practitioner": {"reference": ref},
        "clockIn": iso(at),
        "department": department or department_of(employee),
        "shift": {"reference": f"Shift/{shift_id}"} if shift_id else None,
    }
    check_timecard(roster, content, None, settings, now=at)
    return _write(tc_id, content)


def clock_out_record(
    roster: Roster, employee_id: str, at: datetime, settings: WorkforceSettings | None = None
) -> RecordWrite:
    """A kiosk clock-out: the employee's open timecard closed at ``at``, with its worked minutes."""
    settings = settings or current()
    ref = f"Practitioner/{employee_id}"
    _employee(roster, ref)
    opened = open_timecards(roster, ref, at, settings)
    if not opened:
        raise StateConflict(
            "Not clocked in",
            f"the employee has no open timecard in the {settings.max_timecard_hours:g} h before this clock-out",
            "at",
            "no open timecard",
            "timecard.not_clocked_in",
        )
    current_card = max(opened, key=lambda tc: str(tc.get("clockIn")))
    content = without_meta(current_card)
    start = datetime.fromisoformat(str(content["clockIn"]))
    content["clockOut"] = iso(at)
    content["workedMinutes"] = max(0, int((at - start) / timedelta(minutes=1)))
    check_timecard(roster, content, str(current_card.get("id")), settings, now=at)
    return _write(str(content["identifier"][0]["value"]), content)


__all__ = [
    "TIMECARD_FIELDS",
    "ClockedPeriod",
    "check_clock_times",
    "timecard_record",
    "check_timecard",
    "clock_in_record",
    "clock_out_record",
    "open_timecards",
]
