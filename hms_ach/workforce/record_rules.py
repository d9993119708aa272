"""The workforce rules as a check of written records: what a CSV row (or any mapped message) wrote.

:func:`check_csv_writes` is the CSV row check (:func:`hms_ach.ingest.csv_rows.use_row_check`,
subscribed by :func:`hms_ach.app.wiring.wire_listeners`): each Shift and Timecard the row wrote is
read back (references resolved) and passes :func:`hms_ach.workforce.shift_rules.check_shift` or
:func:`hms_ach.workforce.timecard_rules.check_timecard`. A broken rule refuses the row: a
:class:`~hms_ach.core.errors.ContentError` whose message starts with the rule's code
(``[timecard.unknown_employee] ...``) and whose location names the CSV column, which the row's
``.err.csv`` report shows. A Practitioner the row wrote (the staff roster) must carry a configured
overtime contract, if any (``employee.unknown_contract`` at column ``overtime_contract``). A row naming a staff member who is not stored (the mapping drops such a
reference) is refused as ``shift.unknown_employee`` / ``timecard.unknown_employee``, never stored
as an unfilled shift or an orphan timecard.

Kiosk clock events (dataset ``clock_events``, mappings/resources/clock_event_csv.yaml) are applied
here: the mapping yields the event as an update-only Timecard under :data:`CLOCK_EVENT_SYSTEM`
(never written itself), and :func:`apply_clock_event` runs it through the same kiosk rules as
/api/v1: an ``in`` opens a Timecard (``timecard.already_clocked_in`` while one is open), an ``out``
closes the open one (``timecard.not_clocked_in`` when there is none). A row read again (a file
re-read after a crash) finds its event applied already and changes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from hms_ach.core.errors import ContentError
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository, WriteOutcome
from hms_ach.workforce.overtime import check_contract
from hms_ach.workforce.rules import STAFF_SYSTEM, RuleBroken, WorkforceError, iso
from hms_ach.workforce.settings import current
from hms_ach.workforce.shift_rules import check_shift
from hms_ach.workforce.timecard_rules import check_timecard, clock_in_record, clock_out_record

#: The key system of a mapped kiosk clock event (a lookup that names no stored record).
CLOCK_EVENT_SYSTEM = "urn:hms-ach:id:clock-event"
#: The CSV column of each element a clock-event rule may name (dataset clock_events).
CLOCK_EVENT_COLUMNS = {"practitioner": "employee_id", "clockIn": "time", "clockOut": "time", "at": "time"}

#: The CSV column of each record element a rule may name (mappings/resources/*_csv.yaml).
CSV_COLUMNS = {
    "practitioner": "employee_id",
    "start": "start",
    "end": "end",
    "status": "status",
    "role": "role",
    "clockIn": "clock_in",
    "clockOut": "clock_out",
    "shift": "shift_id",
}


def names_an_employee(result: MappingResult) -> bool:
    """Whether the row names a staff member (a Practitioner it only refers to, by a key): when the
    written Shift or Timecard then has no practitioner, that one is not stored (the mapping dropped
    the reference) and the record would be an unfilled shift or an orphan."""
    return any(
        rec.resource_type == "Practitioner" and not rec.create and bool(rec.key_value)
        for rec in result.records
    )


def _refuse(code: str | None, detail: str, element: str | None) -> ContentError:
    column = CLOCK_EVENT_COLUMNS.get(element or "at", "time")
    return ContentError(f"[{code}] {detail}", f"column '{column}'")


def _applied(tx: Tx, ref: str, event: str, at: datetime, tc_id: str) -> bool:
    """Whether this clock event is in the store already (its row read a second time)."""
    stamp = iso(at)
    window = timedelta(hours=current().max_timecard_hours)
    for tc in wq.StoredRoster(tx).timecards_between(ref, at - window, at + timedelta(seconds=1)):
        if event == "in" and (tc.get("identifier") or [{}])[0].get("value") == tc_id:
            return True
        if event == "out" and tc.get("clockOut") == stamp:
            return True
    return False


def apply_clock_event(tx: Tx, event: RecordWrite, writes: list[WriteOutcome]) -> None:
    """Apply one mapped clock event (see the module docstring), or refuse it with its rule's code."""
    content: dict[str, Any] = event.content
    employee = next((w.id for w in writes if w.resource_type == "Practitioner"), None)
    if employee is None and content.get("employeeNumber"):  # a staff number, not the roster's key
        number = {"identifier": [{"system": STAFF_SYSTEM, "value": str(content["employeeNumber"])}]}
        employee = Repository(tx).matched_id("Practitioner", number)
    if employee is None:
        raise _refuse("timecard.unknown_employee", "the row names no stored employee", "practitioner")
    try:
        at = datetime.fromisoformat(str(content.get("at")))
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise _refuse("timecard.invalid_time", "time is not a dateTime with a UTC offset", "at")
    kind = str(content.get("clockEvent"))
    ref = f"Practitioner/{employee}"
    tc_id = f"kiosk:{employee}:{iso(at)}"
    if _applied(tx, ref, kind, at, tc_id):
        return
    roster = wq.StoredRoster(tx)
    department = content.get("department")
    try:
        if kind == "in":
            write = clock_in_record(roster, employee, at, tc_id, department=department)
            device = {"clockInDevice": content["device"]} if content.get("device") else {}
        else:
            write = clock_out_record(roster, employee, at)
            device = {"clockOutDevice": content["device"]} if content.get("device") else {}
    except RuleBroken as exc:
        raise _refuse(exc.code, exc.detail, exc.element) from None
    except WorkforceError as exc:  # timecard.not_clocked_in
        raise _refuse(exc.code, exc.detail, "at") from None
    body = {**write.content, **device}
    Repository(tx).upsert(replace(write, content=body), body, None)


def check_csv_writes(tx: Tx, result: MappingResult, writes: list[WriteOutcome]) -> None:
    """The workforce rules over the Practitioners, Shifts and Timecards one row wrote (see the module
    docstring)."""
    for rec in result.records:
        if rec.resource_type == "Timecard" and rec.key_system == CLOCK_EVENT_SYSTEM:
            apply_clock_event(tx, rec, writes)
        if rec.resource_type == "Practitioner" and rec.create:
            try:
                check_contract(rec.content, "employee.unknown_contract")
            except RuleBroken as exc:
                raise ContentError(f"[{exc.code}] {exc.detail}", "column 'overtime_contract'") from None
    roster = wq.StoredRoster(tx)
    for write in writes:
        if write.resource_type not in ("Shift", "Timecard") or not write.changed:
            continue
        record = wq.get_record(tx, write.resource_type, write.id)
        if record is None:
            continue
        if not record.get("practitioner") and names_an_employee(result):
            code = "shift.unknown_employee" if write.resource_type == "Shift" else "timecard.unknown_employee"
            raise ContentError(f"[{code}] the row names no stored employee", "column 'employee_id'")
        try:
            if write.resource_type == "Shift":
                check_shift(roster, record, write.id)
            else:
                check_timecard(roster, record, write.id)
        except RuleBroken as exc:
            column = CSV_COLUMNS.get(exc.element, exc.element)
            raise ContentError(f"[{exc.code}] {exc.detail}", f"column '{column}'") from None


__all__ = ["CLOCK_EVENT_SYSTEM", "CSV_COLUMNS", "apply_clock_event", "check_csv_writes"]
