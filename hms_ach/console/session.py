"""Console sessions: a one-time login token in, a session cookie out, and a CSRF token per session.

No web framework here, so the rules are tested alone (tests/unit/console/test_session.py):

* **Login link** (``local`` auth mode): ``hms-ach console`` mints a short-lived token of the engine's
  local issuer for the client :data:`LOGIN_CLIENT_ID`. The console verifies it like any bearer token,
  then :meth:`SessionStore.redeem` accepts each token id (``jti``) once: a second use of the same link
  is refused, and the ids are forgotten once the token has expired anyway.
* **Session**: a random 256-bit id, kept in memory by the engine (a restart signs everyone out), sent
  as the cookie :data:`COOKIE_NAME` (HttpOnly, SameSite=Strict, Secure over TLS: see
  :func:`cookie_attributes`). It expires :data:`SESSION_TTL_SECONDS` after sign-in.
* **CSRF**: each session has its own random token; every POST must carry it (form field ``csrf`` or
  header ``X-CSRF-Token``), compared in constant time (:meth:`Session.csrf_ok`). SameSite=Strict
  already keeps the cookie off cross-site requests; the token is the second lock.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from hms_ach.auth.caller import Caller

#: The cookie holding the session id.
COOKIE_NAME = "hms_ach_console"
#: The OAuth client id of login-link tokens (``hms-ach console``); other tokens do not sign in.
LOGIN_CLIENT_ID = "hms-ach-console"
#: How long a login link is valid.
LOGIN_TTL_SECONDS = 300
#: How long a session lasts after sign-in.
SESSION_TTL_SECONDS = 8 * 3600
#: At most this many sessions are kept; the oldest is dropped past it.
MAX_SESSIONS = 1000


class LoginRefused(Exception):
    """A login token that cannot open a session (the reason is safe to show)."""


@dataclass
class Session:
    """One signed-in user: who, the CSRF token of their forms, when it ends."""

    id: str
    caller: Caller
    csrf: str
    expires_at: float
    created_at: float = field(default_factory=time.time)

    def csrf_ok(self, presented: str | None) -> bool:
        """Whether ``presented`` is this session's CSRF token (constant-time comparison)."""
        return bool(presented) and hmac.compare_digest(self.csrf.encode(), str(presented).encode())


class SessionStore:
    """The sessions of one engine and the login token ids already used. Thread-safe."""

    def __init__(
        self,
        ttl_seconds: float = SESSION_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
        max_sessions: int = MAX_SESSIONS,
    ):
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}
        self._used: dict[str, float] = {}  # login token id -> when it expires
        self._lock = threading.Lock()

    def redeem(self, caller: Caller) -> Session:
        """Open a session for the verified login token of ``caller``; LoginRefused when the token is
        not a login link, has no id, or was used before."""
        if caller.client_id != LOGIN_CLIENT_ID:
            raise LoginRefused(f"not a console login link (client {caller.client_id!r}); run hms-ach console")
        if not caller.token_id:
            raise LoginRefused("the login link has no token id (jti)")
        now = self._clock()
        with self._lock:
            self._forget_expired(now)
            if caller.token_id in self._used:
                raise LoginRefused("this login link was already used; run hms-ach console for a new one")
            self._used[caller.token_id] = float(caller.expires_at or now + LOGIN_TTL_SECONDS)
            return self._open(caller, now)

    def open(self, caller: Caller) -> Session:
        """Open a session for ``caller`` without a login token (``auth.mode: off``, loopback only)."""
        with self._lock:
            return self._open(caller, self._clock())

    def _open(self, caller: Caller, now: float) -> Session:
        session = Session(
            secrets.token_urlsafe(32), caller, secrets.token_urlsafe(32), now + self.ttl_seconds
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.pop(next(iter(self._sessions)))
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this cookie value, or None (unknown or expired)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if session.expires_at <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def end(self, session_id: str | None) -> None:
        """Sign out: the session is forgotten."""
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def _forget_expired(self, now: float) -> None:
        for jti in [j for j, until in self._used.items() if until <= now]:
            del self._used[jti]
        for sid in [s for s, sess in self._sessions.items() if sess.expires_at <= now]:
            del self._sessions[sid]


class CookieAttributes(TypedDict):
    httponly: bool
    samesite: Literal["strict"]
    secure: bool
    path: str
    max_age: int


def cookie_attributes(tls: bool, max_age: int = SESSION_TTL_SECONDS) -> CookieAttributes:
    """The session cookie's attributes: HttpOnly, SameSite=Strict, path /console, Secure over TLS."""
    return {
        "httponly": True,
        "samesite": "strict",
        "secure": tls,
        "path": "/console",
        "max_age": max_age,
    }
