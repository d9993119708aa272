"""Who a notification goes to, read from the stored records (the ``notify`` sink,
:mod:`hms_ach.outbound.notify`).

* the employee: the Practitioner the event names, reached through its ``telecom``;
* the managers of the employee's department: the practitioners of the active PractitionerRoles, in
  an Organization where the employee has a PractitionerRole, whose ``code`` holds one of the manager
  role codes (``manager`` by default; configurable per sink);
* qualified peers (for a swap): the practitioners with an active PractitionerRole of the same role
  code in the same Organization as one of the employee's, the employee excepted;
* the holders of a role (``role:<code>``, ``notify_role``): the practitioners of the active
  PractitionerRoles whose ``code`` holds it (the ``role`` token index), e.g. the supervisors told
  of a late review case.

"Active" means ``active`` is not false and the role's ``period``, when it has one, covers the
moment of the lookup: a manager whose role ended yesterday, or a supervisor who starts next week,
is not told.

Lookups go through the reference and token indexes, so none of them scans every record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, select

from hms_ach.core import periods
from hms_ach.store.models import SearchToken
from hms_ach.store.port import Tx
from hms_ach.store.record_reads import current, referring, stored
from hms_ach.store.search_params import clip


@dataclass(frozen=True)
class Person:
    """A Practitioner who may receive a message: its reference, display name and contact points."""

    reference: str
    name: str
    given: str
    family: str
    telecom: tuple[tuple[str, str], ...]  # (system, value), in the record's order
    active: bool

    def contact(self, system: str) -> str | None:
        """The first contact point of ``system`` (email, sms, phone...), or None."""
        return next((value for sys, value in self.telecom if sys == system and value), None)

    def facts(self) -> dict[str, Any]:
        """What a template sees of this person: names only, never contact points."""
        return {"reference": self.reference, "name": self.name, "given": self.given, "family": self.family}


def _person(reference: str, res: dict[str, Any]) -> Person:
    names = res.get("name") or [{}]
    first = next((n for n in names if n.get("use") == "official"), names[0])
    given = " ".join(str(g) for g in first.get("given") or [])
    family = str(first.get("family") or "")
    text = str(first.get("text") or " ".join(p for p in (given, family) if p))
    telecom = tuple(
        (str(t.get("system") or ""), str(t.get("value") or ""))
        for t in res.get("telecom") or []
        if isinstance(t, dict) and (t.get("period") or {}).get("end") is None
    )
    return Person(reference, text, given, family, telecom, res.get("active") is not False)


def practitioner(tx: Tx, reference: str | None) -> Person | None:
    """The Practitioner ``Practitioner/<id>`` if it is stored and not deleted."""
    if not reference or not reference.startswith("Practitioner/"):
        return None
    row = stored(tx, reference)
    if row is None or row.deleted or row.version_id == 0:
        return None
    return _person(reference, row.content)


def _holds(role: dict[str, Any]) -> bool:
    """Whether a PractitionerRole holds now: not ``active: false``, and its ``period`` (when it has
    one) covers this instant, so a role that ended or has not begun notifies nobody."""
    return role.get("active") is not False and periods.covers(role.get("period"), datetime.now(UTC))


def _roles_of(tx: Tx, practitioner_id: str) -> list[dict[str, Any]]:
    ids = referring(tx, "PractitionerRole", "practitioner", "Practitioner", practitioner_id)
    return [r for r in current(tx, "PractitionerRole", ids) if _holds(r)]


def _codes(role: dict[str, Any]) -> set[str]:
    return {
        str(c.get("code")) for cc in role.get("code") or [] for c in (cc.get("coding") or []) if c.get("code")
    }


def _ref_id(value: Any, rtype: str) -> str | None:
    ref = str((value or {}).get("reference") or "")
    prefix = rtype + "/"
    return ref[len(prefix) :] if ref.startswith(prefix) and len(ref) > len(prefix) else None


def _colleagues(tx: Tx, practitioner_id: str, wanted: Iterable[str] | None) -> list[str]:
    """Practitioner references with an active role in the employee's Organizations; with ``wanted``,
    only those whose role code is one of them (else those sharing one of the employee's role codes)."""
    own = _roles_of(tx, practitioner_id)
    own_codes = set().union(*(_codes(r) for r in own)) if own else set()
    codes = set(wanted) if wanted is not None else own_codes
    found: list[str] = []
    for org_id in dict.fromkeys(
        o for o in (_ref_id(r.get("organization"), "Organization") for r in own) if o
    ):
        role_ids = referring(tx, "PractitionerRole", "organization", "Organization", org_id)
        for role in current(tx, "PractitionerRole", role_ids):
            who = _ref_id(role.get("practitioner"), "Practitioner")
            if not _holds(role) or who is None or who == practitioner_id:
                continue
            if _codes(role) & codes:
                ref = f"Practitioner/{who}"
                if ref not in found:
                    found.append(ref)
    return found


def managers(tx: Tx, employee: str, role_codes: Iterable[str]) -> list[Person]:
    """The active managers of ``employee``'s departments (see the module docstring)."""
    pid = employee.removeprefix("Practitioner/")
    people = (practitioner(tx, ref) for ref in _colleagues(tx, pid, list(role_codes)))
    return [p for p in people if p is not None and p.active]


def peers(tx: Tx, employee: str) -> list[Person]:
    """The active practitioners holding one of ``employee``'s role codes in one of its Organizations."""
    pid = employee.removeprefix("Practitioner/")
    people = (practitioner(tx, ref) for ref in _colleagues(tx, pid, None))
    return [p for p in people if p is not None and p.active]


#: The record types a case's requester (a complainant) may be stored as.
REQUESTER_TYPES = ("RelatedPerson", "Patient")


def requester(tx: Tx, reference: str | None) -> Person | None:
    """The requester of a case (a complainant): the RelatedPerson or Patient ``reference`` if it is
    stored and not deleted. Its contact points come preferred first (``rank`` 1 before the others)."""
    if not reference or reference.split("/", 1)[0] not in REQUESTER_TYPES:
        return None
    row = stored(tx, reference)
    if row is None or row.deleted or row.version_id == 0:
        return None
    points = [t for t in row.content.get("telecom") or [] if isinstance(t, dict)]
    ranked = sorted(points, key=_rank)
    return _person(reference, {**row.content, "telecom": ranked})


def _rank(point: dict[str, Any]) -> int:
    rank = point.get("rank")
    return rank if isinstance(rank, int) else 1 << 30


def preferred_system(person: Person) -> str | None:
    """The contact system a requester prefers (their first contact point, :func:`requester`)."""
    return next((sys for sys, value in person.telecom if value), None)


_TOKENS: Table = SearchToken.__table__  # type: ignore[attr-defined]


def role_holders(tx: Tx, code: str) -> list[Person]:
    """The active practitioners with a PractitionerRole that holds now (:func:`_holds`) whose
    ``code`` holds ``code`` (any code system), in id order of their roles."""
    t = _TOKENS
    holding = (t.c.resource_type == "PractitionerRole", t.c.param == "role", t.c.value == clip(code))
    role_ids = sorted(set(tx.execute(select(t.c.resource_id).where(*holding)).scalars()))
    found: list[str] = []
    for role in current(tx, "PractitionerRole", role_ids):
        who = _ref_id(role.get("practitioner"), "Practitioner")
        if _holds(role) and who is not None and code in _codes(role):
            ref = f"Practitioner/{who}"
            if ref not in found:
                found.append(ref)
    people = (practitioner(tx, ref) for ref in found)
    return [p for p in people if p is not None and p.active]
