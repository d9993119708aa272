"""An in-memory :class:`hms_ach.workforce.rules.Roster` and record builders for the rules' unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hms_ach.workforce import rules
from hms_ach.workforce.settings import WorkforceSettings

MONDAY = datetime(2026, 11, 30, 7, tzinfo=UTC)  # ISO week 49 of 2026
TUESDAY = MONDAY + timedelta(days=1)
#: RN shifts need an RN licence and a BLS certificate.
RN_RULES = WorkforceSettings(role_credentials={"RN": ["RN", "BLS"], "MD": ["MD"]})


@dataclass
class MemoryRoster:
    """Employees, shifts and timecards by record id; the lookups answer a superset, as the index does."""

    employees: dict[str, dict[str, Any]] = field(default_factory=dict)
    shifts: dict[str, dict[str, Any]] = field(default_factory=dict)
    timecards: list[dict[str, Any]] = field(default_factory=list)

    def employee(self, employee_id: str) -> dict[str, Any] | None:
        return self.employees.get(employee_id)

    def shift(self, shift_record_id: str) -> dict[str, Any] | None:
        return self.shifts.get(shift_record_id)

    def shifts_around(self, practitioner: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return list(self.shifts.values())

    def timecards_between(self, practitioner: str, since: datetime, before: datetime) -> list[dict[str, Any]]:
        return [
            tc
            for tc in self.timecards
            if rules.practitioner_of(tc) == practitioner
            and since <= datetime.fromisoformat(tc["clockIn"]) < before
        ]


def qualification(kind: str, end: str | None = "2030-12-31", status: str = "verified") -> dict[str, Any]:
    q: dict[str, Any] = {
        "identifier": [{"value": f"{kind}-1"}],
        "code": {"coding": [{"system": rules.CREDENTIAL_SYSTEM, "code": kind}], "text": kind},
        "extension": [
            {"url": "urn:hms-ach:fhir:StructureDefinition/verification-status", "valueCode": status}
        ],
        "period": {"start": "2020-01-01", **({"end": end} if end else {})},
    }
    return q


def nurse(
    rid: str, *quals: dict[str, Any], active: bool = True, department: str = "4 West"
) -> dict[str, Any]:
    return {
        "id": rid,
        "resourceType": "Practitioner",
        "active": active,
        "extension": [{"url": rules.DEPARTMENT_EXT, "valueString": department}],
        "qualification": list(quals) or [qualification("RN"), qualification("BLS")],
    }


def stored_shift(
    rid: str, who: str | None, start: datetime, hours: float = 12, **extra: Any
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "id": rid,
        "meta": {"versionId": "1"},
        "resourceType": "Shift",
        "identifier": [{"system": rules.SHIFT_SYSTEM, "value": f"S-{rid}"}],
        "start": rules.iso(start),
        "end": rules.iso(start + timedelta(hours=hours)),
        "status": "planned",
        "role": {"text": "RN"},
        "department": {"display": "4 West"},
        **extra,
    }
    if who:
        res["practitioner"] = {"reference": f"Practitioner/{who}"}
    return res


def card(
    rid: str, who: str, clock_in: datetime, minutes: int, department: str | None = None, **extra: Any
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "id": rid,
        "identifier": [{"system": rules.TIMECARD_SYSTEM, "value": f"T-{rid}"}],
        "practitioner": {"reference": f"Practitioner/{who}"},
        "clockIn": rules.iso(clock_in),
        "clockOut": rules.iso(clock_in + timedelta(minutes=minutes)),
        "workedMinutes": minutes,
        **extra,
    }
    if department:
        res["department"] = department
    return res
