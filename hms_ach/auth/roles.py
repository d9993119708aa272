"""The ``/api/v1`` roles, as data, and the one function that applies them.

Roles come from the claim ``auth.roles_claim`` names (``roles``, or ``realm_access.roles``...). Each
role grants actions (:data:`ACTIONS`), each limited to a reach:

* ``any``: every record;
* ``department``: records of the caller's ``department`` claim (one value or a list);
* ``own``: records of the caller's own ``employee_id`` claim.

:data:`ROLE_RULES` is the table; :func:`grant` folds a caller's roles into one :class:`Grant` for an
action, which a route asks about a target record (:meth:`Grant.permits`) or turns into a filter for a
list (:attr:`Grant.unrestricted`, :attr:`Grant.employee_ids`, :attr:`Grant.departments`).
An unknown role grants nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Reach = Literal["any", "department", "own"]

#: The /api/v1 actions, and the routes each stands for.
ACTIONS: dict[str, str] = {
    "employees.read": "GET /api/v1/employees, GET /api/v1/employees/{id}",
    "employees.write": "POST /api/v1/employees, PUT /api/v1/employees/{id}",
    "credentials.read": "GET /api/v1/credentials",
    "shifts.read": "GET /api/v1/shifts",
    "shifts.write": "POST /api/v1/shifts, PUT /api/v1/shifts/{id}",
    "swaps.request": "POST /api/v1/shifts/{id}/swap",
    "swaps.decide": "POST /api/v1/shifts/{id}/swap/decision",
    "timecards.read": "GET /api/v1/timecards",
    "timecards.write": "POST /api/v1/timecards",
    "compliance.read": "GET /api/v1/compliance/status",
    "audit.read": "GET /api/v1/audit",
    "metrics.read": "GET /metrics",
    "cases.create": "POST /api/v1/review/cases",
    "cases.read": "GET /api/v1/review/cases",
    "cases.audit": "GET /api/v1/review/{caseId}/audit-log",
    "analytics.review": "GET /api/v1/analytics/review",
    "complaints.create": "POST /api/v1/complaints",
    "complaints.read": "GET /api/v1/complaints, GET /api/v1/complaints/{id}",
    "complaints.resolve": "POST /api/v1/complaints/{id}/resolve",
    "cases.findings": "POST /api/v1/review/{caseId}/findings",
    "cases.sign": "POST /api/v1/review/{caseId}/sign",
    "cases.queue": "GET /api/v1/review/queue",
    "cases.assign": "POST /api/v1/review/{caseId}/assign",
    "cases.move": "POST /api/v1/review/{caseId}/transitions",
    "cases.comment": "POST /api/v1/review/{caseId}/comments",
}

#: The action prefixes that are not workforce data (hr_admin and integration get every other action).
_NOT_WORKFORCE = ("audit.", "metrics.", "cases.", "analytics.", "complaints.")
_WORKFORCE = tuple(a for a in ACTIONS if not a.startswith(_NOT_WORKFORCE))

#: role -> action -> reach. hr_admin: every workforce read and write; scheduler: shifts and swap
#: decisions in their departments; employee: their own record, shifts and timecards, and swap requests
#: of their own shifts; auditor: the audit trail and the compliance report, read-only; integration:
#: system use (feeds and exports), every workforce read and write, and the metrics; operator: the
#: engine's metrics (GET /metrics), no patient or staff data. integration and auditor also reach the
#: review cases (cases.*), reviewer and supervisor only them.
ROLE_RULES: dict[str, dict[str, Reach]] = {
    "hr_admin": {action: "any" for action in _WORKFORCE},
    "scheduler": {
        "employees.read": "department",
        "credentials.read": "department",
        "shifts.read": "department",
        "shifts.write": "department",
        "swaps.decide": "department",
        "timecards.read": "department",
    },
    "employee": {
        "employees.read": "own",
        "credentials.read": "own",
        "shifts.read": "own",
        "swaps.request": "own",
        "timecards.read": "own",
        "timecards.write": "own",
    },
    "auditor": {
        "audit.read": "any",
        "compliance.read": "any",
        "cases.read": "any",
        "cases.audit": "any",  # a case's audit log (docs/review-cases.md)
        "analytics.review": "any",
    },
    # integration (a triage engine, a patient portal, a call-centre system) opens and reads cases, and
    # logs complaints and reads them back.
    "integration": {
        action: "any"
        for action in (
            *_WORKFORCE,
            "metrics.read",
            "cases.create",
            "cases.read",
            "complaints.create",
            "complaints.read",
            "cases.move",
            "cases.comment",
        )
    },
    "operator": {"metrics.read": "any"},
    # Review cases (docs/review-cases.md): a reviewer sees the cases assigned to them; a supervisor
    # opens cases, sees every case (the escalation queue) and assigns them.
    "reviewer": {"cases.read": "own", "cases.audit": "own", "cases.move": "own", "cases.comment": "own"},
    "supervisor": {
        "cases.create": "any",
        "cases.read": "any",
        "cases.move": "any",
        "cases.comment": "any",
        "cases.assign": "any",
        "cases.audit": "any",
        "analytics.review": "any",
        "complaints.create": "any",
        "complaints.read": "any",
        "complaints.resolve": "any",
    },
    # Complaints (docs/review-cases.md, Complaints): an officer logs complaints taken by phone or at
    # the desk, and reads and resolves those of their department (the department claim).
    "complaints-officer": {
        "complaints.create": "any",
        "complaints.read": "department",
        "complaints.resolve": "department",
    },
}

# Findings and signatures (docs/review-cases.md): a reviewer submits and signs the findings of the
# cases assigned to them, a supervisor those of any case; the escalation queue is the supervisor's,
# and an auditor may read it.
ROLE_RULES["reviewer"].update({"cases.findings": "own", "cases.sign": "own"})
ROLE_RULES["supervisor"].update({"cases.findings": "any", "cases.sign": "any", "cases.queue": "any"})
ROLE_RULES["auditor"].update({"cases.queue": "any"})

#: Every role :data:`ROLE_RULES` knows.
ROLES = tuple(ROLE_RULES)


@dataclass(frozen=True)
class Grant:
    """What a caller's roles allow for one action: everything (``unrestricted``), or records of
    ``employee_ids`` (own) or ``departments``; nothing when all three are empty."""

    action: str
    unrestricted: bool = False
    employee_ids: frozenset[str] = frozenset()
    departments: frozenset[str] = frozenset()

    @property
    def allowed(self) -> bool:
        """Whether the action is allowed on at least some records."""
        return self.unrestricted or bool(self.employee_ids) or bool(self.departments)

    def permits(self, employee_id: str | None = None, department: str | None = None) -> bool:
        """Whether the action is allowed on a record of ``employee_id`` in ``department`` (either may
        be unknown: None, which only an unrestricted grant permits)."""
        if self.unrestricted:
            return True
        if employee_id is not None and employee_id in self.employee_ids:
            return True
        return department is not None and department in self.departments


def grant(
    roles: Iterable[str],
    action: str,
    employee_id: str | None = None,
    departments: Iterable[str] = (),
) -> Grant:
    """Fold ``roles`` into the grant for ``action``. ``employee_id`` and ``departments`` are the
    caller's claims; an ``own`` reach without an employee_id claim (or a ``department`` reach without
    a department) grants nothing. Raises KeyError for an action not in :data:`ACTIONS`."""
    if action not in ACTIONS:
        raise KeyError(f"unknown /api/v1 action {action!r}; one of {', '.join(ACTIONS)}")
    unrestricted = False
    own: set[str] = set()
    depts: set[str] = set()
    for role in roles:
        reach = ROLE_RULES.get(role, {}).get(action)
        if reach == "any":
            unrestricted = True
        elif reach == "own" and employee_id:
            own.add(employee_id)
        elif reach == "department":
            depts.update(d for d in departments if d)
    return Grant(action, unrestricted, frozenset(own), frozenset(depts))
