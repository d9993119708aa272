"""Overtime: minutes over a rule set's lines, counted per LOCAL day in the department's time zone.

Every timecard, whatever wrote it (API, CSV, FHIR), is counted the same way: each employee's
timecards are taken in clock-in order, and a timecard belongs to the local day (and week, and 14-day
period) of its clock-in in its department's time zone (``workforce.overtime.department_timezones``,
else ``default_timezone``): a night shift from 19:00 to 07:00 at -05:00 is one day's work, the day it
started. The timecard that crosses a line carries the overtime. The rule set of an employee is the
contract they carry (the Practitioner extension :data:`CONTRACT_EXT`, a valueCode naming one of
``workforce.overtime.contracts``), else their department's contract (the same table, by department
name), else the default:

| rule set | overtime |
|---|---|
| ``daily`` | minutes over ``daily_hours`` in one local day |
| ``weekly`` | minutes over ``weekly_hours`` (40: FLSA) in one local week, Monday to Sunday |
| ``daily_weekly`` | both: over the day, then the straight time over the week (the default) |
| ``8/80`` | over ``daily_hours`` (8) a day, then the straight time over ``period_hours`` (80) in the 14-day period |

Minutes counted as daily overtime are not counted again towards the weekly or period line.

Minutes are integers; :func:`hours` shows them as hours rounded to 2 decimals (no float noise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hms_ach.workforce.rules import RuleBroken, ext
from hms_ach.workforce.settings import ContractOvertime, OvertimeSettings, WorkforceSettings, current

#: The Practitioner extension (valueCode) naming the employee's overtime contract.
CONTRACT_EXT = "urn:hms-ach:fhir:StructureDefinition/overtime-contract"

#: How far back the timecards that decide one timecard's overtime may clock in (a 14-day period).
LOOKBACK = timedelta(days=15)


def hours(minutes: int) -> float:
    """``minutes`` as hours rounded to 2 decimals: 760 -> 12.67, never 12.669999999999998."""
    return round(minutes / 60, 2)


def clock_in(tc: dict[str, Any]) -> datetime | None:
    """The clock-in of a timecard, as an aware datetime (None: missing, unreadable or naive)."""
    try:
        value = datetime.fromisoformat(str(tc.get("clockIn")))
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def contract_code(practitioner: dict[str, Any] | None) -> str | None:
    """The overtime contract code a Practitioner carries (:data:`CONTRACT_EXT`), or None."""
    code = ext(practitioner, CONTRACT_EXT) if practitioner else None
    return str(code) if code else None


def contracts_of(practitioners: Iterable[dict[str, Any] | None]) -> dict[str, str | None]:
    """The contract each stored Practitioner carries, by reference (``Practitioner/<id>``), for
    :func:`overtime_by_timecard`."""
    return {f"Practitioner/{p.get('id')}": contract_code(p) for p in practitioners if p is not None}


def check_contract(
    practitioner: dict[str, Any],
    code: str,
    element: str = "overtimeContract",
    settings: WorkforceSettings | None = None,
) -> None:
    """The contract the Practitioner carries, if any, is one of ``workforce.overtime.contracts``;
    else :class:`RuleBroken` ``code`` (``employee.unknown_contract``, ``timecard.unknown_contract``)
    at ``element``."""
    name = contract_code(practitioner)
    known = (settings or current()).overtime.contracts
    if name is not None and name not in known:
        listed = ", ".join(sorted(known)[:20]) or "none are configured"
        raise RuleBroken(
            code,
            f"overtime contract {name[:64]!r} is not one of workforce.overtime.contracts ({listed})",
            element,
        )


def _line(prior: int, worked: int, limit: int) -> int:
    """The minutes of ``worked`` past ``limit`` after ``prior`` minutes already counted."""
    return max(0, prior + worked - limit) - max(0, prior - limit)


def minutes_over(contract: ContractOvertime, day: int, regular: int, worked: int) -> tuple[int, int]:
    """(overtime, regular minutes) of ``worked`` minutes after ``day`` minutes worked that day and
    ``regular`` minutes of straight time already in the week (or the 14-day period, for 8/80).

    The daily line is applied first; only the minutes it left as straight time count towards the
    weekly (or period) line, so no minute is overtime twice."""
    daily_line = contract.rule_set in ("daily", "daily_weekly", "8/80")
    daily = _line(day, worked, round(contract.daily_hours * 60)) if daily_line else 0
    straight = worked - daily
    if contract.rule_set == "daily":
        return daily, straight
    limit = contract.period_hours if contract.rule_set == "8/80" else contract.weekly_hours
    longer = _line(regular, straight, round(limit * 60))
    return daily + longer, straight


def _period_index(day: date, settings: OvertimeSettings) -> int:
    return (day - settings.period_start).days // 14


def overtime_by_timecard(
    timecards: Iterable[dict[str, Any]],
    settings: WorkforceSettings | None = None,
    contracts: Mapping[str, str | None] | None = None,
) -> dict[str, int]:
    """Overtime minutes of every timecard (by record id; see the module docstring). ``contracts``
    names the contract each employee carries (by Practitioner reference, :func:`contract_code`); an
    employee not in it, or whose contract is no longer configured, counts by their department's.
    Timecards whose clock-in cannot be read are left out; an open one (not clocked out) counts no
    minutes yet."""
    ot = (settings or current()).overtime
    carried = contracts or {}
    per_employee: dict[str, list[tuple[datetime, str, dict[str, Any]]]] = {}
    for tc in timecards:
        start = clock_in(tc)
        if start is not None:
            who = str((tc.get("practitioner") or {}).get("reference") or "")
            per_employee.setdefault(who, []).append((start.astimezone(UTC), str(tc.get("id")), tc))
    out: dict[str, int] = {}
    for who, cards in per_employee.items():
        cards.sort(key=lambda item: (item[0], item[1]))
        by_day: dict[date, int] = {}
        by_week: dict[tuple[int, int], int] = {}
        by_period: dict[int, int] = {}
        for start, rid, tc in cards:
            department = tc.get("department")
            local = start.astimezone(ot.timezone(department if isinstance(department, str) else None))
            day = local.date()
            iso = local.isocalendar()
            week, period = (iso.year, iso.week), _period_index(day, ot)
            worked = int(tc.get("workedMinutes") or 0)
            contract = ot.contract(department if isinstance(department, str) else None, carried.get(who))
            prior = by_period.get(period, 0) if contract.rule_set == "8/80" else by_week.get(week, 0)
            out[rid], straight = minutes_over(contract, by_day.get(day, 0), prior, worked)
            by_day[day] = by_day.get(day, 0) + worked
            by_week[week] = by_week.get(week, 0) + straight
            by_period[period] = by_period.get(period, 0) + straight
    return out


__all__ = [
    "CONTRACT_EXT",
    "LOOKBACK",
    "check_contract",
    "clock_in",
    "contract_code",
    "contracts_of",
    "hours",
    "minutes_over",
    "overtime_by_timecard",
]
