"""HTTP hardening around every route: security headers, the Host allow-list and CORS.

:func:`install_hardening` adds three pure ASGI layers to the app (none reads or buffers a body):

* :class:`SecurityHeadersMiddleware`, on every answer, errors included:
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``,
  ``Content-Security-Policy`` with ``frame-ancestors 'none'`` (and ``default-src 'none'`` on
  answers that are not HTML pages: JSON loads nothing), ``Cache-Control: no-store`` on every answer
  that may hold PHI (:func:`holds_phi`: ``/fhir`` and ``/api/v1`` but the CapabilityStatement and
  the SMART discovery), and ``Strict-Transport-Security`` when the request came over HTTPS
  (``scope["scheme"] == "https"``, so it follows however TLS is configured).
* :class:`HostAllowListMiddleware`: a request whose ``Host`` header is not in
  ``http.allowed_hosts`` (:meth:`~hms_ach.app.config.HttpSettings.effective_allowed_hosts`) is
  answered 400, an OperationOutcome (a problem under ``/api/v1``), against DNS rebinding: a web page
  whose name an attacker re-points at 127.0.0.1 sends its own name as the Host. ``/health*`` is
  exempt (orchestrator probes send the pod IP).
* Starlette's ``CORSMiddleware`` only when ``http.cors_origins`` names origins: then preflights
  from those origins are answered (the ``Authorization`` header allowed, no credentials: bearer
  tokens need none). Without origins no ``Access-Control-*`` header is ever sent.

The order, outermost first: the access log, the security headers (so the 400, 429, 413 and 401
answers carry them), the Host check, CORS (a preflight is answered before authentication: it
carries no token), the body limit, authentication, the rate limit (:mod:`hms_ach.app.rate_limit`:
it needs the caller), the routes. See docs/security.md, "HTTP hardening".
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hms_ach.app.config import HttpSettings
from hms_ach.fhir.outcomes import operation_outcome, outcome_response
from hms_ach.workforce.api import Problem

log = logging.getLogger("hms_ach.http")

#: Paths never checked against the Host allow-list: the health checks (probes use the pod IP).
HOST_EXEMPT_PREFIX = "/health"
#: Answers under these prefixes may hold PHI and are never stored by a cache (``no-store``)...
PHI_PREFIXES = ("/fhir", "/api/v1")
#: ...except these, which hold no record data (the CapabilityStatement, SMART discovery).
NOT_PHI_PATHS = frozenset({"/fhir/metadata"})
NOT_PHI_PREFIXES = ("/fhir/.well-known/",)
#: The request headers a cross-origin caller may send (preflight), and the answer headers it may read.
CORS_REQUEST_HEADERS = (
    "Authorization",
    "Content-Type",
    "Accept",
    "If-Match",
    "If-None-Match",
    "If-None-Exist",
    "If-Modified-Since",
    "Prefer",
)
CORS_EXPOSED_HEADERS = (
    "Location",
    "Content-Location",
    "ETag",
    "Last-Modified",
    "Retry-After",
    "WWW-Authenticate",
)
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
#: How long a browser may keep a preflight's answer.
CORS_MAX_AGE_SECONDS = 600

_LONGEST_HOST = 300
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def holds_phi(path: str) -> bool:
    """Whether an answer to ``path`` may hold PHI (and so gets ``Cache-Control: no-store``)."""
    if path in NOT_PHI_PATHS or path.startswith(NOT_PHI_PREFIXES):
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PHI_PREFIXES)


def refusal(path: str, status: int, title: str, fhir_code: str, detail: str) -> Response:
    """An answer refusing a request to ``path``: an RFC 9457 problem under ``/api/v1``, an
    OperationOutcome (issue code ``fhir_code``) elsewhere; ``detail`` says what is wrong."""
    if path == "/api/v1" or path.startswith("/api/v1/"):
        return Problem(status, title, detail).response(path)
    return outcome_response(status, operation_outcome(fhir_code, detail))


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP answer (see the module docstring)."""

    def __init__(self, app: ASGIApp, hsts_max_age_seconds: int) -> None:
        self.app = app
        self.hsts = f"max-age={hsts_max_age_seconds}" if hsts_max_age_seconds > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        no_store = holds_phi(str(scope.get("path", "")))
        tls = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", ()))
                headers = MutableHeaders(raw=message["headers"])
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                if "content-security-policy" not in headers:
                    html = headers.get("content-type", "").startswith("text/html")
                    headers["Content-Security-Policy"] = (
                        "frame-ancestors 'none'" if html else "default-src 'none'; frame-ancestors 'none'"
                    )
                if no_store:
                    headers["Cache-Control"] = "no-store"
                if tls and self.hsts is not None:
                    headers["Strict-Transport-Security"] = self.hsts
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(value: str) -> str | None:
    """The host of a ``Host`` header value, lower case, without port or trailing dot; an IP address in
    its canonical form (``[0:0::1]:80`` -> ``::1``). None when it is not a valid host."""
    text = value.strip().lower()
    if not text or len(text) > _LONGEST_HOST or not text.isascii():
        return None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    name, sep, port = text.partition(":")
    if sep and not port.isdigit():
        return None  # a bare IPv6 address or a bad port
    name = name.rstrip(".")
    if not _NAME.fullmatch(name):
        return None
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _allowed_entry(entry: str) -> str:
    """An ``allowed_hosts`` entry in the form :func:`host_name` gives (``[::1]`` and ``::1`` alike)."""
    text = entry.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text


class HostAllowListMiddleware:
    """Answers 400 to a request whose ``Host`` is not allowed (see the module docstring)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        entries = [_allowed_entry(h) for h in allowed_hosts]
        self.any_host = "*" in entries
        self.exact = frozenset(e for e in entries if not e.startswith("*."))
        self.suffixes = tuple(e[1:] for e in entries if e.startswith("*."))  # ".example.org"

    def allows(self, value: str | None) -> bool:
        """Whether a request with this ``Host`` header value (None: none sent) is answered."""
        if self.any_host:
            return True
        name = host_name(value) if value is not None else None
        if name is None:
            return False
        return name in self.exact or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] not in ("http", "websocket") or self.any_host or path.startswith(HOST_EXEMPT_PREFIX):
            await self.app(scope, receive, send)
            return
        host: str | None = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "Host not allowed"})
            return
        detail = (
            "the request has no Host header"
            if host is None
            else "the Host header names a host this server does not answer for (see http.allowed_hosts)"
        )
        await refusal(path, 400, "Invalid Host", "invalid", detail)(scope, receive, send)


def install_hardening(app: FastAPI, settings: HttpSettings) -> None:
    """Add CORS (when origins are configured), the Host check and the security headers to ``app``,
    in that order (the last added runs first)."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            allow_credentials=False,
            max_age=CORS_MAX_AGE_SECONDS,
        )
    allowed = settings.effective_allowed_hosts()
    if settings.allowed_hosts is None and settings.host.strip("[]") in ("0.0.0.0", "::"):
        # bound to every interface, answering the loopback names only: say so once, at start
        log.info("http.allowed_hosts_default", extra={"allowed_hosts": allowed})
    app.add_middleware(HostAllowListMiddleware, allowed_hosts=allowed)
    app.add_middleware(SecurityHeadersMiddleware, hsts_max_age_seconds=settings.hsts_max_age_seconds)
