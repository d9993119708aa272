"""Shift records from requests, and the swap rules.

:func:`shift_record` builds the Shift of a /api/v1 request and checks it with
:func:`hms_ach.workforce.shift_rules.check_shift` (the rules every path applies). Swaps:

| code | rule |
|---|---|
| ``swap.not_owner`` | only the shift's owner, or a scheduler of its department, asks for a swap (403) |
| ``swap.shift_not_future`` | only a shift that has not started can be swapped or decided |
| ``swap.not_department_scheduler`` | only a scheduler of the shift's department decides (403) |
| (the assignment codes) | the replacement passes every assignment rule, reported at ``replacement`` |

The decision records who decided: the caller (its token's subject), never a name from the body. With
``workforce.swaps.auto_approve_qualified_peers`` a request whose replacement passes the rules and
holds the shift's role is approved at once (``decidedBy: "auto"``). An approved swap moves the shift's
hours from one employee to the other: the swap carries ``payrollFlag`` with the hours moved, for payroll.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hms_ach.core.records import RecordWrite
from hms_ach.workforce.overtime import hours
from hms_ach.workforce.rules import (
    SHIFT_SYSTEM,
    NotPermitted,
    Roster,
    RuleBroken,
    StateConflict,
    aware,
    existing_shift,
    iso,
    practitioner_of,
    without_meta,
)
from hms_ach.workforce.settings import WorkforceSettings, current
from hms_ach.workforce.shift_rules import check_shift


@dataclass(frozen=True)
class ShiftPlan:
    """A shift as a request describes it (``employee_id`` None: an unfilled shift)."""

    start: datetime
    end: datetime
    status: str = "planned"
    shift_id: str | None = None
    employee_id: str | None = None
    role: str | None = None
    department: str | None = None
    location_id: str | None = None


#: The /api/v1 request field of each Shift element a rule may name.
SHIFT_FIELDS = {
    "practitioner": "employee_id",
    "role": "role",
    "start": "start",
    "end": "end",
    "status": "status",
}


def as_field(exc: RuleBroken, fields: dict[str, str], default: str | None = None) -> RuleBroken:
    """``exc`` located at the request field of its element (``default``: the field for every element)."""
    exc.field = default or fields.get(exc.element, exc.element)
    return exc


def shift_record(
    roster: Roster,
    plan: ShiftPlan,
    existing: dict[str, Any] | None,
    settings: WorkforceSettings | None = None,
) -> RecordWrite:
    """The Shift record for ``plan``, replacing ``existing`` (None: a new shift), checked by every
    assignment rule. A replaced shift keeps its swap request."""
    start, end = aware(plan.start, "start"), aware(plan.end, "end")
    content: dict[str, Any] = {
        "resourceType": "Shift",
        "start": iso(start),
        "end": iso(end),
        "status": plan.status,
    }
    shift_id = plan.shift_id or (existing or {}).get("identifier", [{}])[0].get("value") or str(uuid.uuid4())
    content["identifier"] = [{"system": SHIFT_SYSTEM, "value": shift_id}]
    if plan.employee_id:
        content["practitioner"] = {"reference": f"Practitioner/{plan.employee_id}"}
    if plan.role:
        content["role"] = {"text": plan.role}
    if plan.department:
        content["department"] = {"display": plan.department}
    if plan.location_id:
        content["location"] = {"reference": f"Location/{plan.location_id}"}
    if existing and existing.get("swapRequest"):
        content["swapRequest"] = existing["swapRequest"]
    try:
        check_shift(roster, content, (existing or {}).get("id"), settings)
    except RuleBroken as exc:
        raise as_field(exc, SHIFT_FIELDS) from None
    return RecordWrite("shift", "Shift", SHIFT_SYSTEM, shift_id, content, mode="replace")


def _shift_write(existing: dict[str, Any], content: dict[str, Any]) -> RecordWrite:
    return RecordWrite(
        "shift", "Shift", SHIFT_SYSTEM, existing["identifier"][0]["value"], content, mode="replace"
    )


@dataclass(frozen=True)
class SwapCaller:
    """Who asks or decides: the token's subject, the employees it is, whether it may act on every
    department (``any_department``), and the departments it schedules."""

    subject: str
    own_ids: frozenset[str] = frozenset()
    any_department: bool = False
    departments: frozenset[str] = frozenset()

    def schedules(self, department: str | None) -> bool:
        return self.any_department or (department is not None and department in self.departments)


def _department(shift: dict[str, Any]) -> str | None:
    return (shift.get("department") or {}).get("display")


def _future(shift: dict[str, Any], now: datetime) -> None:
    if datetime.fromisoformat(str(shift["start"])) <= now:
        raise RuleBroken(
            "swap.shift_not_future", "the shift has started or is over: it can no longer be swapped", "start"
        )


def _as_replacement(
    roster: Roster, shift: dict[str, Any], replacement: str, settings: WorkforceSettings
) -> dict[str, Any]:
    """The shift as the replacement's, checked by every assignment rule (at ``replacement``)."""
    content = without_meta(shift)
    content["practitioner"] = {"reference": f"Practitioner/{replacement}"}
    if content.get("status") in ("open", "cancelled"):
        content["status"] = "planned"
    try:
        check_shift(roster, content, shift.get("id"), settings)
    except RuleBroken as exc:
        raise as_field(exc, SHIFT_FIELDS, "replacement") from None
    return content


def _decide(content: dict[str, Any], shift: dict[str, Any], approve: bool, by: str, now: datetime) -> None:
    swap = {**(content.get("swapRequest") or {}), "status": "approved" if approve else "rejected"}
    swap["decidedAt"], swap["decidedBy"] = iso(now), by
    if approve:
        moved = int(
            (datetime.fromisoformat(shift["end"]) - datetime.fromisoformat(shift["start"]))
            / timedelta(minutes=1)
        )
        swap["payrollFlag"] = {"hoursMoved": hours(moved), "from": practitioner_of(shift) or None}
        content["practitioner"] = {"reference": swap["replacement"]["reference"]}
        content["status"] = "swapped"
    content["swapRequest"] = swap


def swap_request(
    roster: Roster,
    shift_record_id: str,
    requested_by: str,
    replacement: str,
    caller: SwapCaller,
    now: datetime | None = None,
    settings: WorkforceSettings | None = None,
) -> RecordWrite:
    """The shift with a swap request to ``replacement`` waiting for a decision (or approved at once
    between qualified peers, when configured)."""
    settings = settings or current()
    now = now or datetime.now(UTC)
    shift = existing_shift(roster, shift_record_id)
    owner = practitioner_of(shift).partition("/")[2]
    if not (
        caller.schedules(_department(shift)) or (owner and owner in caller.own_ids and owner == requested_by)
    ):
        raise NotPermitted(
            "Forbidden",
            "only the shift's owner, or a scheduler of its department, may ask to swap it",
            "requested_by",
            "not the owner",
            "swap.not_owner",
        )
    _future(shift, now)
    candidate = _as_replacement(roster, shift, replacement, settings)
    content = without_meta(shift)
    content["swapRequest"] = {
        "requestedBy": {"reference": f"Practitioner/{requested_by}"},
        "replacement": {"reference": f"Practitioner/{replacement}"},
        "status": "requested",
        "requestedAt": iso(now),
    }
    role = (shift.get("role") or {}).get("text")
    if (
        settings.swaps.auto_approve_qualified_peers
        and role
        and (candidate.get("role") or {}).get("text") == role
    ):
        _decide(content, shift, True, "auto", now)
    return _shift_write(shift, content)


def swap_decision(
    roster: Roster,
    shift_record_id: str,
    approve: bool,
    caller: SwapCaller,
    now: datetime | None = None,
    settings: WorkforceSettings | None = None,
) -> RecordWrite:
    """The shift with its waiting swap request approved or rejected by ``caller``, a scheduler of the
    shift's department. Approved, the shift goes to the replacement (who must pass every assignment
    rule) with status ``swapped``; rejected, it stays as it is."""
    settings = settings or current()
    now = now or datetime.now(UTC)
    shift = existing_shift(roster, shift_record_id)
    if not caller.schedules(_department(shift)):
        raise NotPermitted(
            "Forbidden",
            "only a scheduler of the shift's department decides its swap",
            None,
            None,
            "swap.not_department_scheduler",
        )
    swap = shift.get("swapRequest") or {}
    if swap.get("status") != "requested":
        raise StateConflict("No open swap request", "this shift has no swap request waiting for a decision")
    _future(shift, now)
    content = without_meta(shift)
    if approve:
        _as_replacement(roster, shift, str(swap["replacement"]["reference"]).partition("/")[2], settings)
    _decide(content, shift, approve, caller.subject, now)
    return _shift_write(shift, content)


__all__ = [
    "SHIFT_FIELDS",
    "ShiftPlan",
    "SwapCaller",
    "as_field",
    "shift_record",
    "swap_decision",
    "swap_request",
]
