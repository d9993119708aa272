"""Issue 14 item 7: HTTP hardening, against the app served by a real uvicorn server on loopback and
httpx as the client: security headers, the Host allow-list, CORS, the per-client rate limit and the
API description served without any external request."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from hms_ach.app.config import HttpSettings, RateLimitSettings
from hms_ach.app.http import create_app
from hms_ach.auth.authenticate import Authenticator
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, local_authenticator

pytestmark = pytest.mark.timeout(60)

ORIGIN = "https://app.hospital.example"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/store.db")
    yield store
    store.dispose()


@pytest.fixture
def authenticator(tmp_path: Path) -> Authenticator:
    return local_authenticator(tmp_path / "data")


@asynccontextmanager
async def serving(store: Store, authenticator: Authenticator, **settings: Any) -> AsyncIterator[str]:
    """The app with these ``http:`` settings, served by uvicorn on a free loopback port; its base URL."""
    app = create_app(store, settings=HttpSettings(host="127.0.0.1", **settings), authenticator=authenticator)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()  # the server failed to start: raise its error
                await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


def assert_security_headers(response: httpx.Response, *, no_store: bool) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.request.url.path)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert (response.headers.get("cache-control") == "no-store") is no_store, response.request.url.path
    assert "strict-transport-security" not in response.headers  # plain HTTP


async def test_security_headers_on_every_answer(sqlite: Store, authenticator: Authenticator) -> None:
    async with serving(sqlite, authenticator) as base, httpx.AsyncClient(base_url=base, timeout=15) as http:
        token = auth_headers(authenticator)
        phi = [
            await http.get("/fhir/Patient", headers=token),  # 200, a Bundle
            await http.get("/fhir/Patient"),  # 401
            await http.get("/fhir/Patient/no-such", headers=token),  # 404
            await http.get("/api/v1/employees", headers=token),  # 200
            await http.get("/api/v1/employees"),  # 401, a problem
        ]
        assert [r.status_code for r in phi] == [200, 401, 404, 200, 401]
        for response in phi:
            assert_security_headers(response, no_store=True)
        public = [
            await http.get("/fhir/metadata"),
            await http.get("/fhir/.well-known/smart-configuration"),
            await http.get("/health/live"),
            await http.get("/openapi.json"),
            await http.get("/docs"),
        ]
        assert [r.status_code for r in public] == [200] * 5
        for response in public:
            assert_security_headers(response, no_store=False)
        # JSON answers load nothing; the /docs page is HTML and keeps only the frame denial
        assert phi[0].headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert public[4].headers["content-security-policy"] == "frame-ancestors 'none'"


async def test_hsts_only_over_https(sqlite: Store, authenticator: Authenticator) -> None:
    """The scheme of the ASGI scope decides (uvicorn sets https when it serves TLS)."""
    app = create_app(sqlite, settings=HttpSettings(hsts_max_age_seconds=600), authenticator=authenticator)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://localhost") as https:
        answer = await https.get("/health/live")
        assert answer.headers["strict-transport-security"] == "max-age=600"
        assert (await https.get("/fhir/Patient")).headers["strict-transport-security"] == "max-age=600"
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        assert "strict-transport-security" not in (await http.get("/health/live")).headers


async def test_host_allow_list_refuses_other_hosts(sqlite: Store, authenticator: Authenticator) -> None:
    async with serving(sqlite, authenticator) as base, httpx.AsyncClient(base_url=base, timeout=15) as http:
        token = auth_headers(authenticator)
        port = base.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "localhost."):
            assert (await http.get("/fhir/Patient", headers={**token, "Host": host})).status_code == 200, host
        # a rebound name, even with a valid token: 400 OperationOutcome, the Host not echoed
        rebound = await http.get("/fhir/Patient", headers={**token, "Host": f"attacker.example:{port}"})
        assert rebound.status_code == 400
        outcome = rebound.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "http.allowed_hosts" in outcome["issue"][0]["diagnostics"]
        assert "attacker" not in rebound.text
        assert_security_headers(rebound, no_store=True)
        problem = await http.get("/api/v1/employees", headers={**token, "Host": "attacker.example"})
        assert problem.status_code == 400
        assert problem.headers["content-type"].startswith("application/problem+json")
        assert problem.json()["status"] == 400
        for bad in ("127.0.0.1:80:80", "a b", "bad_port:x", "[::1", "ünïcode.example", "x" * 400):
            assert (await http.get("/fhir/metadata", headers=[(b"Host", bad.encode())])).status_code == 400, (
                bad
            )
        # probes from an orchestrator use the pod IP: /health* is exempt
        assert (await http.get("/health/live", headers={"Host": "10.1.2.3:8080"})).status_code == 200

    allowed = ["hms-ach.hospital.example", "*.wards.example"]
    async with (
        serving(sqlite, authenticator, allowed_hosts=allowed) as base,
        httpx.AsyncClient(base_url=base, timeout=15) as http,
    ):
        for host, status in [
            ("hms-ach.hospital.example", 200),
            ("HMS-ACH.hospital.example:443", 200),
            ("north.wards.example", 200),
            ("wards.example", 400),
            ("127.0.0.1", 400),  # an explicit list replaces the default
        ]:
            assert (await http.get("/fhir/metadata", headers={"Host": host})).status_code == status, host


async def test_cors_denied_by_default(sqlite: Store, authenticator: Authenticator) -> None:
    async with serving(sqlite, authenticator) as base, httpx.AsyncClient(base_url=base, timeout=15) as http:
        preflight = await http.options(
            "/fhir/Patient",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        )
        simple = await http.get("/fhir/metadata", headers={"Origin": ORIGIN})
        for response in (preflight, simple):
            assert not [h for h in response.headers if h.startswith("access-control-")], response.headers


async def test_cors_preflight_of_configured_origins(sqlite: Store, authenticator: Authenticator) -> None:
    async with (
        serving(sqlite, authenticator, cors_origins=[ORIGIN]) as base,
        httpx.AsyncClient(base_url=base, timeout=15) as http,
    ):
        request = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
        allowed = await http.options("/fhir/Patient", headers={"Origin": ORIGIN, **request})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers  # bearer tokens need none
        # the actual request, with its token: the browser may read the answer
        read = await http.get("/fhir/Patient", headers={"Origin": ORIGIN, **auth_headers(authenticator)})
        assert read.status_code == 200
        assert read.headers["access-control-allow-origin"] == ORIGIN
        other = "https://elsewhere.example"
        denied = await http.options("/fhir/Patient", headers={"Origin": other, **request})
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers
        answer = await http.get("/fhir/metadata", headers={"Origin": other})
        assert "access-control-allow-origin" not in answer.headers


def test_cors_origins_must_be_origins() -> None:
    for bad in ("app.hospital.example", "https://app.hospital.example/", "ftp://x.example", "https://"):
        with pytest.raises(ValueError, match="not an origin"):
            HttpSettings(cors_origins=[bad])


async def test_rate_limit_answers_429_with_retry_after(sqlite: Store, authenticator: Authenticator) -> None:
    # 0.1 requests per second: no token comes back during the test, even on a loaded machine
    limit = RateLimitSettings(requests_per_second=0.1, burst=5)
    async with (
        serving(sqlite, authenticator, rate_limit=limit) as base,
        httpx.AsyncClient(base_url=base, timeout=15) as http,
    ):
        alice = auth_headers(authenticator, sub="alice")
        statuses = [(await http.get("/fhir/Patient", headers=alice)).status_code for _ in range(5)]
        assert statuses == [200] * 5
        throttled = await http.get("/fhir/Patient", headers=alice)
        assert throttled.status_code == 429
        assert 1 <= int(throttled.headers["retry-after"]) <= 10
        outcome = throttled.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "throttled"
        assert_security_headers(throttled, no_store=True)
        problem = await http.get("/api/v1/employees", headers=alice)
        assert problem.status_code == 429
        assert problem.headers["content-type"].startswith("application/problem+json")
        assert "retry-after" in problem.headers
        # another caller from the same address has its own bucket; probes are never limited
        assert (
            await http.get("/fhir/Patient", headers=auth_headers(authenticator, sub="bob"))
        ).status_code == 200
        for _ in range(8):
            assert (await http.get("/health/live")).status_code == 200
        # without a token the source address is the client: the public paths share its bucket
        anonymous = [(await http.get("/fhir/metadata")).status_code for _ in range(6)]
        assert anonymous == [200] * 5 + [429]


async def test_docs_assets_are_served_locally(sqlite: Store, authenticator: Authenticator) -> None:
    """/docs and /redoc reference no external URL, and every asset they name is served, without a token."""
    async with serving(sqlite, authenticator) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        for page in ("/docs", "/redoc"):
            html = (await http.get(page)).text
            assert not re.findall(r"https?://", html), page
            assets = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert any(a.endswith(".js") for a in assets), page
            for asset in assets:
                assert asset.startswith("/docs/assets/"), asset
                answer = await http.get(asset)
                assert answer.status_code == 200, asset
                assert len(answer.content) > 1000, asset
        # the oauth2 redirect page of Swagger UI too
        assert (await http.get("/docs/oauth2-redirect")).status_code == 200


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.timeout(120)
async def test_docs_render_in_a_browser_without_external_requests(
    sqlite: Store, authenticator: Authenticator
) -> None:
    playwright = pytest.importorskip(
        "playwright.async_api",
        reason="playwright is not installed (pip install playwright): /docs not rendered",
    )
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine (/usr/bin/chromium): /docs not rendered in a browser")
    async with serving(sqlite, authenticator) as base, playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium)
        try:
            page = await browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(f"{base}/docs", timeout=30_000)
            await page.wait_for_selector(".opblock", timeout=30_000)  # an operation is rendered
            assert requested
            assert all(url.startswith(base) for url in requested), requested
        finally:
            await browser.close()
