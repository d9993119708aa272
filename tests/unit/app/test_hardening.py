"""The Host header parsing of the allow-list, the default list, and which paths hold PHI."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.app.config import HttpSettings, load_config
from hms_ach.app.hardening import HostAllowListMiddleware, holds_phi, host_name
from hms_ach.core.errors import ConfigErrors


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8080", "localhost"),
        ("hms-ach.hospital.example.", "hms-ach.hospital.example"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("::1", None),  # an IPv6 address needs its brackets in a Host header
        ("", None),
        ("a b", None),
        ("host:port", None),
        ("[::1]x", None),
        ("[not-an-address]", None),
        ("h\u00f6st.example", None),
        ("x" * 301, None),
    ],
)
def test_host_name(value: str, name: str | None) -> None:
    assert host_name(value) == name


def test_default_allowed_hosts() -> None:
    assert HttpSettings(host="0.0.0.0").effective_allowed_hosts() == ["localhost", "127.0.0.1", "::1"]
    assert HttpSettings(host="::").effective_allowed_hosts() == ["localhost", "127.0.0.1", "::1"]
    assert HttpSettings(host="10.0.0.5").effective_allowed_hosts()[-1] == "10.0.0.5"
    assert HttpSettings(allowed_hosts=["a.example"]).effective_allowed_hosts() == ["a.example"]


def test_allow_list_entries() -> None:
    async def app(*_: object) -> None:
        return None

    check = HostAllowListMiddleware(app, ["[::1]", "A.Example", "*.wards.example"])
    assert check.allows("[::1]:443") and check.allows("a.example:8080") and check.allows("x.wards.example")
    assert not check.allows("wards.example") and not check.allows(None) and not check.allows("b.example")
    assert HostAllowListMiddleware(app, ["*"]).allows("anything.example")


def test_phi_paths() -> None:
    for path in ("/fhir", "/fhir/Patient", "/fhir/Patient/1/_history", "/api/v1", "/api/v1/employees"):
        assert holds_phi(path), path
    for path in ("/fhir/metadata", "/fhir/.well-known/smart-configuration", "/health", "/docs", "/fhirx"):
        assert not holds_phi(path), path


def test_channels_yaml_errors_of_the_hardening_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "http:\n  allowed_hosts: [hms-ach.hospital.example]\n  cors_origins: [https://app.example]\n"
        "  rate_limit: {requests_per_second: 5, burst: 10}\n"
    )
    http = load_config(config).http
    assert http.effective_allowed_hosts() == ["hms-ach.hospital.example"]
    assert (http.rate_limit.requests_per_second, http.rate_limit.burst, http.rate_limit.enabled) == (
        5,
        10,
        True,
    )
    for text, expected in [
        ("http:\n  cors_origins: [https://app.example/]\n", ["c.yaml:2:", "not an origin"]),
        ("http:\n  rate_limit: {requests_per_second: 0}\n", ["c.yaml:2:", "requests_per_second"]),
        ("http:\n  rate_limit: {brust: 3}\n", ["did you mean 'burst'"]),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigErrors) as info:
            load_config(config)
        for part in expected:
            assert part in str(info.value), (text, str(info.value))
