"""Console sign-in in ``auth.mode: oidc``: the authorization code flow with PKCE against a real OpenID
provider (``oidc-provider`` from npm, tests/peers/oidc/console_server.mjs), in Debian's chromium.

The provider's own development pages take any login; its access token carries the console role, and
the engine verifies it like any bearer token before it opens the session (docs/console.md)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.conftest import empty_store
from tests.integration.engine_helpers import ROOT
from tests.integration.test_oidc_provider import PEER, _install_provider

CHROMIUM = "/usr/bin/chromium"
AUDIENCE = "urn:hms-ach:console-test"
CLIENT_ID = "hms-ach-console"

pytestmark = pytest.mark.timeout(400)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Store]:
    """SQLite only: the sign-in does not depend on the store, and a browser test is slow."""
    with empty_store("sqlite", tmp_path) as store:
        yield store


async def test_oidc_sign_in_with_pkce_in_chromium(sqlite: Store, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package): the OIDC sign-in is not driven in a browser")
    await asyncio.to_thread(_install_provider)
    node = shutil.which("node")
    assert node is not None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "provider.stderr").open("wb") as stderr:
        provider = await asyncio.create_subprocess_exec(
            node, "console_server.mjs", cwd=PEER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "OIDC_TEST_AUDIENCE": AUDIENCE, "OIDC_CONSOLE_CLIENT_ID": CLIENT_ID,
                 "OIDC_CONSOLE_REDIRECT_URI": f"{base}/console/callback", "NODE_ENV": "test"},
        )  # fmt: skip
    engine: Engine | None = None
    try:
        assert provider.stdout is not None
        line = await asyncio.wait_for(provider.stdout.readline(), 30)
        assert line, (tmp_path / "provider.stderr").read_text(errors="replace")[-2000:]
        issuer = json.loads(line)["issuer"]
        (tmp_path / "channels.yaml").write_text(
            f"engine:\n  mappings: {ROOT / 'mappings'}\n  watch: false\n"
            f"http:\n  host: 127.0.0.1\n  port: {port}\n"
            f"auth:\n  mode: oidc\n  issuer: {issuer}\n  audience: {AUDIENCE}\n"
            f"console:\n  oidc_client_id: {CLIENT_ID}\n"
            "channels: []\n"
        )
        engine = Engine(load_config(tmp_path / "channels.yaml"), database=sqlite.url)
        await engine.start()
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM)
            page = await (await browser.new_context()).new_page()
            page.set_default_timeout(10000)
            await page.goto(f"{base}/console/login")  # -> the provider's sign-in page
            assert page.url.startswith(issuer)
            await page.fill("input[name=login]", "olga")
            await page.fill("input[name=password]", "any")
            await page.click("button[type=submit]")
            await page.click("button[type=submit]")  # the consent page: continue
            await page.wait_for_url(f"{base}/console")
            assert "olga (operator)" in (await page.text_content("#user") or "")
            assert "adt_in" not in (await page.text_content("#channels") or "")
            await browser.close()
        async with httpx.AsyncClient(base_url=base) as client:
            forged = await client.get("/console/callback", params={"code": "x", "state": "y"})
            assert forged.status_code == 401 and "state does not match" in forged.text
            denied = await client.get("/console/callback", params={"error": "access_denied"})
            assert denied.status_code == 401 and "access_denied" in denied.text
    finally:
        if engine is not None:
            await engine.stop()
        if provider.stdin is not None:
            provider.stdin.close()
        try:
            await asyncio.wait_for(provider.wait(), 10)
        except TimeoutError:
            provider.kill()
            await provider.wait()
