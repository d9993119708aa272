"""SMART App Launch scopes (v1 and v2) and the policy they grant on ``/fhir``.

Grammar (SMART App Launch 1.0 and 2.x, "scopes and launch context")::

    scope    = context "/" type "." access
    context  = "patient" | "user" | "system"
    type     = a FHIR resource type | "*"
    access   = "read" | "write" | "*"                      (v1)
             | a non-empty, in-order subset of "cruds"     (v2: c create, r read, u update, d delete, s search)

v1 access is translated to v2 letters: ``read`` = ``rs``, ``write`` = ``cud``, ``*`` = ``cruds``.

Scopes that are not resource scopes (``openid``, ``fhirUser``, ``profile``, ``launch``,
``launch/patient``, ``offline_access``, ``online_access``, or an issuer's own scopes) grant nothing
on ``/fhir`` and are kept in :attr:`ParsedScopes.other`. A resource scope with a v2 query
(``patient/Observation.rs?category=laboratory``) is a granular scope this engine cannot yet enforce:
it grants nothing and is kept in :attr:`ParsedScopes.unsupported`, like any malformed resource scope,
so that a narrower grant is never read as a wider one.

Interactions (:data:`INTERACTIONS`) and the letter each needs: ``read``, ``vread`` and ``history``
(of one resource) need ``r``; ``search`` and ``history-type`` need ``s``; ``create`` ``c``;
``update`` ``u``; ``delete`` ``d``. A transaction or batch is decided entry by entry.

A ``patient/`` scope grants access only inside the compartment of the token's ``patient`` claim
(:meth:`ScopePolicy.patient_compartment`); without that claim it grants nothing. A ``user/`` or
``system/`` scope covering the same type and interaction is wider and wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Context = Literal["patient", "user", "system"]
Interaction = Literal["read", "vread", "history", "history-type", "search", "create", "update", "delete"]

#: Every interaction a policy answers for, with the SMART v2 letter it needs.
INTERACTIONS: dict[str, str] = {
    "read": "r",
    "vread": "r",
    "history": "r",
    "history-type": "s",
    "search": "s",
    "create": "c",
    "update": "u",
    "delete": "d",
}

_V1_ACCESS = {"read": "rs", "write": "cud", "*": "cruds"}
_V2_ACCESS = re.compile(r"^c?r?u?d?s?$")
_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([A-Za-z*]+)(\?.*)?$")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")


@dataclass(frozen=True)
class SmartScope:
    """One resource scope: ``context/resource_type.letters`` with v1 access already translated."""

    text: str
    context: Context
    resource_type: str  # a resource type, or "*"
    letters: frozenset[str]
    version: Literal[1, 2]

    def covers(self, resource_type: str, interaction: str) -> bool:
        letter = INTERACTIONS.get(interaction)
        return (
            letter is not None
            and letter in self.letters
            and (self.resource_type == "*" or self.resource_type == resource_type)
        )


@dataclass(frozen=True)
class ParsedScopes:
    """The scopes of a token, sorted out: ``resource`` grant access; ``other`` are scopes that are not
    about FHIR resources (openid, launch/patient ...); ``unsupported`` are resource scopes this engine
    does not grant anything for (malformed, or a v2 granular scope with a query)."""

    resource: tuple[SmartScope, ...] = ()
    other: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(s.text for s in self.resource) + self.other + self.unsupported


def parse_scope(text: str) -> SmartScope | None:
    """One resource scope, or None when ``text`` is not a resource scope this engine grants anything for."""
    match = _RESOURCE_SCOPE.match(text)
    if match is None or match.group(4) is not None:
        return None
    context, resource_type, access = match.group(1), match.group(2), match.group(3)
    if resource_type != "*" and not _RESOURCE_TYPE.match(resource_type):
        return None
    version: Literal[1, 2]
    if access in _V1_ACCESS:
        letters, version = _V1_ACCESS[access], 1
    elif access and _V2_ACCESS.match(access):
        letters, version = access, 2
    else:
        return None
    ctx: Context = "patient" if context == "patient" else "user" if context == "user" else "system"
    return SmartScope(text, ctx, resource_type, frozenset(letters), version)


def _looks_like_resource_scope(text: str) -> bool:
    head, _, _ = text.partition("/")
    return head in ("patient", "user", "system") and "/" in text


def parse_scopes(scopes: str | Iterable[str]) -> ParsedScopes:
    """Parse a space-separated ``scope`` claim (or an ``scp`` list); duplicates are kept once."""
    items = scopes.split() if isinstance(scopes, str) else [s for s in scopes if isinstance(s, str)]
    resource: list[SmartScope] = []
    other: list[str] = []
    unsupported: list[str] = []
    seen: set[str] = set()
    for item in items:
        if item in seen or not item:
            continue
        seen.add(item)
        parsed = parse_scope(item)
        if parsed is not None:
            resource.append(parsed)
        elif _looks_like_resource_scope(item):
            unsupported.append(item)
        else:
            other.append(item)
    return ParsedScopes(tuple(resource), tuple(other), tuple(unsupported))


@dataclass(frozen=True)
class Decision:
    """What a token may do with one resource type and interaction: ``allowed``, and when the grant
    comes from ``patient/`` scopes only, the ``patient`` whose compartment it is limited to."""

    allowed: bool
    patient: str | None = None


@dataclass(frozen=True)
class ScopePolicy:
    """The ``/fhir`` access a token's scopes grant.

    ``patient`` is the token's ``patient`` claim (the launch context); ``patient/`` scopes grant
    nothing without it.
    """

    scopes: ParsedScopes = field(default_factory=ParsedScopes)
    patient: str | None = None

    def decide(self, resource_type: str, interaction: str) -> Decision:
        if interaction not in INTERACTIONS:
            return Decision(False)
        covering = [s for s in self.scopes.resource if s.covers(resource_type, interaction)]
        if any(s.context in ("user", "system") for s in covering):
            return Decision(True)
        if covering and self.patient:
            return Decision(True, self.patient)
        return Decision(False)

    def allows(self, resource_type: str, interaction: str) -> bool:
        """Whether ``interaction`` on ``resource_type`` is granted at all (possibly only inside the
        patient compartment: see :meth:`patient_compartment`)."""
        return self.decide(resource_type, interaction).allowed

    def patient_compartment(self, resource_type: str, interaction: str) -> str | None:
        """The patient id the interaction is limited to (a read outside it is 404, a search outside it
        is empty), or None when it is not limited (a user/ or system/ scope covers it) or not allowed."""
        return self.decide(resource_type, interaction).patient

    def required_scope(self, resource_type: str, interaction: str) -> str:
        """A scope that would allow the interaction, for ``insufficient_scope`` answers."""
        letter = INTERACTIONS.get(interaction, "r")
        return f"user/{resource_type}.{letter}"
