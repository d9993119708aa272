"""The workforce rules: shifts, overlaps, swaps, timecards, overtime and credentials.

Plain functions over the stored records (the FHIR-shaped JSON of Practitioner, ``Shift`` and
``Timecard``), with no HTTP and no SQL. What a rule must look up (an employee, a shift, the shifts
or the timecards of ONE employee around a time) it asks a :class:`Roster`: the store answers over
the writer's transaction (:class:`hms_ach.store.workforce_queries.StoredRoster`), a unit test over
a list. A request that breaks a rule raises a :class:`WorkforceError` that names the rule, says
what is wrong and which request field is at fault; the HTTP layer (:mod:`hms_ach.workforce.api`)
maps each error class to its status and answers with problem details:

* :class:`InvalidRequest`: a time without a UTC offset, an end before its start, an unknown
  employee, a shift overlapping another of the same employee;
* :class:`RecordNotFound`: the shift the request is about does not exist;
* :class:`StateConflict`: a swap decision on a shift that has no swap request waiting.

* :class:`NotPermitted`: a rule on who may act (a swap asked by someone not the owner...);
* :class:`RuleBroken`: a workforce rule with its stable code (``shift.credential_expired``...): the
  rules themselves are in :mod:`hms_ach.workforce.shift_rules`, :mod:`hms_ach.workforce.swap_rules`,
  :mod:`hms_ach.workforce.timecard_rules` and :mod:`hms_ach.workforce.overtime`, configured by the
  ``workforce:`` section of channels.yaml (:mod:`hms_ach.workforce.settings`).

Overlap rule: two shifts of one employee overlap when their half-open periods ``[start, end)``
intersect; a cancelled shift overlaps nothing, and a shift never overlaps itself
(:func:`overlapping_shift`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from hms_ach.core.errors import HmsAchError

STAFF_SYSTEM = "urn:hms-ach:id:staff"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SHIFT_SYSTEM = "urn:hms-ach:id:shift"
TIMECARD_SYSTEM = "urn:hms-ach:id:timecard"
CREDENTIAL_SYSTEM = "urn:hms-ach:code:credential-type"
DEPARTMENT_EXT = "urn:hms-ach:fhir:StructureDefinition/department"
SOURCE_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-source"
STATE_EXT = "urn:hms-ach:fhir:StructureDefinition/issuing-state"
#: The scheduled job whose alerts the compliance figures (hms_ach/workforce/compliance.py) report.
CREDENTIAL_SCAN_JOB = "credential_expiry"


# ---------------------------------------------------------------------------- errors
class WorkforceError(HmsAchError):
    """A request breaks a workforce rule.

    ``title`` names the rule broken, ``detail`` says what is wrong; ``field`` is the request field
    at fault (``start``, ``employee_id``...) and ``reason`` what is wrong with it, when one is."""

    def __init__(
        self,
        title: str,
        detail: str,
        field: str | None = None,
        reason: str | None = None,
        code: str | None = None,
    ):
        self.title, self.detail, self.field, self.reason, self.code = title, detail, field, reason, code
        super().__init__(f"{field}: {detail}" if field else detail)


class InvalidRequest(WorkforceError):
    """The request cannot be applied as it is (bad times, unknown employee, overlapping shift)."""


class RecordNotFound(WorkforceError):
    """The record the request is about does not exist."""


class StateConflict(WorkforceError):
    """The record is not in a state that allows the request (no swap request waiting)."""


class NotPermitted(WorkforceError):
    """A rule says who may do this, and the caller is not one of them (not the shift's owner...)."""


class RuleBroken(InvalidRequest):
    """A workforce rule refuses the record: ``code`` names the rule (stable, e.g.
    ``shift.credential_expired``), ``element`` the record element at fault (``practitioner``,
    ``start``, ``clockIn``...), which each path names in its own terms (a request field, a CSV
    column, a FHIR expression)."""

    def __init__(
        self, code: str, detail: str, element: str, field: str | None = None, other: str | None = None
    ):
        super().__init__("Workforce rule broken", detail, field or element, detail, code)
        self.element = element
        self.other = other  # the id of the record it clashes with (an overlapping shift), if any


# ---------------------------------------------------------------------------- lookups
class Roster(Protocol):
    """The reads the rules need, inside the transaction that writes their result."""

    def employee(self, employee_id: str) -> dict[str, Any] | None:
        """The live Practitioner ``employee_id`` (record id), or None."""
        ...

    def shift(self, shift_record_id: str) -> dict[str, Any] | None:
        """The live Shift ``shift_record_id`` (record id), or None."""
        ...

    def shifts_around(self, practitioner: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """At least every shift of ``practitioner`` (a reference) that may overlap ``[start, end)``."""
        ...

    def timecards_between(self, practitioner: str, since: datetime, before: datetime) -> list[dict[str, Any]]:
        """At least every timecard of ``practitioner`` (a reference) clocking in in ``[since, before)``."""
        ...


# ---------------------------------------------------------------------------- record fields
def aware(value: datetime, field: str) -> datetime:
    """``value`` if it has a UTC offset; a naive time is refused (it would be read as local time)."""
    if value.tzinfo is None:
        raise InvalidRequest("Invalid request", "times need a UTC offset", field, "no UTC offset")
    return value


def iso(value: datetime) -> str:
    """A UTC instant as stored: ``2026-12-01T07:00:00Z``."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ext(obj: dict[str, Any], url: str) -> Any:
    """The value (string or code) of the first extension ``url`` of ``obj``, or None."""
    for e in obj.get("extension") or []:
        if e.get("url") == url:
            return e.get("valueString", e.get("valueCode"))
    return None


def practitioner_of(record: dict[str, Any]) -> str:
    """The ``practitioner`` reference of a Shift or Timecard ("" when it has none)."""
    return (record.get("practitioner") or {}).get("reference") or ""


def department_of(practitioner: dict[str, Any]) -> str | None:
    return ext(practitioner, DEPARTMENT_EXT)  # type: ignore[no-any-return]


def without_meta(record: dict[str, Any]) -> dict[str, Any]:
    """The content of a stored record to write back: without its ``id`` and ``meta``."""
    return {k: v for k, v in record.items() if k not in ("id", "meta")}


def existing_shift(roster: Roster, shift_record_id: str) -> dict[str, Any]:
    """The Shift ``shift_record_id``, or :class:`RecordNotFound`."""
    existing = roster.shift(shift_record_id)
    if existing is None:
        raise RecordNotFound("Not found", f"no shift {shift_record_id[:64]}")
    return existing


# ---------------------------------------------------------------------------- overlaps
def overlapping_shift(
    shifts: Iterable[dict[str, Any]], practitioner: str, start: datetime, end: datetime, skip: str | None
) -> str | None:
    """The id of the shift among ``shifts`` that ``practitioner`` (a reference) works during
    ``[start, end)``: not ``skip`` (the shift being replaced), not cancelled; the earliest such
    shift when there are several. Shifts whose times cannot be read are no clash."""
    clashes = []
    for s in shifts:
        if s.get("id") == skip or s.get("status") == "cancelled":
            continue
        if practitioner_of(s) != practitioner:
            continue
        try:
            s_start, s_end = datetime.fromisoformat(s["start"]), datetime.fromisoformat(s["end"])
        except (KeyError, TypeError, ValueError):
            continue
        if s_start < end and start < s_end:
            clashes.append((s_start.astimezone(UTC), str(s["id"])))
    return min(clashes)[1] if clashes else None


# ---------------------------------------------------------------------------- weeks
def week_start(instant: datetime) -> datetime:
    """Monday 00:00 UTC of the ISO week of ``instant``."""
    day = instant.astimezone(UTC).date()
    monday = day - timedelta(days=day.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=UTC)


# ---------------------------------------------------------------------------- credentials
def days_left(valid_to: str | None, today: date) -> int | None:
    """Days from ``today`` to a credential's last valid day (negative: expired; None: no end)."""
    if not valid_to:
        return None
    return (date.fromisoformat(valid_to[:10]) - today).days


def credential_due(left: int | None, within_days: int | None, include_expired: bool) -> bool:
    """Whether a credential with ``left`` days left is listed: every one without ``within_days``;
    with it, those ending within that many days, the expired ones only with ``include_expired``."""
    if within_days is None:
        return True
    if left is None or left > within_days:
        return False
    return left >= 0 or include_expired


def credential_ends(practitioner: dict[str, Any]) -> list[str | None]:
    """The last valid day (``period.end`` as stored) of each of the practitioner's qualifications."""
    return [(q.get("period") or {}).get("end") for q in practitioner.get("qualification") or []]
