"""The oidc key source against a real HTTP server on loopback playing the provider: discovery, JWKS
cache, the rate-limited refresh on an unknown kid, and the bounds on every request (deadline, size,
no redirects, the issuer check)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from hms_ach.auth import AuthError, AuthSettings, challenge
from hms_ach.auth.keys import DocumentError, KeysUnavailableError, OidcKeySource, fetch_json, key_map
from hms_ach.auth.verifier import TokenVerifier
from tests.unit.auth import jwt_forge

AUDIENCE = "urn:hms-ach:test"

TokenVerifierType = Callable[..., tuple[TokenVerifier, OidcKeySource]]


@dataclass
class Provider:
    """What the fake provider serves; tests change it while it runs."""

    base: str = ""
    keys: list[tuple[str, ec.EllipticCurvePrivateKey]] = field(default_factory=list)
    issuer_override: str | None = None
    jwks_status: int = 200
    jwks_delay_seconds: float = 0.0
    jwks_padding_bytes: int = 0
    redirect_jwks: bool = False
    jwks_raw: bytes | None = None
    hits: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0})
    #: set at teardown, so that a delayed answer does not hold the server's shutdown
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def add_key(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        key = jwt_forge.new_private_key()
        kid = f"k{len(self.keys) + 1}"
        self.keys.insert(0, (kid, key))
        return kid, key

    def token(self, kid: str, key: ec.EllipticCurvePrivateKey, **overrides: Any) -> str:
        claims = jwt_forge.claims(self.base, AUDIENCE, **overrides)
        return jwt_forge.forge({"alg": "ES256", "kid": kid, "typ": "at+jwt"}, claims, jwt_forge.es256(key))

    def settings(self, **overrides: Any) -> AuthSettings:
        values: dict[str, Any] = {
            "mode": "oidc",
            "issuer": self.base,
            "audience": AUDIENCE,
            "jwks_refresh_min_interval_seconds": 0,
            "http_timeout_seconds": 2,
            **overrides,
        }
        return AuthSettings(**values)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    state = Provider()

    async def discovery(request: web.Request) -> web.Response:
        state.hits["discovery"] += 1
        return web.json_response(
            {"issuer": state.issuer_override or state.base, "jwks_uri": f"{state.base}/jwks"}
        )

    async def jwks(request: web.Request) -> web.StreamResponse:
        state.hits["jwks"] += 1
        if state.redirect_jwks:
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        if state.jwks_delay_seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.release.wait(), state.jwks_delay_seconds)
        body: dict[str, Any] = {"keys": [{**jwt_forge.public_jwk(k), "kid": kid} for kid, k in state.keys]}
        if state.jwks_raw is not None:
            return web.Response(body=state.jwks_raw, content_type="application/json")
        if state.jwks_padding_bytes:
            # streamed without a Content-Length: the reader must stop by itself
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"keys": [], "pad": "')
            for _ in range(state.jwks_padding_bytes // 4096):
                await response.write(b"x" * 4096)
            await response.write(b'"}')
            return response
        return web.json_response(body, status=state.jwks_status)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    state.add_key()
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


@pytest.fixture
async def source_of(provider: Provider) -> AsyncIterator[TokenVerifierType]:
    sources: list[OidcKeySource] = []

    def make(**overrides: Any) -> tuple[TokenVerifier, OidcKeySource]:
        settings = provider.settings(**overrides)
        source = OidcKeySource(settings)
        sources.append(source)
        return TokenVerifier(settings, source), source

    yield make
    for s in sources:
        await s.aclose()


async def test_keys_are_fetched_once_and_cached(provider: Provider, source_of: TokenVerifierType) -> None:
    verifier, source = source_of()
    kid, key = provider.keys[0]
    for _ in range(5):
        claims = await verifier.verify(provider.token(kid, key))
        assert claims["iss"] == provider.base
    assert provider.hits == {"discovery": 1, "jwks": 1} and source.fetch_count == 1
    assert source.discovery is not None and source.discovery["jwks_uri"] == f"{provider.base}/jwks"


async def test_a_new_kid_refreshes_once_and_a_rotation_needs_no_restart(
    provider: Provider, source_of: TokenVerifierType
) -> None:
    verifier, source = source_of()
    old_kid, old_key = provider.keys[0]
    await verifier.verify(provider.token(old_kid, old_key))
    new_kid, new_key = provider.add_key()
    # many requests at once with the new kid share one fetch
    results = await asyncio.gather(*(verifier.verify(provider.token(new_kid, new_key)) for _ in range(8)))
    assert len(results) == 8 and provider.hits["jwks"] == 2
    await verifier.verify(provider.token(old_kid, old_key))  # the old key still works
    assert provider.hits["jwks"] == 2


async def test_unknown_kids_refresh_at_most_once_per_interval(
    provider: Provider, source_of: TokenVerifierType
) -> None:
    verifier, source = source_of(jwks_refresh_min_interval_seconds=60)
    kid, key = provider.keys[0]
    await verifier.verify(provider.token(kid, key))
    stranger = jwt_forge.new_private_key()
    for n in range(20):
        with pytest.raises(AuthError, match="unknown signing key"):
            await verifier.verify(provider.token(f"made-up-{n}", stranger))
    assert provider.hits["jwks"] == 1  # the first fetch counted the interval from its attempt


async def test_a_provider_naming_another_issuer_is_not_trusted(
    provider: Provider, source_of: TokenVerifierType, caplog: pytest.LogCaptureFixture
) -> None:
    provider.issuer_override = "https://evil.example"
    verifier, _ = source_of()
    kid, key = provider.keys[0]
    with pytest.raises(KeysUnavailableError) as caught:
        await verifier.verify(provider.token(kid, key))
    status, headers = challenge(caught.value)
    assert status == 503 and "WWW-Authenticate" in headers and headers["Retry-After"] == "5"
    assert provider.hits["jwks"] == 0
    assert any(
        getattr(r, "reason", "") == "the discovery document names another issuer" for r in caplog.records
    )


async def test_a_slow_jwks_is_abandoned_at_the_deadline(
    provider: Provider, source_of: TokenVerifierType
) -> None:
    provider.jwks_delay_seconds = 10
    verifier, _ = source_of(http_timeout_seconds=0.5)
    kid, key = provider.keys[0]
    started = time.monotonic()
    with pytest.raises(KeysUnavailableError):
        await verifier.verify(provider.token(kid, key))
    assert time.monotonic() - started < 5


async def test_an_oversized_jwks_is_not_read_to_the_end(
    provider: Provider, source_of: TokenVerifierType, caplog: pytest.LogCaptureFixture
) -> None:
    provider.jwks_padding_bytes = 2 * 1024 * 1024
    verifier, _ = source_of(max_document_bytes=65536)
    kid, key = provider.keys[0]
    with pytest.raises(KeysUnavailableError):
        await verifier.verify(provider.token(kid, key))
    assert any(getattr(r, "reason", "") == "larger than 65536 bytes" for r in caplog.records)


async def test_redirects_are_not_followed(provider: Provider, source_of: TokenVerifierType) -> None:
    provider.redirect_jwks = True
    verifier, _ = source_of()
    kid, key = provider.keys[0]
    with pytest.raises(KeysUnavailableError):
        await verifier.verify(provider.token(kid, key))


async def test_known_keys_are_kept_when_a_refresh_fails(
    provider: Provider, source_of: TokenVerifierType
) -> None:
    verifier, source = source_of(jwks_cache_seconds=0.05)
    kid, key = provider.keys[0]
    await verifier.verify(provider.token(kid, key))
    provider.jwks_status = 500
    await asyncio.sleep(0.1)  # the cache is stale now; the refresh fails; the old key still serves
    await verifier.verify(provider.token(kid, key))
    assert provider.hits["jwks"] == 2 and source.fetch_count == 1


async def test_only_https_or_loopback_http_is_fetched() -> None:
    async with httpx.AsyncClient() as client:
        for url in (
            "http://idp.example/jwks",
            "ftp://127.0.0.1/jwks",
            "file:///etc/passwd",
            "https:///x",
            "https://[bad/jwks",
            "http://127.0.0.1.evil.example/jwks",
        ):
            with pytest.raises(DocumentError, match="only https URLs"):
                await fetch_json(client, url, 1024, 1.0)


def test_key_map_skips_keys_that_are_not_public_signing_keys() -> None:
    public = {**jwt_forge.public_jwk(jwt_forge.new_private_key()), "kid": "good"}
    keys = key_map(
        {
            "keys": [
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                {**public, "kid": "enc", "use": "enc"},
                {**public, "kid": "private", "d": "AAAA"},
                {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "!!", "y": "??"},
                "not a key",
                public,
            ]
        }
    )
    assert list(keys) == ["good"]
    with pytest.raises(DocumentError, match="no usable public signing key"):
        key_map({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    with pytest.raises(DocumentError, match="no keys list"):
        key_map({"keys": "none"})


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[" * 100_000,  # nested past Python's recursion limit
        b'{"keys": [{"kty": "EC", "crv": "P-256"}, {"kty": "RSA", "n": 5, "e": null}, 7, null]}',
        b'{"keys": {"kty": "EC"}}',
        b"[]",
    ],
)
async def test_garbage_from_the_provider_is_a_503_not_a_crash(
    provider: Provider, source_of: TokenVerifierType, body: bytes
) -> None:
    provider.jwks_raw = body
    verifier, _ = source_of()
    kid, key = provider.keys[0]
    with pytest.raises(KeysUnavailableError):
        await verifier.verify(provider.token(kid, key))
