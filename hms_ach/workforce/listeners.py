"""The workforce rules that follow a record change, whatever wrote it (/api/v1, FHIR, MFN^M02, CSV).

:func:`on_change` is a change listener (:mod:`hms_ach.store.changes`, subscribed by
:func:`hms_ach.app.wiring.wire_listeners`); it runs in the change's own transaction:

* **Offboarding.** A Practitioner that was active and is now ``active: false``: each of its shifts
  that has not started (and is not cancelled) is released: no employee, status ``open``; its
  credential alerts are closed (an alert of an inactive practitioner is no longer open, see
  :func:`hms_ach.workforce.compliance.credential_scan`; the expiry scan raises none for it); and
  ``practitioner.offboarded`` is written to the outbox with the shifts released and the number of
  alerts closed. New shifts for it are refused (``shift.employee_inactive``).
* **Overtime.** A Timecard, clocked out, that carries overtime when its employee's timecards are
  counted (:func:`hms_ach.workforce.overtime.overtime_by_timecard`): ``overtime.threshold_reached``
  with its overtime minutes and hours. Written again without a change of times, it emits nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from hms_ach.core.records import RecordWrite
from hms_ach.outbound.events import payload_from
from hms_ach.store import credential_alerts
from hms_ach.store import workforce_queries as wq
from hms_ach.store.changes import Change
from hms_ach.store.outbox import enqueue
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.workforce.credentials import current_expiries
from hms_ach.workforce.overtime import LOOKBACK, clock_in, contract_code, hours, overtime_by_timecard
from hms_ach.workforce.rules import SHIFT_SYSTEM, practitioner_of, without_meta
from hms_ach.workforce.settings import current

log = logging.getLogger("hms_ach.workforce.listeners")

#: How far ahead offboarding looks for shifts to release.
RELEASE_HORIZON = timedelta(days=3660)


def released_shift(shift: dict[str, Any]) -> dict[str, Any]:
    """A shift's content with its employee removed and status ``open``."""
    content = without_meta(shift)
    content.pop("practitioner", None)
    content.pop("swapRequest", None)
    content["status"] = "open"
    return content


def offboard(
    tx: Tx,
    practitioner_id: str,
    version_id: int,
    message_id: int | None,
    before: dict[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """Release the practitioner's future shifts, close its alerts (those open while it was active:
    ``before``), emit ``practitioner.offboarded``."""
    now = now or datetime.now(UTC)
    ref = f"Practitioner/{practitioner_id}"
    released = []
    repo = Repository(tx)
    for shift in wq.overlap_candidates(tx, ref, now, now + RELEASE_HORIZON):
        if practitioner_of(shift) != ref or shift.get("status") == "cancelled":
            continue
        try:
            starts = datetime.fromisoformat(str(shift["start"]))
        except (KeyError, ValueError):
            continue
        if starts <= now or not shift.get("identifier"):
            continue
        content = released_shift(shift)
        key = str(shift["identifier"][0]["value"])
        repo.upsert(
            RecordWrite("shift", "Shift", SHIFT_SYSTEM, key, content, mode="replace"), content, message_id
        )
        released.append(f"Shift/{shift['id']}")
    held = current_expiries(before)
    closed = sum(
        1 for a in credential_alerts.of_practitioner(tx, practitioner_id) if (a.credential, a.expires) in held
    )
    facts = {
        "resource": ref,
        "versionId": version_id,
        "releasedShifts": sorted(released),
        "alertsClosed": closed,
    }
    enqueue(tx, "practitioner.offboarded", payload_from("practitioner.offboarded", facts, facts))
    log.info("workforce.offboarded", extra={"released_shifts": len(released), "alerts_closed": closed})
    return facts


def _times(tc: dict[str, Any] | None) -> tuple[Any, ...]:
    tc = tc or {}
    return (tc.get("clockIn"), tc.get("clockOut"), tc.get("workedMinutes"), practitioner_of(tc))


def overtime_reached(tx: Tx, change: Change) -> None:
    """``overtime.threshold_reached`` when the changed Timecard carries overtime (see the module docstring)."""
    after = change.after or {}
    if not after.get("clockOut") or _times(after) == _times(change.before):
        return
    start, ref = clock_in(after), practitioner_of(after)
    if start is None or not ref:
        return
    context = wq.practitioner_timecards(tx, ref, [(start - LOOKBACK, start + timedelta(days=1))])
    context = [tc for tc in context if tc.get("id") != change.id] + [{**after, "id": change.id}]
    carried = contract_code(wq.StoredRoster(tx).employee(ref.partition("/")[2]))
    minutes = overtime_by_timecard(context, contracts={ref: carried}).get(change.id, 0)
    if minutes <= 0:
        return
    department = after.get("department") if isinstance(after.get("department"), str) else None
    facts = {
        "resource": change.reference,
        "practitioner": ref,
        "department": department,
        "overtimeMinutes": minutes,
        "overtimeHours": hours(minutes),
        "ruleSet": current().overtime.contract(department, carried).rule_set,
    }
    enqueue(tx, "overtime.threshold_reached", payload_from("overtime.threshold_reached", facts, facts))


def on_change(tx: Tx, change: Change) -> None:
    """Change listener: offboarding and the overtime event (see the module docstring)."""
    if change.after is None:
        return
    if change.resource_type == "Practitioner":
        if (
            change.after.get("active") is False
            and change.before is not None
            and change.before.get("active") is not False
        ):
            offboard(tx, change.id, change.version_id, change.message_id, change.before)
    elif change.resource_type == "Timecard":
        overtime_reached(tx, change)


__all__ = ["offboard", "on_change", "overtime_reached", "released_shift"]
