"""The HTTP layer's authentication (hms_ach/app/authentication.py), in process: which paths need a
token, how a refusal is answered on /fhir and /api/v1, that the caller reaches the route, and a few
JWT attacks at the HTTP level to show the middleware uses the verifier (the full set is in
tests/unit/auth/test_verifier.py). Also the start-up checks: ``mode: off`` refused unless every
listener is loopback (the engine and ``hms-ach check``), and the shipped channels.yaml in local mode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request, WebSocket
from starlette.types import ASGIApp, Message
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.config import load_config
from hms_ach.app.http import create_app
from hms_ach.app.runtime import Engine, auth_settings, listener_hosts
from hms_ach.auth import AuthSettings, Caller, create_authenticator
from hms_ach.auth.local_issuer import load_or_create_key
from hms_ach.core.errors import ConfigError
from hms_ach.store.db import Store
from tests.unit.auth import jwt_forge
from tests.unit.auth.conftest import LocalIssuer, local  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/store.db")
    yield store
    store.dispose()


@pytest.fixture
async def http(sqlite: Store, local: LocalIssuer) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    app = create_app(sqlite, authenticator=local.authenticator)

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, object]:
        caller: Caller = request.state.caller
        return {"sub": caller.sub, "authenticated": caller.authenticated, "peer": caller.source_address}

    transport = httpx.ASGITransport(app=app, client=("127.0.0.5", 4711))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_no_token_is_401_with_a_bare_challenge(http: httpx.AsyncClient) -> None:
    fhir = await http.get("/fhir/Patient")
    assert fhir.status_code == 401
    assert fhir.headers["www-authenticate"] == 'Bearer realm="hms-ach"'
    outcome = fhir.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"
    api = await http.get("/api/v1/shifts")
    assert api.status_code == 401 and api.headers["content-type"].startswith("application/problem+json")
    assert api.json()["status"] == 401 and api.json()["instance"] == "/api/v1/shifts"


async def test_public_paths_need_no_token(http: httpx.AsyncClient, local: LocalIssuer) -> None:  # noqa: F811
    for path in ("/health", "/health/live", "/docs", "/openapi.json"):
        assert (await http.get(path)).status_code == 200, path
    jwks = (await http.get("/.well-known/jwks.json")).json()
    assert jwks == local.authenticator.jwks() and jwks["keys"][0]["kid"] == local.kid
    assert "d" not in jwks["keys"][0]  # the public key only
    smart = (await http.get("/.well-known/smart-configuration")).json()
    assert smart["jwks_uri"] == "http://localhost/.well-known/jwks.json"
    assert "permission-v2" in smart["capabilities"]
    # SMART discovery at the FHIR base, and the CapabilityStatement, as a client reads them first
    assert (await http.get("/fhir/.well-known/smart-configuration")).json() == smart
    cs = await http.get("/fhir/metadata")
    assert cs.status_code == 200 and cs.json()["rest"][0]["security"]["service"][0]["coding"][0]["code"] == (
        "SMART-on-FHIR"
    )
    assert (await http.get("/fhir/Patient")).status_code == 401  # nothing else under /fhir


async def test_openapi_declares_the_bearer_scheme(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []  # public
    assert "security" not in doc["paths"]["/api/v1/shifts"]["get"]  # the document-wide requirement


async def test_a_valid_token_reaches_the_route_as_the_caller(
    http: httpx.AsyncClient,
    local: LocalIssuer,  # noqa: F811
) -> None:
    resp = await http.get("/whoami", headers=bearer(local.token(sub="alice")))
    assert resp.json() == {"sub": "alice", "authenticated": True, "peer": "127.0.0.5"}
    assert (await http.get("/fhir/metadata", headers=bearer(local.token()))).status_code == 200


async def test_capability_statement_declares_smart_security(
    http: httpx.AsyncClient,
    local: LocalIssuer,  # noqa: F811
) -> None:
    cs = (await http.get("/fhir/metadata", headers=bearer(local.token()))).json()
    security = cs["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def _attacks(local: LocalIssuer, tmp_path: Path) -> dict[str, tuple[str, str]]:  # noqa: F811
    other_key = load_or_create_key(tmp_path / "other-engine")
    other = jwt_forge.load_private_key(other_key.path)
    return {
        "alg none": (jwt_forge.forge({"alg": "none"}, local.claims(), None), "algorithm not accepted"),
        "expired": (local.token(exp=1_000_000, iat=999_000, nbf=999_000), "expired"),
        "wrong aud": (local.token(aud="urn:someone-else"), "audience"),
        "another key": (
            jwt_forge.forge({"alg": "ES256", "kid": local.kid}, local.claims(), jwt_forge.es256(other)),
            "signature",
        ),
    }


@pytest.mark.parametrize("attack", ["alg none", "expired", "wrong aud", "another key"])
async def test_jwt_attacks_are_401_invalid_token(
    http: httpx.AsyncClient,
    local: LocalIssuer,  # noqa: F811
    tmp_path: Path,
    attack: str,
) -> None:
    token, why = _attacks(local, tmp_path)[attack]
    for path, media in (
        ("/fhir/Patient", "application/fhir+json"),
        ("/api/v1/shifts", "application/problem+json"),
    ):
        resp = await http.get(path, headers=bearer(token))
        assert resp.status_code == 401, resp.text
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="hms-ach", error="invalid_token", error_description="')
        assert resp.headers["content-type"].startswith(media)
        assert why in resp.text.lower() or why in challenge.lower(), (why, resp.text)
        assert token not in resp.text and token[:40] not in challenge  # the token is never echoed


async def test_malformed_authorization_is_400(http: httpx.AsyncClient) -> None:
    resp = await http.get("/fhir/Patient", headers={"authorization": "Bearer "})
    assert resp.status_code == 400
    assert 'error="invalid_request"' in resp.headers["www-authenticate"]
    assert resp.json()["issue"][0]["code"] == "invalid"
    basic = await http.get("/fhir/Patient", headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401 and basic.headers["www-authenticate"] == 'Bearer realm="hms-ach"'


async def test_off_mode_lets_requests_in_as_anonymous(sqlite: Store, tmp_path: Path) -> None:
    authenticator = create_authenticator(AuthSettings(mode="off"), tmp_path / "data")
    app = create_app(sqlite, authenticator=authenticator)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        assert (await http.get("/fhir/Patient")).status_code == 200
        assert (await http.get("/.well-known/jwks.json")).status_code == 404  # no local issuer
        doc = (await http.get("/openapi.json")).json()
        assert "securitySchemes" not in doc.get("components", {})
        cs = (await http.get("/fhir/metadata")).json()
        assert "security" not in cs["rest"][0]
    assert not (tmp_path / "data").exists()  # off mode creates no key


# ---------------------------------------------------------------------------- start-up checks
def _config(tmp_path: Path, mode: str, http_host: str, mllp_host: str = "127.0.0.1") -> Path:
    path = tmp_path / "channels.yaml"
    path.write_text(
        f"engine:\n  mappings: {ROOT / 'mappings'}\n  watch: false\n"
        f"http:\n  host: '{http_host}'\n  port: 0\n"
        f"auth:\n  mode: {mode}\n"
        f"channels:\n  - name: adt_in\n    type: mllp\n    host: '{mllp_host}'\n    port: 0\n"
    )
    return path


@pytest.mark.parametrize(
    ("http_host", "mllp_host", "exposed"),
    [("0.0.0.0", "127.0.0.1", "'0.0.0.0'"), ("127.0.0.1", "::", "'::'"), ("127.0.0.1", "127.0.0.1", None)],
)
async def test_off_mode_is_refused_unless_every_listener_is_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_host: str, mllp_host: str, exposed: str | None
) -> None:
    monkeypatch.delenv("HMS_ACH_AUTH_MODE", raising=False)
    config = load_config(_config(tmp_path, "off", http_host, mllp_host))
    assert listener_hosts(config) == [http_host, mllp_host]
    checked = CliRunner().invoke(cli_app, ["check", "--config", str(tmp_path / "channels.yaml")])
    if exposed is None:
        assert auth_settings(config).mode == "off"
        assert checked.exit_code == 0, checked.output
        return
    with pytest.raises(ConfigError, match=exposed):
        auth_settings(config)
    assert checked.exit_code == 1 and "auth mode off" in checked.output and exposed in checked.output
    engine = Engine(config, database=f"sqlite:///{tmp_path}/e.db")
    with pytest.raises(ConfigError, match="auth mode off"):
        await engine.start()  # refused before anything starts
    assert not engine.channels and engine.http_port is None
    engine.store.dispose()


def test_the_environment_wins_and_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(_config(tmp_path, "local", "0.0.0.0"))
    monkeypatch.setenv("HMS_ACH_AUTH_MODE", "off")
    with pytest.raises(ConfigError, match="auth mode off"):
        auth_settings(config)
    monkeypatch.setenv("HMS_ACH_AUTH_MODE", "sometimes")
    with pytest.raises(ConfigError, match="HMS_ACH_AUTH_MODE"):
        auth_settings(config)


def test_the_shipped_configuration_authenticates(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HMS_ACH_AUTH_MODE", "HMS_ACH_AUTH_ISSUER", "HMS_ACH_AUTH_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(ROOT / "channels.yaml")
    assert auth_settings(config).mode == "local"
    assert json.dumps(config.auth.model_dump())  # typed, serialisable settings


async def _websocket(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """Connect to ``/ws`` as an ASGI server would; the messages the app sent."""
    inbox: list[Message] = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), *headers],  # the Host allow-list checks WebSockets too
        "client": ("127.0.0.1", 4711),
        "server": ("test", 80),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


async def test_websockets_are_authenticated_too(sqlite: Store, local: LocalIssuer) -> None:  # noqa: F811
    app = create_app(sqlite, authenticator=local.authenticator)

    @app.websocket("/ws")
    async def echo_caller(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.state.caller.sub)
        await websocket.close()

    refused = await _websocket(app, [])
    assert [(m["type"], m.get("code")) for m in refused] == [("websocket.close", 1008)]
    token = local.token(sub="ws-user").encode()
    accepted = await _websocket(app, [(b"authorization", b"Bearer " + token)])
    assert [m["type"] for m in accepted][:2] == ["websocket.accept", "websocket.send"]
    assert accepted[1]["text"] == "ws-user"
