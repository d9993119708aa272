"""The local issuer's key file (created once, 0600 in a 0700 directory, refused when others may read
it), its JWKS (kid = RFC 7638 thumbprint) and the tokens it signs."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from hms_ach.auth import AuthSettings
from hms_ach.auth.local_issuer import (
    KEY_FILE_NAME,
    KeyFileError,
    TokenRequest,
    issue_token,
    load_or_create_key,
    parse_ttl,
    public_jwks,
    split_values,
)
from tests.unit.auth import jwt_forge
from tests.unit.auth.conftest import LocalIssuer

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_first_start_creates_the_key_0600_in_a_0700_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    key = load_or_create_key(data_dir)
    assert key.path == data_dir / KEY_FILE_NAME
    assert _mode(data_dir) == 0o700 and _mode(key.path) == 0o600
    assert key.path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]  # no temporary file left behind
    again = load_or_create_key(data_dir)
    assert again.kid == key.kid and again.path.read_bytes() == key.path.read_bytes()


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    kids: list[str] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait(timeout=10)
        kids.append(load_or_create_key(tmp_path / "data").kid)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(kids) == 4 and len(set(kids)) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [KEY_FILE_NAME]


@posix_only
def test_a_key_others_may_read_is_refused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "data")
    key.path.chmod(0o644)
    with pytest.raises(KeyFileError) as caught:
        load_or_create_key(tmp_path / "data")
    assert "may be read by others (mode 644)" in str(caught.value) and "chmod 600" in str(caught.value)


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "data" / KEY_FILE_NAME
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an EC private key"):
        load_or_create_key(tmp_path / "data")
    assert b"not a key" in path.read_bytes()


@posix_only
def test_an_unwritable_data_directory_says_which(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(KeyFileError, match="cannot create or read the token signing key"):
        load_or_create_key(locked / "data")


def test_jwks_publishes_the_public_key_with_its_rfc7638_thumbprint(local: LocalIssuer) -> None:
    jwks = public_jwks(local.signing_key)
    assert len(jwks["keys"]) == 1
    published = jwks["keys"][0]
    expected = jwt_forge.public_jwk(local.private_key)  # computed from the PEM with cryptography
    assert {k: published[k] for k in ("kty", "crv", "x", "y")} == expected
    assert published["kid"] == jwt_forge.thumbprint(expected) == local.kid
    assert (published["alg"], published["use"]) == ("ES256", "sig")
    assert "d" not in published


def _payload(token: str) -> dict[str, object]:
    body = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return decoded


async def test_issued_tokens_verify_and_carry_the_request(local: LocalIssuer) -> None:
    request = TokenRequest(
        scope="patient/*.read  user/Practitioner.rs",
        sub="nurse-7",
        patient="pat-42",
        roles=("employee",),
        employee_id="E-7",
        departments=("ICU",),
        ttl_seconds=900,
    )
    token = issue_token(local.settings, local.signing_key, request, now=None)
    caller = await local.authenticator.authenticate(f"Bearer {token}", None)
    assert (caller.sub, caller.patient, caller.employee_id) == ("nurse-7", "pat-42", "E-7")
    assert caller.roles == {"employee"} and caller.departments == {"ICU"}
    assert [s.text for s in caller.scopes.resource] == ["patient/*.read", "user/Practitioner.rs"]
    claims = _payload(token)
    iat = claims["iat"]
    assert isinstance(iat, int) and claims["nbf"] == iat and claims["exp"] == iat + 900
    assert (claims["iss"], claims["aud"], claims["client_id"]) == (
        "urn:hms-ach:local",
        "urn:hms-ach:api",
        "hms-ach-cli",
    )
    assert claims["scope"] == "patient/*.read user/Practitioner.rs"


async def test_roles_go_to_the_configured_claim_path(tmp_path: Path) -> None:
    from hms_ach.auth import create_authenticator

    settings = AuthSettings(roles_claim="realm_access.roles")
    authenticator = create_authenticator(settings, tmp_path / "data")
    assert authenticator.local_key is not None
    token = issue_token(settings, authenticator.local_key, TokenRequest(scope="", roles=("auditor",)))
    assert _payload(token)["realm_access"] == {"roles": ["auditor"]}
    caller = await authenticator.authenticate(f"Bearer {token}", None)
    assert caller.roles == {"auditor"} and caller.grant("audit.read").unrestricted


def test_ttl_limits(local: LocalIssuer) -> None:
    with pytest.raises(ValueError, match="1 to 604800 seconds"):
        issue_token(local.settings, local.signing_key, TokenRequest(scope="x", ttl_seconds=8 * 86400))
    assert [parse_ttl(t) for t in ("90", "90s", "15m", "1h", "7d")] == [90, 90, 900, 3600, 604800]
    for bad in ("", "0", "-5m", "1w", "1.5h", "h"):
        with pytest.raises(ValueError, match="expected a lifetime"):
            parse_ttl(bad)


def test_split_values() -> None:
    assert split_values(["a,b", " b ", "c", ""]) == ("a", "b", "c")
