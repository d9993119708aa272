"""Signing in to the console and out (docs/console.md, "Signing in").

* ``local``: ``/console/login?token=`` takes a one-time link of ``hms-ach console``
  (:meth:`~hms_ach.console.session.SessionStore.redeem`);
* ``oidc``: ``/console/login`` starts the authorization code flow with PKCE and ``/console/callback``
  finishes it (:mod:`hms_ach.console.oidc`);
* ``off`` (loopback only): ``/console/login`` opens a session with every console role.

Each ends with the session cookie (:func:`~hms_ach.console.session.cookie_attributes`).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from hms_ach.auth.caller import Caller
from hms_ach.auth.errors import AuthError
from hms_ach.console import oidc
from hms_ach.console.roles import CONSOLE_ROLES
from hms_ach.console.session import COOKIE_NAME, LoginRefused, cookie_attributes
from hms_ach.console.settings import ConsoleSettings
from hms_ach.console.web import render, require_post, sessions_of

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/login")
async def login(request: Request, token: str = "") -> Response:
    authenticator = request.app.state.authenticator
    peer = request.client.host if request.client else None
    sessions = sessions_of(request)
    try:
        if authenticator.settings.mode == "off":  # loopback only: everyone is every role
            caller = Caller(sub="anonymous", roles=frozenset(CONSOLE_ROLES), authenticated=False)
            session = sessions.open(caller)
        elif authenticator.settings.mode == "oidc":
            return await _oidc_begin(request)
        else:
            if not token:
                raise LoginRefused("no login token: run `hms-ach console` and open the link it prints")
            caller = await authenticator.authenticate(f"Bearer {token}", peer)
            if not set(caller.roles) & set(CONSOLE_ROLES):
                raise LoginRefused(
                    f"the login link grants none of the console roles {', '.join(CONSOLE_ROLES)}"
                )
            session = sessions.redeem(caller)
    except (AuthError, LoginRefused) as exc:
        return _refused_sign_in(request, exc)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(COOKIE_NAME, session.id, **cookie_attributes(_tls(request)))
    return response


def _tls(request: Request) -> bool:
    return bool(getattr(request.app.state, "tls", False))


def _refused_sign_in(request: Request, exc: AuthError | LoginRefused) -> Response:
    reason = exc.description if isinstance(exc, AuthError) else str(exc)
    return render(request, "refused.html", status=401, reason=f"sign-in refused: {reason}")


def _console_settings(request: Request) -> ConsoleSettings:
    engine = getattr(request.app.state, "console_engine", None)
    settings = getattr(getattr(engine, "config", None), "console", None)
    return settings if isinstance(settings, ConsoleSettings) else ConsoleSettings()


async def _oidc_endpoints(request: Request) -> dict[str, Any]:
    """The provider's discovery document (read now if the engine has not yet)."""
    authenticator = request.app.state.authenticator
    if authenticator.discovery() is None:
        await authenticator.start()
    discovery = authenticator.discovery()
    if not discovery or not discovery.get("authorization_endpoint") or not discovery.get("token_endpoint"):
        raise LoginRefused(
            "the OpenID provider's discovery document could not be read, or names no endpoints"
        )
    return dict(discovery)


async def _oidc_begin(request: Request) -> Response:
    """Redirect to the provider's sign-in (authorization code with PKCE; see hms_ach/console/oidc.py)."""
    settings = _console_settings(request)
    if not settings.oidc_client_id:
        raise LoginRefused(
            "console.oidc_client_id is not set in channels.yaml: the console has no client at the provider"
        )
    discovery = await _oidc_endpoints(request)
    flow = request.app.state.console_logins.begin(str(request.url_for("oidc_callback")))
    target = oidc.authorization_url(
        str(discovery["authorization_endpoint"]),
        settings.oidc_client_id,
        settings.oidc_scope,
        flow,
        request.app.state.authenticator.settings.audience,
    )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        oidc.STATE_COOKIE, flow.state, httponly=True, samesite="lax", secure=_tls(request),
        path="/console", max_age=oidc.LOGIN_FLOW_SECONDS,
    )  # fmt: skip
    return response


@router.get("/callback", name="oidc_callback")
async def oidc_callback(request: Request, code: str = "", state: str = "", error: str = "") -> Response:
    """The provider's redirect back: the code for a token, the token for a session."""
    authenticator = request.app.state.authenticator
    settings = _console_settings(request)
    try:
        if error:
            raise LoginRefused(f"the OpenID provider said {error[:100]}")
        cookie = request.cookies.get(oidc.STATE_COOKIE, "")
        if not state or not code or not hmac.compare_digest(cookie.encode(), state.encode()):
            raise LoginRefused(
                "the sign-in's state does not match this browser's: start again at /console/login"
            )
        flow = request.app.state.console_logins.take(state)
        discovery = await _oidc_endpoints(request)
        secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
        token = await oidc.exchange_code(
            str(discovery["token_endpoint"]), code, flow, settings.oidc_client_id or "", secret,
            authenticator.settings.audience, authenticator.settings.http_timeout_seconds,
            authenticator.settings.max_document_bytes,
        )  # fmt: skip
        peer = request.client.host if request.client else None
        caller = await authenticator.authenticate(f"Bearer {token}", peer)
        if not set(caller.roles) & set(CONSOLE_ROLES):
            raise LoginRefused(f"the provider grants none of the console roles {', '.join(CONSOLE_ROLES)}")
        session = sessions_of(request).open(caller)
    except (AuthError, LoginRefused) as exc:
        return _refused_sign_in(request, exc)
    # a page of our own, not a redirect: the SameSite=Strict cookie is sent on the next navigation,
    # which starts on this site (a redirect would continue the provider's cross-site one)
    response = render(request, "signed_in.html", session=session)
    response.set_cookie(COOKIE_NAME, session.id, **cookie_attributes(_tls(request)))
    response.delete_cookie(oidc.STATE_COOKIE, path="/console")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session, _form = await require_post(request, "dashboard.read")
    sessions_of(request).end(session.id)
    response = RedirectResponse("/console/signed-out", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/console")
    return response


@router.get("/signed-out")
def signed_out(request: Request) -> Response:
    return render(request, "refused.html", status=200, reason="signed out")
