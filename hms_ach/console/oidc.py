"""Console sign-in in ``auth.mode: oidc``: the authorization code flow with PKCE (RFC 7636, S256).

1. ``/console/login`` remembers a new :class:`PendingLogin` (state, code verifier, nonce; 10 minutes,
   used once), sets its state in a short cookie (SameSite=Lax: the provider's redirect back is a
   cross-site navigation) and redirects to the provider's ``authorization_endpoint``.
2. ``/console/callback`` takes the pending login of the returned ``state`` (it must match the
   cookie), exchanges the code and the verifier at the ``token_endpoint`` (:func:`exchange_code`),
   and verifies the access token like any bearer token of the API (issuer, audience, algorithms);
   its roles open the session.

The token request goes out with httpx, bounded in time and size; nothing here parses a JWT itself.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx

from hms_ach.console.session import LoginRefused

#: How long a started sign-in may take at the provider.
LOGIN_FLOW_SECONDS = 600
MAX_PENDING = 1000
#: The cookie holding the state of the sign-in in progress.
STATE_COOKIE = "hms_ach_console_login"


def code_challenge(verifier: str) -> str:
    """The S256 challenge of a PKCE code verifier: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class PendingLogin:
    redirect_uri: str
    state: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48))  # 64 characters
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    started: float = field(default_factory=time.monotonic)


class LoginFlows:
    """The sign-ins in progress, by state; each taken once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._pending: dict[str, PendingLogin] = {}
        self._lock = threading.Lock()

    def begin(self, redirect_uri: str) -> PendingLogin:
        login = PendingLogin(redirect_uri, started=self._clock())
        with self._lock:
            self._pending[login.state] = login
            for state in [s for s, p in self._pending.items() if self._expired(p)]:
                del self._pending[state]
            while len(self._pending) > MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
        return login

    def take(self, state: str) -> PendingLogin:
        """The pending login of ``state``, forgotten now; LoginRefused when unknown or too old."""
        with self._lock:
            login = self._pending.pop(state, None)
        if login is None or self._expired(login):
            raise LoginRefused(
                "this sign-in is unknown, used or older than 10 minutes: start again at /console/login"
            )
        return login

    def _expired(self, login: PendingLogin) -> bool:
        return self._clock() - login.started > LOGIN_FLOW_SECONDS


def authorization_url(
    endpoint: str, client_id: str, scope: str, login: PendingLogin, resource: str | None
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": login.redirect_uri,
        "scope": scope,
        "state": login.state,
        "nonce": login.nonce,
        "code_challenge": code_challenge(login.verifier),
        "code_challenge_method": "S256",
    }
    if resource:
        params["resource"] = resource  # RFC 8707: the access token is for this API
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)


async def exchange_code(
    token_endpoint: str,
    code: str,
    login: PendingLogin,
    client_id: str,
    client_secret: str | None,
    resource: str | None,
    timeout_seconds: float,
    max_bytes: int,
) -> str:
    """The access token the provider gives for ``code``; LoginRefused saying why not."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": login.redirect_uri,
        "code_verifier": login.verifier,
    }
    if resource:
        form["resource"] = resource
    if client_secret is None:
        form["client_id"] = client_id  # a public client: PKCE is its proof
    try:
        async with httpx.AsyncClient(timeout=timeout_seconds, trust_env=False) as client:
            if client_secret is None:
                answer = await client.post(token_endpoint, data=form)
            else:
                answer = await client.post(
                    token_endpoint, data=form, auth=httpx.BasicAuth(client_id, client_secret)
                )
    except httpx.HTTPError as exc:
        raise LoginRefused(f"the provider's token endpoint did not answer: {type(exc).__name__}") from exc
    if len(answer.content) > max_bytes:
        raise LoginRefused(f"the token answer is over {max_bytes} bytes")
    try:
        body = answer.json()
    except ValueError as exc:
        raise LoginRefused(f"the token endpoint answered {answer.status_code} without JSON") from exc
    if answer.status_code != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else None
        raise LoginRefused(f"the token endpoint refused the code: {answer.status_code} {error or ''}".strip())
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise LoginRefused("the token answer has no access_token")
    return token
