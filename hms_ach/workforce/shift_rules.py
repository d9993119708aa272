"""The shift assignment rules, one function for every path that writes a Shift (/api/v1, FHIR, CSV).

:func:`check_shift` takes the canonical Shift record (``start``, ``end``, ``status``, ``role.text``,
``practitioner.reference``) and raises :class:`~hms_ach.workforce.rules.RuleBroken` with the code of
the first rule it breaks:

| code | rule |
|---|---|
| ``shift.invalid_time`` | start and end are dateTimes with a UTC offset |
| ``shift.ends_before_start`` | the shift ends after it starts |
| ``shift.unknown_status`` | status is planned, confirmed, swapped, cancelled or open |
| ``shift.open_with_employee`` | status ``open`` is for an unfilled shift only |
| ``shift.too_long`` | no longer than ``workforce.max_shift_hours`` |
| ``shift.unknown_employee`` | the employee exists |
| ``shift.employee_inactive`` | the employee is active (an offboarded one gets no new shifts) |
| ``shift.role_not_held`` | the employee holds the shift's role (a qualification of the role's code) |
| ``shift.credential_missing`` | the employee holds every credential the role requires |
| ``shift.credential_expired`` | ... each valid (not failed) on every day of the shift |
| ``shift.overlap`` | no other shift of the employee overlaps it |
| ``shift.rest_too_short`` | at least ``workforce.min_rest_hours`` between two shifts of the employee |
| ``shift.weekly_hours_exceeded`` | at most ``workforce.max_weekly_hours`` scheduled per local week |

Weeks and days are LOCAL, in the department's time zone, resolved as overtime resolves it
(``workforce.overtime.department_timezones``, else ``default_timezone``): the department is the
shift's ``department.display``, else the employee's department extension. A week runs from Monday
00:00 to the next Monday 00:00 local time (so a shift late on Sunday evening at -05:00, already
Monday in UTC, counts in the week it started locally), and a credential must be valid on every local
day the shift touches.

The role and credential rules apply to the roles listed in ``workforce.role_credentials`` (role ->
required credential types); a shift of a role not listed is not checked for qualifications. An
unfilled shift (no employee) or a cancelled one is checked for its times, status and length only.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from hms_ach.workforce.rules import (
    CREDENTIAL_SYSTEM,
    Roster,
    RuleBroken,
    department_of,
    ext,
    overlapping_shift,
    practitioner_of,
)
from hms_ach.workforce.settings import WorkforceSettings, current

#: The statuses a Shift may have (``open``: an unfilled shift waiting for someone).
SHIFT_STATUSES = ("planned", "confirmed", "swapped", "cancelled", "open")
VERIFICATION_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-status"
#: Verification states that make a credential unusable whatever its dates.
UNUSABLE = frozenset({"failed", "expired"})


def instant(text: Any, element: str, code: str) -> datetime:
    """A stored dateTime with a UTC offset, or :class:`RuleBroken` ``code`` at ``element``."""
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise RuleBroken(code, f"{element} is not a dateTime with a UTC offset", element)
    return value


def credential_type(q: dict[str, Any]) -> str | None:
    """The type code of a qualification (its credential-type coding, else its first code, else text)."""
    code = q.get("code") or {}
    codings = code.get("coding") or []
    for c in codings:
        if c.get("system") == CREDENTIAL_SYSTEM and c.get("code"):
            return str(c["code"])
    for c in codings:
        if c.get("code"):
            return str(c["code"])
    text = code.get("text")
    return str(text) if text else None


def _day(text: Any) -> date | None:
    try:
        return date.fromisoformat(str(text)[:10]) if text else None
    except ValueError:
        return None


def valid_between(q: dict[str, Any], first: date, last: date) -> bool:
    """Whether qualification ``q`` is valid on every day from ``first`` to ``last``: its period covers
    them (an open end is no limit) and its verification did not fail."""
    if ext(q, VERIFICATION_EXT) in UNUSABLE:
        return False
    period = q.get("period") or {}
    start, end = _day(period.get("start")), _day(period.get("end"))
    if period.get("end") and end is None:
        return False  # an end we cannot read is no proof of validity
    return (start is None or start <= first) and (end is None or end >= last)


def local_week_start(moment: datetime, zone: tzinfo) -> datetime:
    """Monday 00:00 local time (in ``zone``) of the week of ``moment``, as an aware datetime."""
    day = moment.astimezone(zone).date()
    monday = day - timedelta(days=day.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=zone)


def next_week_start(week: datetime) -> datetime:
    """The Monday 00:00 local time after ``week`` (one from :func:`local_week_start`); wall-clock
    arithmetic in the week's own zone, so a week with a DST change lasts 167 or 169 hours."""
    return week + timedelta(days=7)


def shift_zone(
    content: dict[str, Any], employee: dict[str, Any] | None, settings: WorkforceSettings
) -> tzinfo:
    """The time zone of the shift's local days and weeks: its department's (``department.display``,
    else the employee's department), as overtime resolves it."""
    department = (content.get("department") or {}).get("display")
    if not department and employee is not None:
        department = department_of(employee)
    return settings.overtime.timezone(str(department) if department else None)


def check_qualified(
    employee: dict[str, Any],
    role: str,
    start: datetime,
    end: datetime,
    settings: WorkforceSettings,
    zone: tzinfo | None = None,
) -> None:
    """The employee holds ``role`` and every credential it requires, valid on the shift's local days
    (in ``zone``; default UTC)."""
    quals = employee.get("qualification") or []
    held = {credential_type(q) for q in quals}
    if role not in held:
        raise RuleBroken("shift.role_not_held", f"the employee holds no {role[:40]} qualification", "role")
    here = zone or UTC
    first, last = start.astimezone(here).date(), (end - timedelta(microseconds=1)).astimezone(here).date()
    for needed in settings.required_credentials(role):
        mine = [q for q in quals if credential_type(q) == needed]
        if not mine:
            raise RuleBroken(
                "shift.credential_missing",
                f"role {role[:40]} requires a {needed[:40]} credential, which the employee does not hold",
                "practitioner",
            )
        if not any(valid_between(q, first, last) for q in mine):
            raise RuleBroken(
                "shift.credential_expired",
                f"the employee's {needed[:40]} credential is not valid on every day of the shift "
                f"({first.isoformat()} to {last.isoformat()})",
                "practitioner",
            )


def _period(s: dict[str, Any]) -> tuple[datetime, datetime] | None:
    try:
        return datetime.fromisoformat(s["start"]), datetime.fromisoformat(s["end"])
    except (KeyError, TypeError, ValueError):
        return None


def check_limits(
    roster: Roster,
    ref: str,
    start: datetime,
    end: datetime,
    skip: str | None,
    settings: WorkforceSettings,
    zone: tzinfo | None = None,
) -> None:
    """No overlap, enough rest before and after, and the scheduled hours of each local week (in
    ``zone``, default UTC) within the limit."""
    here = zone or settings.overtime.timezone(None)
    rest = timedelta(hours=settings.min_rest_hours)
    lo = min(start - rest, local_week_start(start, here))
    hi = max(end + rest, next_week_start(local_week_start(end, here)))
    others = [
        s
        for s in roster.shifts_around(ref, lo, hi)
        if s.get("id") != skip and s.get("status") != "cancelled" and practitioner_of(s) == ref
    ]
    clash = overlapping_shift(others, ref, start, end, skip)
    if clash:
        raise RuleBroken(
            "shift.overlap", f"the employee already works shift {clash} then", "start", other=clash
        )
    weekly: dict[datetime, float] = {}

    def add(s_start: datetime, s_end: datetime) -> None:
        at = s_start
        while at < s_end:  # a shift over Sunday midnight (local) counts in both weeks
            week = local_week_start(at, here)
            nxt = min(s_end, next_week_start(week))
            weekly[week] = weekly.get(week, 0.0) + (nxt - at) / timedelta(hours=1)
            at = nxt

    for s in others:
        period = _period(s)
        if period is None:
            continue
        s_start, s_end = period
        gap = max(start - s_end, s_start - end)
        if gap < rest:
            raise RuleBroken(
                "shift.rest_too_short",
                f"only {gap / timedelta(hours=1):g} h of rest between this shift and shift {s.get('id')} "
                f"(at least {settings.min_rest_hours:g} h)",
                "start",
            )
        add(s_start, s_end)
    before = dict(weekly)
    add(start, end)
    for week, hours in sorted(weekly.items()):
        if hours != before.get(week) and hours > settings.max_weekly_hours:
            raise RuleBroken(
                "shift.weekly_hours_exceeded",
                f"{round(hours, 2):g} h scheduled in the week of {week.date().isoformat()} "
                f"({week.tzname()} time; at most {settings.max_weekly_hours:g} h)",
                "start",
            )


def check_shift(
    roster: Roster,
    content: dict[str, Any],
    rid: str | None,
    settings: WorkforceSettings | None = None,
) -> None:
    """Every assignment rule (see the module docstring) for the Shift ``content`` (record id ``rid``,
    None for a new one); the first broken rule raises :class:`RuleBroken`."""
    settings = settings or current()
    start = instant(content.get("start"), "start", "shift.invalid_time")
    end = instant(content.get("end"), "end", "shift.invalid_time")
    if end <= start:
        raise RuleBroken("shift.ends_before_start", "the shift ends before it starts", "end")
    status = content.get("status")
    if status not in SHIFT_STATUSES:
        raise RuleBroken(
            "shift.unknown_status",
            f"shift status {str(status)[:32]!r} is not one of {', '.join(SHIFT_STATUSES)}",
            "status",
        )
    ref = practitioner_of(content)
    if status == "open" and ref:
        raise RuleBroken(
            "shift.open_with_employee", "status open is for an unfilled shift (no employee)", "status"
        )
    hours = (end - start) / timedelta(hours=1)
    if hours > settings.max_shift_hours:
        raise RuleBroken(
            "shift.too_long",
            f"the shift lasts {round(hours, 2):g} h (at most {settings.max_shift_hours:g} h)",
            "end",
        )
    if "practitioner" in content and not ref:  # named, but no stored employee (a CSV row's unknown one)
        raise RuleBroken("shift.unknown_employee", "the shift names no stored employee", "practitioner")
    if not ref or status == "cancelled":
        return
    rtype, _, employee_id = ref.partition("/")
    employee = roster.employee(employee_id) if rtype == "Practitioner" and employee_id else None
    if employee is None:
        raise RuleBroken("shift.unknown_employee", f"no employee {ref[:80]}", "practitioner")
    if employee.get("active") is False:
        raise RuleBroken(
            "shift.employee_inactive", "the employee is inactive and takes no new shifts", "practitioner"
        )
    zone = shift_zone(content, employee, settings)
    role = (content.get("role") or {}).get("text")
    if role and str(role) in settings.role_credentials:
        check_qualified(employee, str(role), start, end, settings, zone)
    check_limits(roster, ref, start, end, rid, settings, zone)


__all__ = [
    "SHIFT_STATUSES",
    "check_qualified",
    "check_shift",
    "credential_type",
    "local_week_start",
    "shift_zone",
    "valid_between",
]
