"""The console's OIDC sign-in helpers: the PKCE challenge, the pending logins, the authorization URL."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from hms_ach.console.oidc import LOGIN_FLOW_SECONDS, LoginFlows, authorization_url, code_challenge
from hms_ach.console.session import LoginRefused


def test_the_challenge_is_s256_of_the_verifier() -> None:
    verifier = "a" * 64
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    assert code_challenge(verifier) == expected
    assert len(expected) == 43 and re.fullmatch(r"[A-Za-z0-9_-]+", expected)


def test_a_pending_login_is_taken_once_and_expires() -> None:
    now = [0.0]
    flows = LoginFlows(clock=lambda: now[0])
    first = flows.begin("https://engine/console/callback")
    assert 43 <= len(first.verifier) <= 128  # RFC 7636 section 4.1
    assert flows.take(first.state) is first
    with pytest.raises(LoginRefused, match="unknown, used"):
        flows.take(first.state)
    second = flows.begin("https://engine/console/callback")
    now[0] += LOGIN_FLOW_SECONDS + 1
    with pytest.raises(LoginRefused):
        flows.take(second.state)
    with pytest.raises(LoginRefused):
        flows.take("forged")


def test_the_authorization_url_asks_for_a_code_with_pkce() -> None:
    login = LoginFlows().begin("https://engine/console/callback")
    url = authorization_url("https://idp/auth?kc=1", "console", "openid", login, "urn:api")
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.netloc == "idp" and query["kc"] == "1"
    assert query["response_type"] == "code" and query["client_id"] == "console"
    assert query["redirect_uri"] == "https://engine/console/callback" and query["resource"] == "urn:api"
    assert query["state"] == login.state and query["nonce"] == login.nonce
    assert (
        query["code_challenge"] == code_challenge(login.verifier) and query["code_challenge_method"] == "S256"
    )
    assert login.verifier not in url
