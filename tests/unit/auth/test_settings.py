"""``auth:`` settings: defaults, the pinned algorithms, the environment overrides, and the refusal of
``mode: off`` on a listener other hosts can reach."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hms_ach.app.config import load_config
from hms_ach.auth import AuthSettings, check_off_mode, with_environment
from hms_ach.core.addresses import is_loopback_host
from hms_ach.core.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_are_the_local_issuer() -> None:
    s = AuthSettings()
    assert s.mode == "local"
    assert (s.effective_issuer, s.effective_audience) == ("urn:hms-ach:local", "urn:hms-ach:api")
    assert s.effective_algorithms == ["ES256"]  # local signs and accepts ES256 only
    assert 0 < s.leeway_seconds <= 60 and s.max_token_bytes == 8192


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "hs256", "RSA1_5", ""])
def test_symmetric_and_none_algorithms_cannot_be_configured(alg: str) -> None:
    with pytest.raises(ValidationError, match="only asymmetric algorithms"):
        AuthSettings(mode="oidc", issuer="https://idp.example", audience="api", algorithms=["RS256", alg])


def test_oidc_needs_an_issuer_url_and_an_audience() -> None:
    with pytest.raises(ValidationError, match="mode oidc needs issuer and audience"):
        AuthSettings(mode="oidc")
    for issuer in ("idp.example", "http://idp.example", "ftp://127.0.0.1", "https://"):
        with pytest.raises(ValidationError, match="needs an https issuer URL"):
            AuthSettings(mode="oidc", issuer=issuer, audience="api")
    assert AuthSettings(mode="oidc", issuer="http://127.0.0.1:4000", audience="api").issuer
    s = AuthSettings(mode="oidc", issuer="https://idp.example/realms/h", audience="hms-ach")
    assert s.effective_algorithms == ["RS256", "PS256", "ES256"]


def test_environment_overrides_win() -> None:
    env = {
        "HMS_ACH_AUTH_MODE": "oidc",
        "HMS_ACH_AUTH_ISSUER": "https://idp.example",
        "HMS_ACH_AUTH_AUDIENCE": "hms-ach",
    }
    s = with_environment(AuthSettings(leeway_seconds=10), env)
    assert (s.mode, s.issuer, s.audience, s.leeway_seconds) == ("oidc", "https://idp.example", "hms-ach", 10)
    same = AuthSettings()
    assert with_environment(same, {"HMS_ACH_AUTH_MODE": "  "}) is same  # empty counts as unset


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        with_environment(AuthSettings(), {"HMS_ACH_AUTH_MODE": "none"})
    assert "HMS_ACH_AUTH_MODE" in str(caught.value) and "local, oidc, off" in str(caught.value)
    with pytest.raises(ConfigError, match="mode oidc needs issuer and audience"):
        with_environment(AuthSettings(), {"HMS_ACH_AUTH_MODE": "oidc"})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_off_is_refused_unless_every_listener_is_on_loopback() -> None:
    off = AuthSettings(mode="off")
    check_off_mode(off, ["127.0.0.1", "::1", "localhost"])
    with pytest.raises(ConfigError) as caught:
        check_off_mode(off, ["127.0.0.1", "0.0.0.0", "10.1.2.3"])
    text = str(caught.value)
    assert "'0.0.0.0', '10.1.2.3'" in text and "127.0.0.1'" not in text
    assert "mode local or oidc" in text
    check_off_mode(AuthSettings(), ["0.0.0.0"])  # local and oidc bind anywhere


def test_channels_yaml_auth_section(tmp_path: Path) -> None:
    shipped = load_config(ROOT / "channels.yaml")
    assert shipped.auth.mode == "local" and shipped.auth.roles_claim == "roles"
    (tmp_path / "c.yaml").write_text(
        "auth:\n  mode: oidc\n  issuer: https://idp.example\n  leway_seconds: 5\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path / "c.yaml")
    text = str(caught.value)
    assert "c.yaml:4:3: unknown key 'leway_seconds'; did you mean 'leeway_seconds'?" in text
    (tmp_path / "d.yaml").write_text("auth:\n  mode: oidc\n  issuer: https://idp.example\n")
    with pytest.raises(
        ConfigErrors, match=r"d.yaml:1:1: auth: .*mode oidc needs audience \(or HMS_ACH_AUTH_AUDIENCE\)"
    ):
        load_config(tmp_path / "d.yaml")
