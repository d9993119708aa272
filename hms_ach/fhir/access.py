"""SMART scopes on ``/fhir``: what the caller of a request may do, decided in one place.

The authentication middleware leaves the request's :class:`~hms_ach.auth.caller.Caller` in
``request.state.caller``; its :attr:`~hms_ach.auth.caller.Caller.policy` (a
:class:`~hms_ach.auth.scopes.ScopePolicy`) answers per resource type and interaction. This module
turns the answers into the engine's terms:

* :func:`require` refuses an interaction the scopes do not grant: 403 ``forbidden`` with
  ``WWW-Authenticate: Bearer error="insufficient_scope", scope="..."``. A grant that comes from
  ``patient/`` scopes only carries the patient whose compartment limits it.
* :func:`search_access` is what a search may return, as data for the SQL builder
  (:class:`~hms_ach.store.search_query.Access`): the visible types, each unlimited or limited to one
  patient's compartment. The store adds the compartment as a bound condition of the query, and
  leaves ``_include``-d records of types the caller may not search out of the query.
* :func:`check_record` hides a record outside the compartment (404, as if it did not exist).
* :class:`WriteGuard` decides every write operation, one request or each entry of a Bundle, before
  anything is applied.

A request without a caller in its state is refused (401): the scopes are never skipped. With
``auth.mode: off`` the middleware lets every request in as an anonymous caller holding every scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Request

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE, Caller
from hms_ach.auth.errors import challenge, insufficient_scope
from hms_ach.auth.scopes import Decision, ScopePolicy
from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir.outcomes import FhirError, operation_outcome
from hms_ach.fhir.write import Operation, Result
from hms_ach.store import resources, search
from hms_ach.store.db import Store
from hms_ach.store.search_params import in_patient_compartment

#: Allowed, not limited to a compartment (the default of the read handlers' ``decision``).
UNLIMITED = Decision(True)


def policy_of(request: Request) -> ScopePolicy:
    """The caller's scope policy; 401 when the request has no authenticated caller (the middleware
    was not installed, or let the request in without one: never expected)."""
    caller: Any = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
    if not isinstance(caller, Caller):
        raise FhirError(
            401, "login", "no authenticated caller", headers={"WWW-Authenticate": 'Bearer realm="hms-ach"'}
        )
    return caller.policy


def refusal(policy: ScopePolicy, resource_type: str, interaction: str) -> FhirError:
    """403 ``insufficient_scope`` naming a scope that would allow ``interaction`` on ``resource_type``."""
    scope = policy.required_scope(resource_type, interaction)
    error = insufficient_scope(f"the token's scopes do not allow {interaction} on {resource_type}", scope)
    _status, headers = challenge(error)
    return FhirError(403, "forbidden", f"{error.description}; it needs a scope like {scope}", headers=headers)


def decide(policy: ScopePolicy, resource_type: str, interaction: str) -> Decision:
    """The decision for ``interaction`` on ``resource_type``; raises 403 when it is not allowed."""
    decision = policy.decide(resource_type, interaction)
    if not decision.allowed:
        raise refusal(policy, resource_type, interaction)
    return decision


def require(request: Request, resource_type: str, interaction: str) -> Decision:
    """:func:`decide` for the caller of ``request``."""
    return decide(policy_of(request), resource_type, interaction)


@lru_cache(maxsize=1024)
def search_access(policy: ScopePolicy) -> search.Access:
    """What a search by this caller may return: every served type it may search, each unlimited
    (``user/``, ``system/``) or limited to its patient's compartment (``patient/`` only). Remembered
    per policy (scopes and patient), so a client's next search does not decide every type again."""
    types: dict[str, str | None] = {}
    for rtype in FHIR_SERVED:
        decision = policy.decide(rtype, "search")
        if decision.allowed:
            types[rtype] = decision.patient
    return search.Access(types)


def not_found(resource_type: str, rid: str) -> FhirError:
    return FhirError(404, "not-found", f"{resource_type}/{rid[:64]} is not known")


def check_record(
    decision: Decision, resource_type: str, rid: str, text: str, what: str | None = None
) -> None:
    """404 unless the stored record ``resource_type/rid`` (one version's JSON ``text``) is in the
    decision's patient compartment; ``what`` names it in the answer (default ``rid``)."""
    if decision.patient is None:
        return
    try:
        content = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise not_found(resource_type, what or rid) from None
    if not isinstance(content, dict) or not in_patient_compartment(
        resource_type, rid, content, decision.patient
    ):
        raise not_found(resource_type, what or rid)


# ---------------------------------------------------------------------------- writes
def interactions_of(op: Operation) -> tuple[str, ...]:
    """The SMART interactions a write operation needs. A conditional update may create the record, so
    it needs both ``c`` and ``u``."""
    if op.method == "DELETE":
        return ("delete",)
    if op.method == "POST":
        return ("create",)
    if op.rid is None:
        return ("create", "update")
    return ("update",)


@dataclass
class WriteGuard:
    """Decides the write operations of one request by the caller's scopes, before any is applied.

    Under ``patient/`` scopes a write must stay inside the patient's compartment: the new content
    must be in it (else 403), and the record an update or delete targets, or that a conditional
    create or update matches, must be in it (else 404, as a read). The targets are read on the reader pool just before the request is queued for the
    writer, so a record moved out of the compartment in between is a race this check does not see.
    """

    store: Store
    policy: ScopePolicy

    @property
    def reads(self) -> bool:
        """Whether :meth:`allowed` may read the store (only a token with a ``patient`` claim)."""
        return self.policy.patient is not None

    def check(self, op: Operation) -> None:
        """Raise the 403 or 404 that refuses ``op``; return when it is allowed."""
        patient: str | None = None
        for interaction in interactions_of(op):
            decision = decide(self.policy, op.resource_type, interaction)
            patient = patient or decision.patient
        if patient is None:
            return
        rtype = op.resource_type
        content = op.resource if isinstance(op.resource, dict) else {}
        if op.method != "DELETE" and not in_patient_compartment(rtype, op.rid or "", content, patient):
            raise FhirError(
                403,
                "forbidden",
                f"the token is limited to the compartment of Patient/{patient[:64]}, and this "
                f"{rtype} is not in it",
                expression=f"{op.where}.resource".lstrip(".") if op.where else None,
            )
        for rid in self._targets(op):
            found = resources.read(self.store, rtype, rid)
            if found is not None:
                check_record(Decision(True, patient), rtype, rid, found.text)

    def _targets(self, op: Operation) -> list[str]:
        """The ids of the existing records ``op`` changes or answers with: by id, or found by the
        identifier of a conditional update or a conditional create (``If-None-Exist``, whose match is
        returned as it is)."""
        if op.method == "POST" and not op.if_none_exist:
            return []
        if op.method != "POST" and op.rid is not None:
            return [op.rid]
        condition = op.if_none_exist if op.method == "POST" else op.query
        pairs = parse_qsl(condition or "", keep_blank_values=True)
        if len(pairs) != 1 or pairs[0][0] != "identifier":
            return []  # refused as malformed when applied
        try:
            query = search.parse_query(op.resource_type, [pairs[0], ("_count", "10")])
        except search.SearchError:
            return []
        page = resources.search(self.store, query)
        return [rid for rid, _text in page.matches]

    def allowed(self, ops: list[Operation], kind: str) -> dict[int, Result]:
        """Check every operation. A single request or a transaction is refused as a whole by its first
        refused operation (nothing is written). In a batch, a refused entry alone fails: its 403/404
        result is returned by index, and the caller applies the others."""
        refused: dict[int, Result] = {}
        for i, op in enumerate(ops):
            try:
                self.check(op)
            except FhirError as exc:
                if kind != "batch":
                    raise
                outcome = operation_outcome(
                    exc.code, exc.diagnostics, expression=[exc.expression] if exc.expression else None
                )
                refused[i] = Result(exc.status, op.resource_type, outcome=outcome)
        return refused
