"""The fhir_push sink against a second, real hms-ach instance (fhir_rest channel on a loopback port).

Instance 1 takes ADT over MLLP; its change feed is pushed to instance 2, where the records are then
found with FHIR search. A small aiohttp proxy in front of instance 2 plays an outage (503 with
Retry-After) and an OAuth2 token endpoint that checks the SMART private_key_jwt client assertion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from hms_ach.app.runtime import Engine
from hms_ach.outbound.fhir_push import FhirPushSink, PushAuth
from hms_ach.store.db import Store
from hms_ach.store.models import OutboxRow
from tests.integration.engine_helpers import auth_headers, mint_token, mllp_channel, start_fhir_engine
from tests.integration.outbound_helpers import make_engine, send_mllp, wait_for


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[Engine]:
    """Instance 2: its own SQLite store and its own mappings folder."""
    (tmp_path / "remote").mkdir()
    store = Store(f"sqlite:///{tmp_path}/remote/remote.db")
    engine = await start_fhir_engine(tmp_path / "remote", store)
    try:
        yield engine
    finally:
        await engine.stop()
        store.dispose()


def _sink(base_url: str, extra: str = "") -> str:
    return (
        f"  - name: mirror\n    type: fhir_push\n    base_url: {base_url}\n"
        "    retry_initial_seconds: 0.05\n    retry_max_seconds: 1\n    timeout_seconds: 5\n" + extra
    )


async def _local(tmp_path: Path, store: Store, sinks: str) -> Engine:
    (tmp_path / "local").mkdir(exist_ok=True)
    engine = make_engine(tmp_path / "local", store.url, sinks)
    await engine.start()
    return engine


def _remote_base(remote: Engine) -> str:
    return f"http://127.0.0.1:{remote.http_port}/fhir"


def _bearer(remote: Engine) -> str:
    """The sink's ``auth:`` with a token of the remote instance's local issuer."""
    return f"    auth:\n      type: bearer\n      token: {mint_token(remote, 'system/*.cruds', ())}\n"


async def _search(remote: Engine, query: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10, headers=auth_headers(remote)) as client:
        response = await client.get(f"{_remote_base(remote)}/{query}")
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def _rows(store: Store) -> list[Any]:
    table = OutboxRow.__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        return list(conn.execute(select(table).where(table.c.destination == "mirror").order_by(table.c.id)))


async def _mirrored(remote: Engine) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return await _search(remote, "Patient"), await _search(remote, "Encounter")


async def _admit_and_check(local: Engine, remote: Engine, store: Store) -> None:
    assert await send_mllp(mllp_channel(local).port, ["adt_a01.hl7"]) == ["AA"]
    state: dict[str, Any] = {}

    async def poll() -> bool:
        state["rows"] = _rows(store)
        return bool(state["rows"]) and all(r.status == "delivered" for r in state["rows"])

    deadline = time.monotonic() + 30
    while not await poll():
        assert time.monotonic() < deadline, [(r.event, r.status, r.last_error) for r in state["rows"]]
        await asyncio.sleep(0.1)
    patients, encounters = await _mirrored(remote)
    assert len(patients) == 1 and len(encounters) == 1
    patient, encounter = patients[0], encounters[0]
    # the remote's own ids, linked to each other, found by the sender's business identifiers
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    ident = patient["identifier"][0]
    found = await _search(remote, f"Patient?identifier={ident['system']}|{ident['value']}")
    assert [p["id"] for p in found] == [patient["id"]]


@pytest.mark.parametrize("mode", ["conditional", "transaction"])
async def test_an_admission_appears_on_the_remote(
    tmp_path: Path, store: Store, remote: Engine, mode: str
) -> None:
    base = _remote_base(remote)
    local = await _local(tmp_path, store, _sink(base, f"    mode: {mode}\n" + _bearer(remote)))
    try:
        await _admit_and_check(local, remote, store)
        # a transfer and a discharge update the same remote Encounter (no second one)
        assert await send_mllp(mllp_channel(local).port, ["adt_a02.hl7", "adt_a03.hl7"]) == ["AA", "AA"]
        await wait_for(lambda: all(r.status == "delivered" for r in _rows(store)) and len(_rows(store)) > 2)
        await asyncio.sleep(0.3)
        await wait_for(lambda: all(r.status == "delivered" for r in _rows(store)))
    finally:
        await local.stop()
    encounters = await _search(remote, "Encounter")
    assert len(encounters) == 1 and encounters[0]["status"] == "finished"


class Proxy:
    """Forwards to the remote; answers 503 (Retry-After: 1) while ``down``, or 401 to a wrong token."""

    def __init__(self, target: Engine, token: str | None = None):
        self.target = _remote_base(target)
        self.upstream_authorization = auth_headers(target)["authorization"]
        self.token = token
        self.down = False
        self.refused = 0
        self.forwarded = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="no")
        if self.down:
            self.refused += 1
            return web.Response(status=503, headers={"Retry-After": "1"}, text="maintenance")
        self.forwarded += 1
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.request(
                request.method,
                f"{self.target}/{request.match_info['tail']}",
                params=list(request.query.items()),
                content=await request.read(),
                headers={
                    "Content-Type": request.headers.get("Content-Type", ""),
                    "Accept": "application/fhir+json",
                    "Authorization": self.upstream_authorization,
                },
            )
        headers = {
            k: v for k, v in response.headers.items() if k.lower() in ("location", "etag", "content-type")
        }
        return web.Response(status=response.status_code, body=response.content, headers=headers)

    async def start(self, extra: list[web.RouteDef] | None = None) -> str:
        app = web.Application()
        app.add_routes(extra or [])
        app.router.add_route("*", "/fhir/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_a_remote_that_answers_503_then_recovers_loses_nothing(
    tmp_path: Path, store: Store, remote: Engine
) -> None:
    proxy = Proxy(remote)
    url = await proxy.start()
    proxy.down = True
    local = await _local(tmp_path, store, _sink(f"{url}/fhir"))
    try:
        port = mllp_channel(local).port
        # inbound is not held up by the outage: every message is acknowledged
        assert await send_mllp(port, ["adt_a01.hl7", "adt_a02.hl7"]) == ["AA", "AA"]
        await wait_for(lambda: proxy.refused >= 2)
        rows = _rows(store)
        assert rows and rows[0].status == "pending" and "503" in (rows[0].last_error or "")
        assert all(r.status == "pending" for r in rows)
        proxy.down = False
        await wait_for(lambda: bool(_rows(store)) and all(r.status == "delivered" for r in _rows(store)), 30)
    finally:
        await local.stop()
        await proxy.stop()
    patients, encounters = await _mirrored(remote)
    assert len(patients) == 1 and len(encounters) == 1
    assert encounters[0]["subject"]["reference"] == f"Patient/{patients[0]['id']}"


async def test_a_422_goes_to_dead_letter_with_the_operation_outcome(
    tmp_path: Path, store: Store, remote: Engine
) -> None:
    # Only Encounters are pushed: the remote has no Patient the Encounter could refer to and says 422.
    base = _remote_base(remote)
    sink = _sink(base, "    resource_types: [Encounter]\n" + _bearer(remote))
    local = await _local(tmp_path, store, sink)
    try:
        assert await send_mllp(mllp_channel(local).port, ["adt_a01.hl7"]) == ["AA"]
        await wait_for(lambda: any(r.status == "dead" for r in _rows(store)))
    finally:
        await local.stop()
    dead = [r for r in _rows(store) if r.status == "dead"]
    assert len(dead) == 1 and dead[0].attempts == 1  # permanent: no retries
    assert "HTTP 422" in dead[0].last_error and "does not exist" in dead[0].last_error
    outcome = orjson.loads(dead[0].response)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Encounter.subject"]


def _rsa_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


async def test_oauth2_private_key_jwt_token_is_fetched_and_used(
    tmp_path: Path, store: Store, remote: Engine
) -> None:
    pem, public_key = _rsa_pem()
    proxy = Proxy(remote, token="access-1")
    assertions: list[dict[str, Any]] = []
    token_url_box: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return web.json_response({"error": "invalid_client"}, status=401)
        header = jwt.get_unverified_header(str(form["client_assertion"]))
        claims = jwt.decode(
            str(form["client_assertion"]),
            public_key,
            algorithms=["RS384"],
            audience=token_url_box[0],
            issuer="hms-ach-push",
            options={"require": ["exp", "iat", "jti", "sub"]},
        )
        assertions.append(
            {
                "header": header,
                "claims": claims,
                "scope": form.get("scope"),
                "grant_type": form.get("grant_type"),
            }
        )
        return web.json_response({"access_token": "access-1", "token_type": "bearer", "expires_in": 300})

    url = await proxy.start([web.post("/auth/token", token)])
    token_url_box.append(f"{url}/auth/token")
    auth = (
        f"    auth:\n      type: client_credentials\n      token_url: {url}/auth/token\n"
        "      client_id: hms-ach-push\n      private_key: ${TEST_PUSH_KEY}\n      key_id: key-1\n"
        "      scope: system/Patient.write system/Encounter.write\n"
    )
    import os

    os.environ["TEST_PUSH_KEY"] = pem
    try:
        local = await _local(tmp_path, store, _sink(f"{url}/fhir", auth))
    finally:
        del os.environ["TEST_PUSH_KEY"]
    try:
        await _admit_and_check(local, remote, store)
    finally:
        await local.stop()
        await proxy.stop()
    assert len(assertions) == 1  # the token is cached
    a = assertions[0]
    assert a["header"]["alg"] == "RS384" and a["header"]["kid"] == "key-1"
    assert a["claims"]["sub"] == "hms-ach-push" and a["claims"]["exp"] - a["claims"]["iat"] <= 300
    assert (
        a["grant_type"] == "client_credentials"
        and a["scope"] == "system/Patient.write system/Encounter.write"
    )
    assert proxy.forwarded > 0


def test_auth_settings_say_what_is_missing() -> None:
    with pytest.raises(ValueError, match="bearer needs token"):
        PushAuth(type="bearer")
    with pytest.raises(ValueError, match="exactly one of client_secret"):
        PushAuth(type="client_credentials", token_url="https://a/token", client_id="x")
    with pytest.raises(ValueError, match="resource_types: Widget not known"):
        FhirPushSink.Config(name="m", type="fhir_push", base_url="http://x/fhir", resource_types=["Widget"])
