"""The JWT attack set of issue 14, against the local issuer: each forged token is refused with 401
``invalid_token`` and a description that says what is wrong without quoting the token."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from joserfc.jwk import Key

from hms_ach.auth import AuthError, AuthSettings, Caller, challenge, create_authenticator
from hms_ach.auth.keys import StaticKeySource
from hms_ach.auth.local_issuer import load_or_create_key
from hms_ach.auth.verifier import TokenVerifier
from tests.unit.auth import jwt_forge
from tests.unit.auth.conftest import LocalIssuer


async def refused(local: LocalIssuer, token: str, why: str) -> AuthError:
    """Authenticate ``token``; it must be refused with 401 invalid_token whose description holds ``why``."""
    with pytest.raises(AuthError) as caught:
        await local.authenticator.authenticate(f"Bearer {token}", "127.0.0.1")
    error = caught.value
    status, headers = challenge(error)
    assert (error.code, status) == ("invalid_token", 401), error
    assert why in error.description, error.description
    assert headers["WWW-Authenticate"].startswith('Bearer realm="hms-ach", error="invalid_token"')
    assert token not in headers["WWW-Authenticate"] and token[:20] not in error.description
    return error


async def test_a_valid_token_gives_the_caller(local: LocalIssuer) -> None:
    caller = await local.authenticator.authenticate(f"Bearer {local.token()}", "10.0.0.7")
    assert isinstance(caller, Caller)
    assert (caller.sub, caller.client_id, caller.patient, caller.issuer) == (
        "tester",
        "forge",
        "p-1",
        "urn:hms-ach:local",
    )
    assert caller.source_address == "10.0.0.7" and caller.authenticated
    assert caller.subject == "tester"  # the name the HTTP access log reads
    assert caller.policy.allows("Observation", "search") and not caller.policy.allows("Observation", "create")
    assert caller.scopes.other == ("launch/patient", "openid")


async def test_alg_none_is_refused(local: LocalIssuer) -> None:
    token = jwt_forge.forge({"alg": "none", "typ": "JWT"}, local.claims(), None)
    await refused(local, token, "signature algorithm not accepted")
    # "None" and "NONE" are no way round it
    for alg in ("None", "NONE", "nOnE"):
        await refused(local, jwt_forge.forge({"alg": alg}, local.claims(), None), "algorithm not accepted")


async def test_hs256_signed_with_the_public_key_is_refused(local: LocalIssuer) -> None:
    """Algorithm confusion: the published public key (as PEM, and as the JWKS JSON) used as an HMAC secret."""
    public_pem = local.signing_key.key.as_pem(private=False)
    jwks_json = json.dumps(local.authenticator.jwks()).encode()
    for secret in (public_pem, jwks_json):
        token = jwt_forge.forge({"alg": "HS256", "kid": local.kid}, local.claims(), jwt_forge.hs256(secret))
        await refused(local, token, "signature algorithm not accepted (accepted: ES256)")


async def test_expired_token_is_refused_past_the_leeway_only(local: LocalIssuer) -> None:
    leeway = local.settings.leeway_seconds
    await refused(local, local.token(exp=local.claims()["iat"] - leeway - 60), "expired")
    within = local.token(exp=local.claims()["iat"] - leeway // 2)
    assert (await local.authenticator.authenticate(f"Bearer {within}", None)).sub == "tester"


async def test_nbf_in_the_future_is_refused(local: LocalIssuer) -> None:
    await refused(local, local.token(nbf=local.claims()["iat"] + 3600), "not valid yet")
    await refused(local, local.token(iat=local.claims()["iat"] + 3600), "issued in the future")


async def test_wrong_issuer_and_wrong_audience_are_refused(local: LocalIssuer) -> None:
    await refused(local, local.token(iss="https://evil.example"), "another issuer")
    await refused(local, local.token(aud="urn:someone-else"), "another audience")
    await refused(local, local.token(aud=["urn:someone-else", "urn:third"]), "another audience")
    # an audience list that holds ours is fine
    both = local.token(aud=["urn:someone-else", local.settings.effective_audience])
    assert (await local.authenticator.authenticate(f"Bearer {both}", None)).sub == "tester"


async def test_missing_required_claims_are_refused(local: LocalIssuer) -> None:
    await refused(local, local.token(exp=None), "lacks required claims: exp")
    await refused(local, local.token(iss=None, aud=None), "lacks required claims: aud, iss")
    await refused(local, local.token(sub=None), "lacks required claims: sub")
    await refused(local, local.token(exp="tomorrow"), "malformed expiry")


async def test_unknown_kid_is_refused(local: LocalIssuer) -> None:
    other = jwt_forge.new_private_key()
    token = jwt_forge.forge({"alg": "ES256", "kid": "rotated-away"}, local.claims(), jwt_forge.es256(other))
    await refused(local, token, "unknown signing key")


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "/dev/null",
        "' OR '1'='1' --",
        "x'; DROP TABLE record; --",
        "file:///etc/shadow",
        "\u0000",
    ],
)
async def test_path_or_sql_in_kid_is_only_an_unknown_key(local: LocalIssuer, kid: str) -> None:
    """Signed with the real key: the kid is looked up, never used as a path or in a query."""
    await refused(local, local.token(header={"kid": kid}), "unknown signing key")


async def test_overlong_or_odd_kid_is_refused(local: LocalIssuer) -> None:
    await refused(local, local.token(header={"kid": "k" * 300}), "key id (kid) is malformed")
    await refused(local, local.token(header={"kid": 42}), "key id (kid) is malformed")


@pytest.fixture
async def attacker_site() -> AsyncIterator[tuple[str, list[str]]]:
    """A real HTTP server on loopback that serves the attacker's JWKS and records every request."""
    hits: list[str] = []
    attacker = jwt_forge.new_private_key()

    async def jwks(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [jwt_forge.public_jwk(attacker)]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def test_jku_x5u_and_jwk_headers_are_never_fetched_nor_trusted(
    local: LocalIssuer, attacker_site: tuple[str, list[str]]
) -> None:
    base, hits = attacker_site
    attacker = jwt_forge.new_private_key()
    attacker_jwk = jwt_forge.public_jwk(attacker)
    sign = jwt_forge.es256(attacker)
    headers: list[dict[str, Any]] = [
        {"jku": f"{base}/jwks.json"},
        {"x5u": f"{base}/cert.pem"},
        {"jwk": attacker_jwk},
        {"jku": f"{base}/jwks.json", "jwk": attacker_jwk, "x5u": f"{base}/cert.pem"},
    ]
    for extra in headers:
        # with the attacker's own kid: no such key here
        own = jwt_forge.forge(
            {"alg": "ES256", "kid": jwt_forge.thumbprint(attacker_jwk), **extra}, local.claims(), sign
        )
        await refused(local, own, "unknown signing key")
        # with the engine's kid: the engine's key checks the signature, which fails
        borrowed = jwt_forge.forge({"alg": "ES256", "kid": local.kid, **extra}, local.claims(), sign)
        await refused(local, borrowed, "signature does not verify")
    assert hits == []


async def test_stripped_signature_is_refused(local: LocalIssuer) -> None:
    head, payload, _ = local.token().split(".")
    await refused(local, f"{head}.{payload}.", "signature does not verify")
    await refused(local, f"{head}.{payload}", "not a signed JWT")


async def test_tampered_payload_is_refused(local: LocalIssuer) -> None:
    head, _, signature = local.token().split(".")
    wider = jwt_forge.b64json(local.claims(scope="system/*.cruds", patient=None))
    await refused(local, f"{head}.{wider}.{signature}", "signature does not verify")


async def test_key_from_another_issuer_is_refused(local: LocalIssuer, tmp_path: Path) -> None:
    """Another engine's local key (same issuer name, same audience): its kid is unknown here, and
    with our kid its signature fails."""
    other_key = load_or_create_key(tmp_path / "other-engine")
    other = jwt_forge.load_private_key(other_key.path)
    assert other_key.kid != local.kid
    theirs = jwt_forge.forge({"alg": "ES256", "kid": other_key.kid}, local.claims(), jwt_forge.es256(other))
    await refused(local, theirs, "unknown signing key")
    ours = jwt_forge.forge({"alg": "ES256", "kid": local.kid}, local.claims(), jwt_forge.es256(other))
    await refused(local, ours, "signature does not verify")


async def test_token_over_the_size_cap_is_refused_unread(local: LocalIssuer) -> None:
    cap = local.settings.max_token_bytes
    token = local.token(padding="x" * cap)
    await refused(local, token, f"longer than {cap} bytes")


async def test_other_shapes_are_refused(local: LocalIssuer) -> None:
    jwe_like = ".".join(["eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ", "a", "b", "c", "d"])
    await refused(local, jwe_like, "not a signed JWT")
    await refused(local, "not-a-jwt", "not a signed JWT")
    await refused(local, "e30.e30.", "cannot be read")  # {} header: no alg
    crit = local.token(header={"crit": ["exp"], "exp": 1})
    await refused(local, crit, "critical header")


async def test_a_token_in_another_algorithm_family_is_refused(local: LocalIssuer) -> None:
    token = local.token(header={"alg": "ES384"})
    await refused(local, token, "signature algorithm not accepted")


@pytest.mark.parametrize(
    ("header", "code", "status"),
    [
        (None, None, 401),
        ("", None, 401),
        ("Basic dXNlcjpwYXNz", None, 401),
        ("Bearer", "invalid_request", 400),
        ("Bearer    ", "invalid_request", 400),
        ("Bearer a b", "invalid_request", 400),
        ('Bearer "quoted"', "invalid_request", 400),
    ],
)
async def test_missing_or_malformed_authorization_headers(
    local: LocalIssuer, header: str | None, code: str | None, status: int
) -> None:
    with pytest.raises(AuthError) as caught:
        await local.authenticator.authenticate(header, None)
    got_status, headers = challenge(caught.value)
    assert (caught.value.code, got_status) == (code, status)
    if code is None:
        # RFC 6750 section 3.1: a request without credentials gets a challenge without an error code
        assert headers == {"WWW-Authenticate": 'Bearer realm="hms-ach"'}


async def test_scheme_is_case_insensitive(local: LocalIssuer) -> None:
    assert (await local.authenticator.authenticate(f"bearer {local.token()}", None)).sub == "tester"


async def test_refusals_log_no_token(local: LocalIssuer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = local.token(aud="urn:other")
    await refused(local, token, "another audience")
    assert all(token.split(".")[1] not in r.getMessage() for r in caplog.records)


async def test_off_mode_lets_every_request_in_as_unauthenticated(tmp_path: Path) -> None:
    authenticator = create_authenticator(AuthSettings(mode="off"), tmp_path / "data")
    caller = await authenticator.authenticate(None, "127.0.0.1")
    assert not caller.authenticated and caller.source_address == "127.0.0.1"
    assert caller.policy.allows("Patient", "delete") and caller.grant("audit.read").unrestricted
    assert not (tmp_path / "data").exists()  # off mode creates no key


class CountingKeys:
    """The local issuer's key source, counting lookups (each one is a full verification)."""

    def __init__(self, jwks: dict[str, Any]):
        self.inner = StaticKeySource(jwks)
        self.lookups = 0

    async def key_for(self, kid: str | None, alg: str) -> Key:
        self.lookups += 1
        return await self.inner.key_for(kid, alg)


def cached_verifier(
    local: LocalIssuer, now: list[float], **settings: Any
) -> tuple[TokenVerifier, CountingKeys]:
    jwks = local.authenticator.jwks()
    assert jwks is not None
    keys = CountingKeys(jwks)
    verifier = TokenVerifier(AuthSettings(**settings), keys, clock=lambda: now[0])
    return verifier, keys


async def test_a_verified_token_is_remembered_until_it_expires(local: LocalIssuer) -> None:
    now = [time.time()]
    verifier, keys = cached_verifier(local, now, leeway_seconds=5)
    token = local.token(exp=int(now[0]) + 60)
    for _ in range(3):
        assert (await verifier.verify(token))["sub"] == "tester"
    assert keys.lookups == 1
    now[0] += 60 + 5 + 1  # past exp and the leeway: refused although remembered
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(token)
    # a changed token is verified from scratch, and refused
    head, _, signature = token.split(".")
    other = jwt_forge.b64json(local.claims(exp=int(now[0]) + 60, scope="system/*.cruds"))
    with pytest.raises(AuthError, match="signature does not verify"):
        await verifier.verify(f"{head}.{other}.{signature}")


async def test_the_memory_is_bounded_in_entries_and_time(local: LocalIssuer) -> None:
    now = [time.time()]
    verifier, keys = cached_verifier(local, now, verified_token_cache_entries=2, jwks_cache_seconds=30)
    tokens = [local.token(jti=f"t{i}", exp=int(now[0]) + 3600) for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    await verifier.verify(tokens[2])
    await verifier.verify(tokens[1])
    assert keys.lookups == 3
    await verifier.verify(tokens[0])  # the least recently used was dropped
    assert keys.lookups == 4
    now[0] += 31  # past jwks_cache_seconds: verified again (a key the issuer withdrew stops working)
    await verifier.verify(tokens[0])
    assert keys.lookups == 5
    off, off_keys = cached_verifier(local, now, verified_token_cache_entries=0)
    token = local.token(exp=int(now[0]) + 60)
    await off.verify(token)
    await off.verify(token)
    assert off_keys.lookups == 2


@pytest.mark.parametrize(
    "raw",
    [
        "e30.e30.e30",  # {} {} {}
        "W10.W10.",  # [] []
        "bnVsbA.bnVsbA.",  # null null
        jwt_forge.b64url(b'{"alg": 7}') + ".e30.",
        jwt_forge.b64url(b'{"alg": "ES256", "kid": ["a"]}') + ".e30.",
        jwt_forge.b64url(b"\xff\xfe") + ".e30.",
        "a" * 40 + "." + "b" * 40 + "." + "c" * 86,
        "..",
        "." * 3000,
    ],
)
async def test_garbage_tokens_are_refused_never_crash(local: LocalIssuer, raw: str) -> None:
    with pytest.raises(AuthError) as caught:
        await local.authenticator.authenticate(f"Bearer {raw}", None)
    assert caught.value.code in ("invalid_token", "invalid_request")


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": 42},
        {"iss": ["urn:hms-ach:local"]},
        {"exp": True},
        {"exp": -1},
        {"nbf": "soon"},
        {"sub": {"id": 1}},
        {"sub": ""},
    ],
)
async def test_signed_but_malformed_claims_are_refused(local: LocalIssuer, overrides: dict[str, Any]) -> None:
    with pytest.raises(AuthError) as caught:
        await local.authenticator.authenticate(f"Bearer {local.token(**overrides)}", None)
    assert caught.value.code == "invalid_token"


async def test_odd_optional_claims_are_ignored_not_trusted(local: LocalIssuer) -> None:
    token = local.token(scope=7, roles={"admin": True}, patient=12, employee_id=["E1"], department=[1, "ICU"])
    caller = await local.authenticator.authenticate(f"Bearer {token}", None)
    assert caller.scopes.resource == () and caller.roles == frozenset()
    assert caller.patient is None and caller.employee_id is None and caller.departments == {"ICU"}
    assert not caller.policy.allows("Patient", "read")
