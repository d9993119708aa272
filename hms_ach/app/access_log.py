"""The HTTP access log: one ``http.request`` event per request, with no values from the request.

Each event carries:

* ``method``;
* ``route``: the matched route's path template (``/fhir/Patient/{rid}``, ``/api/v1/employees/{employee_id}``),
  never the concrete path, which holds ids; ``(unmatched)`` when no route matched (a 404) or the
  request was answered before routing (a 413 for a declared ``Content-Length`` over the limit);
* ``status`` (500 when the application failed before answering) and ``duration_ms``;
* ``client``: the peer address (``host:port``) as the server saw it;
* ``caller``: who made the request once authentication has run, else null.

Query strings, headers and bodies are never logged. uvicorn's own access log is off
(``access_log=False``), so this is the only one. On by default; ``http.access_log: false`` turns it off.

**The caller.** An authentication layer records who called by setting ``request.state.caller``
(``scope["state"]["caller"]``) to an object with a ``subject`` string attribute (a client id or
user name, never PHI), or to None for an anonymous request. :class:`Caller` is the shape read here
(a Protocol: any object with ``subject`` fits); an object without it is logged as its type name.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, runtime_checkable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hms_ach.core import metrics

log = logging.getLogger("hms_ach.http.access")

#: The attribute of ``request.state`` (the key of ``scope["state"]``) that names the caller.
CALLER_ATTRIBUTE = "caller"


@runtime_checkable
class Caller(Protocol):
    """Who made a request, as set by authentication in ``request.state.caller``."""

    @property
    def subject(self) -> str: ...


def caller_of(scope: Scope) -> str | None:
    """The caller's subject from ``request.state.caller``, or None when no one authenticated."""
    state = scope.get("state")
    caller = state.get(CALLER_ATTRIBUTE) if isinstance(state, dict) else None
    if caller is None:
        return None
    subject = getattr(caller, "subject", None)
    return str(subject)[:200] if subject is not None else type(caller).__name__


def route_template(scope: Scope) -> str:
    """The path template of the route that matched (set by the router), never the concrete path;
    ``(unmatched)`` when the request was answered before or without a route."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not path:
        return "(unmatched)"
    if ":" in str(path):  # a convertor (/{rid:fhir_id}): Starlette's template without it
        path = getattr(route, "path_format", None) or path
    return str(path)


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


#: The latency histogram's child per (method, route template, status class), looked up once:
#: ``labels()`` costs a lock and a tuple of strings on every request. Bounded: methods, route
#: templates and status classes are finite.
_LATENCY_CHILDREN: dict[tuple[str, str, int], Any] = {}


def _latency(method: str, route: str, status_hundreds: int) -> Any:
    key = (method, route, status_hundreds)
    child = _LATENCY_CHILDREN.get(key)
    if child is None:
        child = metrics.HTTP_REQUESTS.labels(method, route, metrics.status_class(status_hundreds * 100))
        _LATENCY_CHILDREN[key] = child
    return child


class AccessLogMiddleware:
    """ASGI middleware writing one ``http.request`` event (INFO) per HTTP request (unless
    ``log_requests`` is False), and timing every request for ``hms_ach_http_request_seconds``."""

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            method, route, code = (
                str(scope.get("method", "")),
                route_template(scope),
                status[0] if status else 500,
            )
            _latency(method if method in _METHODS else "other", route, code // 100).observe(seconds)
            if self.log_requests:
                fields: dict[str, Any] = {
                    "method": method,
                    "route": route,
                    "status": code,
                    "duration_ms": round(seconds * 1000, 1),
                    "client": _client(scope),
                    "caller": caller_of(scope),
                }
                log.info("http.request", extra=fields)
