"""The verifier in ``oidc`` mode against a real OpenID provider: the ``oidc-provider`` package from the
npm registry, run by Node on loopback (tests/peers/oidc/server.mjs).

The provider issues client-credentials access tokens (JWTs, RFC 9068); the engine finds its keys through
the discovery document, accepts the tokens, and picks up a signing-key rotation without a restart.
The first run installs the provider with ``npm ci`` into tests/peers/oidc/node_modules (bounded in time);
the test is skipped only when npm cannot reach the registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hms_ach.auth import (
    AuthError,
    AuthSettings,
    capability_security,
    create_authenticator,
    smart_configuration,
)
from hms_ach.auth.authenticate import Authenticator
from hms_ach.auth.keys import OidcKeySource
from tests.integration.npm_peers import NPM_CI_SECONDS, install_npm_peer

PEER = Path(__file__).resolve().parents[1] / "peers" / "oidc"
AUDIENCE = "urn:hms-ach:oidc-test"
CLIENT = ("engine-test", "engine-test-secret")
START_SECONDS = 30

pytestmark = pytest.mark.timeout(NPM_CI_SECONDS + 120)


def _install_provider() -> None:
    """``npm ci`` into tests/peers/oidc when node_modules is missing; skip when the registry is out of reach."""
    install_npm_peer(PEER, "oidc-provider", "the OpenID provider of this test")


@dataclass
class OpenIdProvider:
    issuer: str
    kid: str
    client: httpx.AsyncClient

    async def client_credentials_token(self, scope: str) -> str:
        response = await self.client.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials", "scope": scope},
            auth=CLIENT,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    async def rotate(self) -> str:
        response = await self.client.post(f"{self.issuer}/test/rotate")
        assert response.status_code == 200, response.text
        kid: str = response.json()["kid"]
        return kid


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    await asyncio.to_thread(_install_provider)
    node = shutil.which("node")
    assert node is not None
    stderr_path = tmp_path / "oidc-provider.stderr"
    with stderr_path.open("wb") as stderr:  # a file, so that its warnings can never fill a pipe
        process = await asyncio.create_subprocess_exec(
            node,
            "server.mjs",
            cwd=PEER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "OIDC_TEST_AUDIENCE": AUDIENCE, "NODE_ENV": "test"},
        )
    try:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_SECONDS)
        except TimeoutError:
            pytest.fail(f"the OpenID provider did not start within {START_SECONDS} s")
        if not line:
            await asyncio.wait_for(process.wait(), 10)
            pytest.fail(f"the OpenID provider exited: {stderr_path.read_text(errors='replace')[-2000:]}")
        ready = json.loads(line)
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            yield OpenIdProvider(ready["issuer"], ready["kid"], client)
    finally:
        if process.stdin is not None:
            process.stdin.close()  # the provider exits when its stdin closes
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
async def engine_auth(provider: OpenIdProvider, tmp_path: Path) -> AsyncIterator[Authenticator]:
    settings = AuthSettings(
        mode="oidc",
        issuer=provider.issuer,
        audience=AUDIENCE,
        jwks_refresh_min_interval_seconds=0.5,
    )
    authenticator = create_authenticator(settings, tmp_path / "data")
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.aclose()


def _fetches(authenticator: Authenticator) -> int:
    keys = authenticator.key_source
    assert isinstance(keys, OidcKeySource)
    return keys.fetch_count


async def test_client_credentials_tokens_are_accepted(
    provider: OpenIdProvider, engine_auth: Authenticator
) -> None:
    token = await provider.client_credentials_token("system/*.rs patient/*.read")
    caller = await engine_auth.authenticate(f"Bearer {token}", "127.0.0.1")
    assert (caller.sub, caller.client_id, caller.issuer) == ("engine-test", "engine-test", provider.issuer)
    assert [s.text for s in caller.scopes.resource] == ["system/*.rs", "patient/*.read"]
    assert caller.roles == {"integration"}  # the provider's extra claim, at auth.roles_claim
    assert caller.policy.allows("Patient", "search") and not caller.policy.allows("Patient", "create")
    assert caller.policy.patient_compartment("Patient", "read") is None  # system/ wins over patient/
    assert engine_auth.jwks() is None  # the provider publishes its own keys

    # the provider's endpoints are what the engine publishes
    discovery = engine_auth.discovery()
    assert discovery is not None
    smart = smart_configuration(engine_auth.settings, "https://engine.example", discovery)
    assert smart["token_endpoint"] == f"{provider.issuer}/token"
    security = capability_security(engine_auth.settings, discovery)
    assert security is not None
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["token"] == f"{provider.issuer}/token"


async def test_a_key_rotation_is_picked_up_without_a_restart(
    provider: OpenIdProvider, engine_auth: Authenticator
) -> None:
    before = await provider.client_credentials_token("system/*.rs")
    await engine_auth.authenticate(f"Bearer {before}", None)
    assert _fetches(engine_auth) == 1

    new_kid = await provider.rotate()
    assert new_kid != provider.kid
    after = await provider.client_credentials_token("system/*.rs")
    await asyncio.sleep(0.6)  # past jwks_refresh_min_interval_seconds
    caller = await engine_auth.authenticate(f"Bearer {after}", None)
    assert caller.sub == "engine-test"
    assert _fetches(engine_auth) == 2  # one refresh, for the new kid
    # tokens signed before the rotation still verify (the provider still publishes the old key)
    await engine_auth.authenticate(f"Bearer {before}", None)
    assert _fetches(engine_auth) == 2


async def test_a_token_for_another_audience_is_refused(provider: OpenIdProvider, tmp_path: Path) -> None:
    settings = AuthSettings(mode="oidc", issuer=provider.issuer, audience="urn:another-api")
    authenticator = create_authenticator(settings, tmp_path / "data")
    try:
        token = await provider.client_credentials_token("system/*.rs")
        with pytest.raises(AuthError) as caught:
            await authenticator.authenticate(f"Bearer {token}", None)
        assert caught.value.code == "invalid_token" and "another audience" in caught.value.description
    finally:
        await authenticator.aclose()
