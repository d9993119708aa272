"""Console sessions: the one-time login link, session expiry, the CSRF token, the cookie attributes."""

from __future__ import annotations

import pytest

from hms_ach.auth.caller import Caller
from hms_ach.console.roles import CONSOLE_ROLES, PERMISSIONS, allowed
from hms_ach.console.session import (
    LOGIN_CLIENT_ID,
    LoginRefused,
    SessionStore,
    cookie_attributes,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def login(jti: str = "j1", client_id: str = LOGIN_CLIENT_ID, expires_at: int = 1_000_300) -> Caller:
    return Caller(
        sub="olga", client_id=client_id, roles=frozenset({"operator"}), token_id=jti, expires_at=expires_at
    )


def test_a_login_link_opens_one_session_and_only_once() -> None:
    sessions = SessionStore(clock=Clock())
    session = sessions.redeem(login())
    assert sessions.get(session.id) is session
    assert len(session.id) >= 40 and len(session.csrf) >= 40 and session.id != session.csrf
    with pytest.raises(LoginRefused, match="already used"):
        sessions.redeem(login())


def test_other_tokens_do_not_sign_in() -> None:
    sessions = SessionStore(clock=Clock())
    with pytest.raises(LoginRefused, match="not a console login link"):
        sessions.redeem(login(client_id="hms-ach-cli"))
    with pytest.raises(LoginRefused, match="no token id"):
        sessions.redeem(login(jti=""))


def test_used_ids_are_forgotten_once_their_token_expired() -> None:
    clock = Clock()
    sessions = SessionStore(clock=clock)
    sessions.redeem(login(expires_at=int(clock.now) + 300))
    clock.now += 301  # the token itself is expired now: the verifier refuses it before the store sees it
    sessions.redeem(login(expires_at=int(clock.now) + 300))  # its id may be forgotten


def test_a_session_ends_at_its_expiry_and_at_sign_out() -> None:
    clock = Clock()
    sessions = SessionStore(ttl_seconds=60, clock=clock)
    first = sessions.redeem(login("a"))
    second = sessions.redeem(login("b"))
    clock.now += 59
    assert sessions.get(first.id) is first
    sessions.end(second.id)
    assert sessions.get(second.id) is None
    clock.now += 2
    assert sessions.get(first.id) is None
    assert sessions.get("") is None and sessions.get(None) is None and sessions.get("forged") is None


def test_the_oldest_session_goes_past_the_cap() -> None:
    sessions = SessionStore(clock=Clock(), max_sessions=2)
    a, b, c = (sessions.redeem(login(j)) for j in "abc")
    assert sessions.get(a.id) is None and sessions.get(b.id) is b and sessions.get(c.id) is c


def test_csrf_tokens_are_per_session_and_compared_exactly() -> None:
    sessions = SessionStore(clock=Clock())
    one, two = sessions.redeem(login("a")), sessions.redeem(login("b"))
    assert one.csrf_ok(one.csrf)
    assert not one.csrf_ok(two.csrf)
    assert not one.csrf_ok(one.csrf[:-1])
    assert not one.csrf_ok("") and not one.csrf_ok(None)


def test_the_cookie_is_httponly_strict_and_secure_over_tls() -> None:
    plain, tls = cookie_attributes(False), cookie_attributes(True)
    assert plain["httponly"] and plain["samesite"] == "strict" and plain["path"] == "/console"
    assert not plain["secure"] and tls["secure"]


def test_roles() -> None:
    assert allowed({"operator"}, "channels.control") and not allowed({"analyst"}, "channels.control")
    assert allowed({"analyst"}, "workbench.use") and not allowed({"analyst"}, "messages.replay_apply")
    assert allowed({"auditor"}, "audit.read") and not allowed({"auditor"}, "messages.read")
    assert not allowed({"hr_admin"}, "dashboard.read")
    assert all(set(holders) <= set(CONSOLE_ROLES) for holders in PERMISSIONS.values())
    with pytest.raises(KeyError):
        allowed({"operator"}, "nope")
