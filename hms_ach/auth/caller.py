"""Who is calling: the verified claims of a bearer token, in the engine's terms.

The HTTP layer keeps the caller of a request in ``request.state.caller`` (a :class:`Caller`, or None
before authentication ran); the access log and the audit trail read it from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hms_ach.auth.roles import Grant, grant
from hms_ach.auth.scopes import ParsedScopes, ScopePolicy, parse_scopes

#: The attribute of ``request.state`` that holds the request's :class:`Caller` (or None).
REQUEST_STATE_ATTRIBUTE = "caller"


@dataclass(frozen=True)
class Caller:
    """The verified identity and grants of a request.

    * ``sub``: the token's subject (a user, or a client for client-credentials tokens);
    * ``client_id``: the OAuth client (``client_id`` or ``azp`` claim), if the token says;
    * ``scopes``: the parsed ``scope``/``scp`` claim; :attr:`policy` answers for ``/fhir``;
    * ``roles``: the ``/api/v1`` roles (from ``auth.roles_claim``); :meth:`grant` answers for ``/api/v1``;
    * ``patient``: the SMART launch context patient id (``patient`` claim), which limits ``patient/`` scopes;
    * ``employee_id`` and ``departments``: the ``employee_id`` and ``department`` claims, which limit the
      ``employee`` and ``scheduler`` roles;
    * ``source_address``: the peer address of the request (for logs and the audit trail);
    * ``issuer``: the ``iss`` of the token (None when authentication is off);
    * ``token_id``: the ``jti`` claim, if any; ``expires_at``: ``exp`` (seconds since the epoch).
    """

    sub: str
    client_id: str | None = None
    scopes: ParsedScopes = field(default_factory=ParsedScopes)
    roles: frozenset[str] = frozenset()
    patient: str | None = None
    employee_id: str | None = None
    departments: frozenset[str] = frozenset()
    source_address: str | None = None
    issuer: str | None = None
    token_id: str | None = None
    expires_at: int | None = None
    authenticated: bool = True

    @property
    def subject(self) -> str:
        """``sub``, under the name the HTTP access log reads (``request.state.caller.subject``)."""
        return self.sub

    @property
    def policy(self) -> ScopePolicy:
        """The ``/fhir`` access the token's SMART scopes grant."""
        return ScopePolicy(self.scopes, self.patient)

    def grant(self, action: str) -> Grant:
        """What the caller's roles allow for an ``/api/v1`` action (see :mod:`hms_ach.auth.roles`)."""
        return grant(self.roles, action, self.employee_id, self.departments)

    def log_fields(self) -> dict[str, Any]:
        """The caller for a log line or an audit entry: identifiers and grants, never the token."""
        return {
            "sub": self.sub,
            "client_id": self.client_id,
            "roles": sorted(self.roles),
            "scopes": list(self.scopes.texts),
            "source_address": self.source_address,
            "issuer": self.issuer,
        }


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    """A claim that may be one string (space-separated for scopes) or a list of strings."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def caller_from_claims(claims: Mapping[str, Any], roles_claim: str, source_address: str | None) -> Caller:
    """A Caller from verified claims: ``scope`` (a space-separated string) or ``scp`` (a list), roles
    at ``roles_claim``, ``patient``, ``employee_id``, ``department`` (a string or a list)."""
    scope_value = claims.get("scope") if claims.get("scope") is not None else claims.get("scp")
    departments: Iterable[str] = _strings(claims.get("department"))
    exp = claims.get("exp")
    return Caller(
        sub=str(claims.get("sub")),
        client_id=_string(claims.get("client_id")) or _string(claims.get("azp")),
        scopes=parse_scopes(_strings(scope_value)),
        roles=frozenset(_strings(claim_at(claims, roles_claim))),
        patient=_string(claims.get("patient")),
        employee_id=_string(claims.get("employee_id")),
        departments=frozenset(departments),
        source_address=source_address,
        issuer=_string(claims.get("iss")),
        token_id=_string(claims.get("jti")),
        expires_at=int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None,
    )
