"""The next available reviewer for a new case, chosen from the workforce store, and why.

A reviewer qualifies for a case when they are

* active (``Practitioner.active`` not false);
* holding the workflow's role: an active PractitionerRole of theirs whose ``code`` has it;
* holding every credential the workflow requires (``Practitioner.qualification`` codes), valid
  today: the day is inside its period and its verification is not ``failed`` or ``expired``;
* on shift now, or starting within the workflow's ``shift_window_minutes``: a Shift of theirs that
  is not cancelled;
* in the case's department, when the case names one (the Practitioner's department extension).

Of those, the one with the fewest open cases is chosen; a tie goes to the one whose last
assignment is oldest (never assigned counts as oldest), then to the lowest id, so the choice is
the same on every run. :func:`choose` decides from plain facts (:class:`Candidate`), so it is
tested without a store; :func:`candidates` reads those facts inside the writer's transaction.
:class:`Choice` says who was considered and why each was passed over: the case's audit entry
carries it (in ``Task.note``), and it names Practitioner ids and credential codes only, no patient
data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from hms_ach.core import periods
from hms_ach.mapping.spec import WorkflowAssignment
from hms_ach.store import record_reads
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.workforce.rules import CREDENTIAL_SYSTEM, department_of, ext

#: Task.extension: when the case was last given to its owner (a dateTime).
ASSIGNED_AT_EXT = "urn:hms-ach:fhir:StructureDefinition/case-assigned-at"
#: Task.status values of a closed case: not counted among a reviewer's open cases.
CLOSED_STATUSES = frozenset({"completed", "cancelled", "failed", "rejected", "entered-in-error"})
#: Verification states that make a credential invalid whatever its period says.
INVALID_VERIFICATION = frozenset({"failed", "expired"})
#: How far back a shift that is still running may have started (the longest shift looked for).
LONGEST_SHIFT = timedelta(hours=24)
_VERIFICATION_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-status"


@dataclass(frozen=True)
class Credential:
    """One qualification of a reviewer: its code, period (days, either end open) and verification."""

    code: str
    start: date | None = None
    end: date | None = None
    verification: str | None = None

    def problem(self, today: date) -> str | None:
        """Why the credential is not valid on ``today``; None when it is."""
        if self.verification in INVALID_VERIFICATION:
            return f"credential {self.code} verification is {self.verification}"
        if self.end is not None and self.end < today:
            return f"credential {self.code} expired on {self.end.isoformat()}"
        if self.start is not None and self.start > today:
            return f"credential {self.code} is valid only from {self.start.isoformat()}"
        return None


@dataclass(frozen=True)
class Candidate:
    """What the choice knows about one holder of the workflow's role."""

    practitioner_id: str
    active: bool = True
    department: str | None = None
    credentials: tuple[Credential, ...] = ()
    shifts: tuple[tuple[datetime, datetime], ...] = ()
    """Their shifts that are not cancelled, around now: (start, end), aware datetimes."""
    open_cases: int = 0
    last_assigned: datetime | None = None


@dataclass(frozen=True)
class Considered:
    """One candidate as judged: the reasons they were passed over (empty: they qualified)."""

    practitioner_id: str
    reasons: tuple[str, ...]
    open_cases: int
    last_assigned: datetime | None

    @property
    def qualified(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "practitioner": f"Practitioner/{self.practitioner_id}",
            "qualified": self.qualified,
            "reasons": list(self.reasons),
            "open_cases": self.open_cases,
            "last_assigned": self.last_assigned.isoformat() if self.last_assigned else None,
        }


@dataclass(frozen=True)
class Choice:
    """The reviewer chosen (None: nobody qualified, the case is queued) and everyone considered."""

    chosen: str | None
    considered: tuple[Considered, ...]

    def explanation(self) -> str:
        """One paragraph for the case's audit entry: who was considered and why this one."""
        qualified = [c for c in self.considered if c.qualified]
        passed = [c for c in self.considered if not c.qualified]
        if self.chosen is None:
            head = f"queued: none of the {len(self.considered)} holder(s) of the role qualified."
        else:
            pick = next(c for c in qualified if c.practitioner_id == self.chosen)
            others = len(qualified) - 1
            why = (
                "the only qualified reviewer"
                if not others
                else f"fewest open cases ({pick.open_cases}), then longest since last assignment, of "
                f"{len(qualified)} qualified"
            )
            head = (
                f"assigned to Practitioner/{self.chosen}: {why}; {len(self.considered)} holder(s) of the "
                "role considered."
            )
        tail = "".join(
            f" Passed over Practitioner/{c.practitioner_id}: {'; '.join(c.reasons)}." for c in passed
        )
        return head + tail


def judge(
    candidate: Candidate, rule: WorkflowAssignment, department: str | None, now: datetime
) -> Considered:
    """Why ``candidate`` does not qualify for a case under ``rule`` at ``now`` (no reasons: they do)."""
    reasons: list[str] = []
    if not candidate.active:
        reasons.append("not active")
    today = now.date()
    held = {c.code: c for c in candidate.credentials}
    for code in rule.credentials:
        credential = held.get(code)
        if credential is None:
            reasons.append(f"no credential {code}")
            continue
        problem = credential.problem(today)
        if problem is not None:
            reasons.append(problem)
    window = timedelta(minutes=rule.shift_window_minutes)
    if not any(start - window <= now < end for start, end in candidate.shifts):
        reasons.append(
            "not on shift now"
            if not rule.shift_window_minutes
            else f"not on shift now or within {rule.shift_window_minutes} minutes"
        )
    if department is not None and candidate.department != department:
        reasons.append(f"not in department {department}")
    return Considered(
        candidate.practitioner_id, tuple(reasons), candidate.open_cases, candidate.last_assigned
    )


def choose(
    candidates: Iterable[Candidate], rule: WorkflowAssignment, department: str | None, now: datetime
) -> Choice:
    """The next available reviewer among ``candidates`` (see the module's docstring)."""
    considered = tuple(
        judge(c, rule, department, now) for c in sorted(candidates, key=lambda c: c.practitioner_id)
    )
    qualified = [c for c in considered if c.qualified]
    if not qualified:
        return Choice(None, considered)
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    best = min(qualified, key=lambda c: (c.open_cases, c.last_assigned or oldest, c.practitioner_id))
    return Choice(best.practitioner_id, considered)


# ---------------------------------------------------------------------------- facts from the store
def candidates(tx: Tx, rule: WorkflowAssignment, now: datetime) -> list[Candidate]:
    """The holders of ``rule.role`` with the facts :func:`choose` needs, read on ``tx``.

    Phase 1 reads every PractitionerRole to find the role's holders (a staff-sized table); the
    shifts, credentials and open cases are read per holder through the search index."""
    ids = sorted(_role_holders(tx, rule.role, now))
    out: list[Candidate] = []
    for pid in ids:
        practitioner = wq.get_record(tx, "Practitioner", pid)
        if practitioner is None:
            continue
        open_cases, last = _caseload(tx, pid)
        out.append(
            Candidate(
                practitioner_id=pid,
                active=practitioner.get("active") is not False,
                department=department_of(practitioner),
                credentials=tuple(_credentials(practitioner)),
                shifts=tuple(_shifts(tx, pid, rule, now)),
                open_cases=open_cases,
                last_assigned=last,
            )
        )
    return out


def _role_holders(tx: Tx, role: str, now: datetime) -> set[str]:
    holders: set[str] = set()
    for _rid, pr in record_reads.every_current(tx, "PractitionerRole"):
        if pr.get("active") is False or not periods.covers(pr.get("period"), now):
            continue
        codes = {
            coding.get("code")
            for concept in pr.get("code") or []
            for coding in (concept.get("coding") or [])
            if isinstance(coding, dict)
        }
        ref = str((pr.get("practitioner") or {}).get("reference") or "")
        if role in codes and ref.startswith("Practitioner/"):
            holders.add(ref.split("/", 1)[1])
    return holders


def _day(text: Any) -> date | None:
    if not isinstance(text, str) or len(text) < 10:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def _credentials(practitioner: dict[str, Any]) -> list[Credential]:
    out = []
    for q in practitioner.get("qualification") or []:
        period = q.get("period") or {}
        verification = ext(q, _VERIFICATION_EXT)
        for coding in (q.get("code") or {}).get("coding") or []:
            if coding.get("code") and coding.get("system") in (CREDENTIAL_SYSTEM, None):
                out.append(
                    Credential(
                        str(coding["code"]), _day(period.get("start")), _day(period.get("end")), verification
                    )
                )
    return out


def _shifts(tx: Tx, pid: str, rule: WorkflowAssignment, now: datetime) -> list[tuple[datetime, datetime]]:
    window = timedelta(minutes=rule.shift_window_minutes)
    out = []
    for shift in wq.scan_shifts(
        tx, employee_id=pid, start_from=now - LONGEST_SHIFT, start_before=now + window + timedelta(seconds=1)
    ):
        if shift.get("status") == "cancelled":
            continue
        if (shift.get("practitioner") or {}).get("reference") != f"Practitioner/{pid}":
            continue
        start, end = periods.instant(shift.get("start")), periods.instant(shift.get("end"))
        if start is not None and end is not None:
            out.append((start, end))
    return out


def _caseload(tx: Tx, pid: str) -> tuple[int, datetime | None]:
    """(open cases owned, when the last case was given to them)."""
    ids = record_reads.referring(tx, "Task", "owner", "Practitioner", pid)
    open_cases, last = 0, None
    for task in record_reads.current(tx, "Task", ids):
        if task.get("status") not in CLOSED_STATUSES:
            open_cases += 1
        given = periods.instant(_ext_datetime(task, ASSIGNED_AT_EXT))
        if given is not None and (last is None or given > last):
            last = given
    return open_cases, last


def _ext_datetime(obj: dict[str, Any], url: str) -> str | None:
    for e in obj.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == url:
            value = e.get("valueDateTime")
            return str(value) if value else None
    return None
