"""OperationOutcome responses: the one error shape of the HTTP API.

Raise :class:`FhirError` anywhere in a route to answer with an OperationOutcome and an HTTP status.
The store refuses with domain errors (:mod:`hms_ach.store.errors`); :func:`http_error` is the one
place that gives each of them its HTTP status (a domain error that reaches a route unhandled is
answered the same way).
:func:`install_handlers` also turns request-validation errors, Starlette HTTP errors (unknown path,
wrong method) and any unexpected exception into OperationOutcomes. An unexpected exception becomes
a 500 whose body says nothing about the internals; the details go to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from hms_ach.store.errors import (
    Conflict,
    DomainError,
    Gone,
    Invalid,
    MultipleMatches,
    NotFound,
    RuleViolation,
    StoreUnavailable,
    VersionConflict,
)

log = logging.getLogger("hms_ach.app")

FHIR_JSON = "application/fhir+json; charset=utf-8"

#: Codes of the FHIR R4 IssueType value set (http://hl7.org/fhir/issue-type) that we use.
ISSUE_TYPES = frozenset(
    {
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    }
)

#: The issue-type code used when an HTTP status arrives without one.
STATUS_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
}


def operation_outcome(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    expression: list[str] | None = None,
) -> dict[str, Any]:
    """An OperationOutcome with one issue, as a JSON-ready dict."""
    if code not in ISSUE_TYPES:
        code = "processing"
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(status: int, outcome: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(outcome), status_code=status, media_type=FHIR_JSON, headers=headers)


class FhirError(Exception):
    """Answer the request with ``status`` and an OperationOutcome (``code`` from the issue-type set)."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = headers
        super().__init__(f"{status} {code}: {diagnostics}")

    def response(self) -> Response:
        outcome = operation_outcome(
            self.code, self.diagnostics, expression=[self.expression] if self.expression else None
        )
        return outcome_response(self.status, outcome, self.headers)


#: The HTTP status of each kind of domain error (the first class of the error's MRO found here).
DOMAIN_STATUS: dict[type[DomainError], int] = {
    Invalid: 400,
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    VersionConflict: 412,
    MultipleMatches: 412,
    RuleViolation: 422,
    StoreUnavailable: 503,  # transient: the client sends again later
}


def http_error(exc: DomainError) -> FhirError:
    """The HTTP answer to a domain error: its status, its issue code, message and expression."""
    status = next((DOMAIN_STATUS[c] for c in type(exc).__mro__ if c in DOMAIN_STATUS), 422)
    return FhirError(status, exc.code, exc.message, expression=exc.expression)


async def _domain_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, DomainError):  # registered for DomainError only
        return await _unexpected(_request, exc)
    return http_error(exc).response()


async def _fhir_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, FhirError):  # registered for FhirError only
        return await _unexpected(_request, exc)
    return exc.response()


async def _validation_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        return await _unexpected(_request, exc)
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return outcome_response(400, operation_outcome("invalid", "; ".join(parts) or "invalid request"))


async def _http_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        return await _unexpected(_request, exc)
    code = STATUS_CODES.get(exc.status_code, "processing" if exc.status_code < 500 else "exception")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    return outcome_response(exc.status_code, operation_outcome(code, detail), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    route = getattr(request.scope.get("route"), "path", None)  # the template: a concrete path holds ids
    log.exception("api.unexpected_error", extra={"route": route, "error_type": type(exc).__name__})
    outcome = operation_outcome("exception", "internal server error; the event is in the server log")
    return outcome_response(500, outcome)


def install_handlers(app: FastAPI) -> None:
    """Make every error response of ``app`` an OperationOutcome."""
    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
