"""Who may do what on ``/api/v1``: the caller's roles (:mod:`hms_ach.auth.roles`) applied to records.

Each route names its action (``shifts.read``, ``swaps.decide``... :data:`hms_ach.auth.roles.ACTIONS`)
and asks :func:`access_for` for an :class:`Access`: the caller's :class:`~hms_ach.auth.roles.Grant`
for that action, with the caller's own employee resolved. The ``employee_id`` claim may hold the
Practitioner id or the employee number (the ``STAFF_SYSTEM`` identifier): both name the same person.
A claim that names no stored employee grants nothing (403 saying so).

* An action the caller's roles do not grant at all: :class:`RoleDenied` (403) before anything is read.
* A record outside the grant (another employee's shift, a shift of another department):
  :meth:`Access.require` raises :class:`RoleDenied`; inside a write job it rolls the job back.
* A list keeps the records :meth:`Access.permits` (:attr:`Access.unrestricted`: every record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hms_ach.auth.caller import Caller
from hms_ach.auth.roles import Grant
from hms_ach.workforce.rules import WorkforceError

#: The Practitioner id an ``employee_id`` claim names: the claim itself when it is a stored
#: Practitioner id, else the Practitioner with that employee number; None when there is none.
EmployeeLookup = Callable[[str], str | None]


class RoleDenied(WorkforceError):
    """The caller's roles do not allow the request (403 ``insufficient_scope``)."""

    def __init__(self, detail: str, action: str):
        super().__init__("Forbidden", detail)
        self.action = action


@dataclass(frozen=True)
class Access:
    """A caller's grant for one action, with its own Practitioner ids resolved."""

    grant: Grant
    own_ids: frozenset[str] = frozenset()

    @property
    def action(self) -> str:
        return self.grant.action

    @property
    def unrestricted(self) -> bool:
        return self.grant.unrestricted

    @property
    def own_only(self) -> bool:
        """Only the caller's own records (an employee): no department reach."""
        return not self.grant.unrestricted and not self.grant.departments

    def permits(self, employee_id: str | None, department: str | None) -> bool:
        """Whether the action is allowed on a record of ``employee_id`` (a Practitioner id) in
        ``department``; unknown values (None) are permitted only to an unrestricted grant."""
        if self.grant.unrestricted:
            return True
        if employee_id is not None and employee_id in self.own_ids:
            return True
        return department is not None and department in self.grant.departments

    def require(self, employee_id: str | None, department: str | None, what: str) -> None:
        """Raise :class:`RoleDenied` unless :meth:`permits`; ``what`` names the record (no field values)."""
        if not self.permits(employee_id, department):
            raise RoleDenied(f"your roles do not allow {self.action} on {what}", self.action)


def access_for(caller: Caller | None, action: str, lookup: EmployeeLookup) -> Access:
    """The caller's :class:`Access` for ``action``; :class:`RoleDenied` when its roles grant none.

    ``caller`` is ``request.state.caller`` (None only when no authentication ran, which grants
    nothing); ``lookup`` resolves the ``employee_id`` claim to a Practitioner id."""
    if caller is None:
        raise RoleDenied(f"no authenticated caller: {action} needs a role", action)
    grant = caller.grant(action)
    if not grant.allowed:
        roles = ", ".join(sorted(caller.roles)) or "none"
        raise RoleDenied(f"{action} is not allowed to the roles of this token ({roles})", action)
    own = {resolved for resolved in map(lookup, grant.employee_ids) if resolved is not None}
    if not own and not grant.unrestricted and not grant.departments:
        raise RoleDenied(
            "the employee_id claim of this token names no stored employee (a Practitioner id or an "
            "employee number)",
            action,
        )
    return Access(grant, frozenset(own))
