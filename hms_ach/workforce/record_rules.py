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
"""

from __future__ import annotations

from hms_ach.core.errors import ContentError
from hms_ach.core.records import MappingResult
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import WriteOutcome
from hms_ach.workforce.overtime import check_contract
from hms_ach.workforce.rules import RuleBroken
from hms_ach.workforce.shift_rules import check_shift
from hms_ach.workforce.timecard_rules import check_timecard

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


def check_csv_writes(tx: Tx, result: MappingResult, writes: list[WriteOutcome]) -> None:
    """The workforce rules over the Practitioners, Shifts and Timecards one row wrote (see the module
    docstring)."""
    for rec in result.records:
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


__all__ = ["CSV_COLUMNS", "check_csv_writes"]
