"""Authentication of every HTTP request: the bearer token in, ``request.state.caller`` out.

:class:`AuthenticationMiddleware` is a pure ASGI middleware (it never buffers a body, so streamed
answers stream as before). For each HTTP request it:

1. lets the public paths through (:func:`is_public`): ``/health*`` and ``/.well-known/*``, and the
   API description (``/docs``, ``/redoc``, ``/openapi.json``), which holds no record data;
2. sets ``request.state.caller`` to None, so that a refused request is logged as anonymous;
3. asks the :class:`~hms_ach.auth.authenticate.Authenticator` for the caller of the
   ``Authorization`` header (verified tokens are cached there, so a client's next request costs a
   dictionary lookup) and stores the :class:`~hms_ach.auth.caller.Caller` in ``request.state.caller``;
4. or answers the :class:`~hms_ach.auth.errors.AuthError` itself: 401/400/503 with the RFC 6750
   ``WWW-Authenticate: Bearer ...`` challenge, an OperationOutcome as the body, except under
   ``/api/v1`` where it is an RFC 9457 problem (:func:`auth_error_response`).

A WebSocket connection (no route serves one today) is authenticated the same way and closed with
code 1008 when refused.

Routes decide what the caller may do (SMART scopes on ``/fhir``, roles on ``/api/v1``) and answer
403 ``insufficient_scope`` with :func:`auth_error_response` too.

:func:`well_known_router` serves ``/.well-known/jwks.json`` (local mode) and
``/.well-known/smart-configuration``; :func:`install_openapi_security` declares the bearer scheme in
the OpenAPI document. See docs/security.md.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hms_ach.auth.authenticate import Authenticator
from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.auth.errors import AuthError, challenge, fhir_issue_code
from hms_ach.auth.smart import LOCAL_JWKS_PATH, openapi_security, smart_configuration
from hms_ach.fhir.audit_events import record_refusal
from hms_ach.fhir.outcomes import operation_outcome, outcome_response
from hms_ach.workforce.api import Problem

#: Paths answered without a token: the health checks and the published keys and configuration
#: (SMART discovery is at the FHIR base too: ``/fhir/.well-known/smart-configuration``), and the
#: Swagger UI and ReDoc files of /docs and /redoc (``/docs/assets/``, served by the engine).
PUBLIC_PREFIXES = ("/health", "/.well-known/", "/fhir/.well-known/", "/docs/assets/")
#: The web console: it authenticates by its own session cookie (hms_ach/console/web.py), not bearer tokens.
CONSOLE_PREFIX = "/console"
#: The FHIR CapabilityStatement: public, as on every FHIR server, since a client reads it (and the
#: SMART oauth-uris in it) before it has a token; it holds no record data.
CAPABILITY_PATHS = frozenset({"/fhir/metadata"})
#: The API description: public, because it describes the routes and holds no record data.
DOCUMENTATION_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: The prefix whose errors are RFC 9457 problems (every other path answers OperationOutcomes).
PROBLEM_PREFIX = "/api/v1"

#: The titles of the problem answering each status.
_PROBLEM_TITLES = {
    400: "Invalid request",
    401: "Unauthorized",
    403: "Forbidden",
    503: "Service unavailable",
}


def is_public(path: str) -> bool:
    """Whether ``path`` is served without a token."""
    return (
        path.startswith(PUBLIC_PREFIXES)
        or path in DOCUMENTATION_PATHS
        or path in CAPABILITY_PATHS
        or path == CONSOLE_PREFIX
        or path.startswith(CONSOLE_PREFIX + "/")
    )


def auth_error_response(error: AuthError, path: str) -> Response:
    """The answer to ``error`` for a request to ``path``: its status and ``WWW-Authenticate``
    challenge (:func:`hms_ach.auth.errors.challenge`), with an RFC 9457 problem under ``/api/v1``
    and an OperationOutcome elsewhere; the body says what is wrong (``error.description``)."""
    status, headers = challenge(error)
    if path == PROBLEM_PREFIX or path.startswith(PROBLEM_PREFIX + "/"):
        problem = Problem(status, _PROBLEM_TITLES.get(status, "Unauthorized"), error.description)
        response = problem.response(path)
        response.headers.update(headers)
        return response
    return outcome_response(status, operation_outcome(fhir_issue_code(error), error.description), headers)


class AuthenticationMiddleware:
    """Authenticates every HTTP request but the public ones (see the module docstring)."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state[REQUEST_STATE_ATTRIBUTE] = None
        path: str = scope.get("path", "")
        if is_public(path):
            await self.app(scope, receive, send)
            return
        authorization: str | None = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        client = scope.get("client")
        peer = client[0] if client else None
        try:
            caller = await self.authenticator.authenticate(authorization, peer)
        except AuthError as exc:
            if scope["type"] == "websocket":  # no route serves one today; refuse it like HTTP would
                await send({"type": "websocket.close", "code": 1008, "reason": "authentication required"})
                return
            response = auth_error_response(exc, path)
            record_refusal(scope, response.status_code, peer)  # the access trail (docs/audit.md)
            await response(scope, receive, send)
            return
        state[REQUEST_STATE_ATTRIBUTE] = caller
        await self.app(scope, receive, send)


def well_known_router(authenticator: Authenticator) -> APIRouter:
    """``GET /.well-known/jwks.json`` (the local issuer's public key; 404 in the other modes) and
    ``GET /.well-known/smart-configuration`` (SMART App Launch 2.x)."""
    router = APIRouter(tags=["authorization"])

    @router.get(LOCAL_JWKS_PATH)
    def jwks() -> Response:
        keys = authenticator.jwks()
        if keys is None:
            return outcome_response(
                404,
                operation_outcome(
                    "not-found", "this engine issues no tokens (auth.mode is not local): no JWKS here"
                ),
            )
        return Response(orjson.dumps(keys), media_type="application/json")

    @router.get("/.well-known/smart-configuration")
    @router.get("/fhir/.well-known/smart-configuration", include_in_schema=False)  # at the FHIR base too
    def smart(request: Request) -> Response:
        doc = smart_configuration(authenticator.settings, str(request.base_url), authenticator.discovery())
        return Response(orjson.dumps(doc), media_type="application/json")

    return router


def install_openapi_security(app: FastAPI, authenticator: Authenticator) -> None:
    """Declare the bearer (and oidc openIdConnect) security schemes in ``app``'s OpenAPI document,
    required by every operation (the public paths need none, as docs/security.md says)."""
    schemes, requirement = openapi_security(authenticator.settings)
    if not schemes:
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        doc.setdefault("components", {})["securitySchemes"] = schemes
        doc["security"] = requirement
        for path, operations in doc.get("paths", {}).items():
            if is_public(path):
                for operation in operations.values():
                    if isinstance(operation, dict):
                        operation["security"] = []
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
