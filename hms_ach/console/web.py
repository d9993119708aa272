"""The console's HTTP glue: templates, the session cookie, the CSRF check, role checks, access records.

:func:`install_console` mounts the console on an app: the pages of :mod:`hms_ach.console.pages`
under ``/console`` and its own script and style sheet under ``/console/static``. The bearer authentication of
the API lets ``/console`` through (``app/authentication.py``): the console authenticates by its own
session cookie here, and sets ``request.state.caller`` so the access log and the audit trail name
the user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.responses import HTMLResponse, Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.console.roles import allowed
from hms_ach.console.session import COOKIE_NAME, Session, SessionStore
from hms_ach.store import access_log

STATIC_DIR = Path(__file__).parent / "static"
#: The console's pages load only their own script and style sheet.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_templates = Environment(
    loader=PackageLoader("hms_ach.console", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _when(value: Any) -> str:
    return "-" if value is None else str(value)[:19].replace("T", " ")


_templates.filters["ms"] = _ms
_templates.filters["when"] = _when


class ConsoleRefusal(Exception):
    """A console request that cannot be served: its status and a page-safe reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sessions_of(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.console_sessions
    return store


def render(
    request: Request, template: str, status: int = 200, session: Session | None = None, **context: Any
) -> HTMLResponse:
    """A page of ``templates/``, with the session's user, roles and CSRF token in its context."""
    body = _templates.get_template(template).render(
        session=session,
        user=session.caller.sub if session else None,
        roles=sorted(session.caller.roles) if session else [],
        csrf=session.csrf if session else "",
        can=(lambda p: allowed(session.caller.roles, p)) if session else (lambda _p: False),
        **context,
    )
    return HTMLResponse(
        body,
        status_code=status,
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-store"},
    )


def require(request: Request, permission: str) -> Session:
    """The request's session if it holds ``permission``; ConsoleRefusal 401 (no session) or 403."""
    session = sessions_of(request).get(request.cookies.get(COOKIE_NAME))
    if session is None:
        raise ConsoleRefusal(401, "sign in first: run `hms-ach console` and open the link it prints")
    setattr(request.state, REQUEST_STATE_ATTRIBUTE, session.caller)
    if not allowed(session.caller.roles, permission):
        raise ConsoleRefusal(
            403,
            f"{permission} needs one of the roles the console grants it; you have {sorted(session.caller.roles)}",
        )
    return session


async def require_post(request: Request, permission: str) -> tuple[Session, dict[str, str]]:
    """:func:`require`, plus the CSRF token of the form (field ``csrf``) or the ``X-CSRF-Token``
    header; ConsoleRefusal 403 without it. Returns the session and the form's fields."""
    session = require(request, permission)
    form = await url_encoded_form(request)
    if not session.csrf_ok(form.get("csrf") or request.headers.get("x-csrf-token")):
        raise ConsoleRefusal(403, "the form's CSRF token is missing or wrong: reload the page and try again")
    return session, form


async def url_encoded_form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (the console's forms; the body
    size is already capped by the HTTP layer). ConsoleRefusal 415 for another content type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if body and kind != "application/x-www-form-urlencoded":
        raise ConsoleRefusal(415, f"a console form is sent url-encoded, not as {kind or 'no content type'}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConsoleRefusal(400, f"the form is not UTF-8 text (byte {exc.start})") from exc
    return {k: v for k, v in parse_qsl(text, keep_blank_values=True)}


def record_access(
    request: Request, subtype: str, resource_type: str, entities: list[str], count: int | None = None
) -> None:
    """One access record (docs/audit.md) of what the console showed or did, with the signed-in caller."""
    access_log.record_request(request, subtype, resource_type, 200, entities, count)


def refusal_response(request: Request, exc: ConsoleRefusal) -> Response:
    return render(request, "refused.html", status=exc.status, reason=exc.reason)
