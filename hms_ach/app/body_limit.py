"""The request body limit of every HTTP route (``http.max_body_bytes``), enforced while streaming.

* A ``Content-Length`` above the limit is answered 413 at once: the application is not called
  and no byte of the body is read.
* Otherwise the body is counted as the application reads it (chunked bodies included). The chunk
  that crosses the limit is never handed over: reading fails, and whatever the application would
  have answered is replaced by the 413. At most ``max_body_bytes`` are ever held for one request.

The 413 speaks each API's error language: an RFC 9457 problem (``application/problem+json``) under
``/api/v1``, an OperationOutcome (issue code ``too-costly``) elsewhere. It carries
``Connection: close``, as the rest of the body is never read. Routes may have lower limits of
their own (a ``fhir_rest`` channel's ``max_body_bytes`` for FHIR writes, the ``_search`` form limit).

Why not FastAPI's own ``max_body_size`` (Starlette's ``RequestBodyLimitMiddleware``): its 413 is
plain text or an ``HTTPException`` answered by the app-wide handler, so /api/v1 would not get its
problem details; here one place decides the answer's shape by API.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hms_ach.fhir.outcomes import FhirError
from hms_ach.workforce.api import Problem

TOO_LARGE = HTTPStatus.REQUEST_ENTITY_TOO_LARGE.value


class BodyTooLarge(Exception):
    """Raised from ``receive`` to the application when the body passes the limit."""


def too_large(path: str, detail: str) -> Response:
    """The 413 answer for ``path``, in the error format of the API it belongs to."""
    if path == "/api/v1" or path.startswith("/api/v1/"):
        response = Problem(TOO_LARGE, "Payload too large", detail).response(path)
    else:
        response = FhirError(TOO_LARGE, "too-costly", detail).response()
    response.headers["connection"] = "close"
    return response


class BodyLimitMiddleware:
    """ASGI middleware refusing request bodies larger than ``max_body_bytes`` with 413."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        path = str(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            detail = f"the body of {declared} bytes exceeds http.max_body_bytes {limit}"
            await too_large(path, detail)(scope, receive, send)
            return
        received = 0
        exceeded = False
        answered = False  # the 413 (or the application's answer) has started

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge(f"the body exceeds http.max_body_bytes {limit}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(f"the body exceeds http.max_body_bytes {limit}")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if exceeded:  # the application answers its failed read: the 413 goes instead
                if not answered:
                    answered = True
                    await self._refuse(scope, receive, send, path)
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not answered:
            answered = True
            await self._refuse(scope, receive, send, path)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        await too_large(path, f"the body exceeds http.max_body_bytes {self.max_body_bytes}")(
            scope, receive, send
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None
