"""The web console in a real browser: Debian's chromium driven by Playwright (docs/console.md).

One engine and one browser per store backend run the whole tour, in the order an operator would:
sign in with the one-time link; the dashboard lists the channel; an A01 sent over MLLP shows in the
live message list within 2 s; the message shows its tree, ACK and records; a replay dry run shows
its diff; a dead outbox row is retried; a pasted sample previews with lineage; a paused channel
leaves the next MLLP sender waiting until it is resumed. Screenshots go to the test's temporary
directory (and to ``HMS_ACH_CONSOLE_SCREENSHOTS`` when set: how docs/img/ was made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from hms_ach.auth.local_issuer import TokenRequest, issue_token
from hms_ach.console.session import LOGIN_CLIENT_ID
from hms_ach.hl7v2.client import send_messages
from hms_ach.store.db import Store
from hms_ach.store.models import OutboxEvent, OutboxRow
from tests.integration.engine_helpers import (
    ROOT,
    engine_authenticator,
    mllp_channel,
    mllp_yaml,
    running_engine,
)

CHROMIUM = "/usr/bin/chromium"
A01 = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes()


def a01(control_id: str) -> bytes:
    return A01.replace(b"S-A01-0001", control_id.encode())


def login_link(engine: Any, roles: tuple[str, ...] = ("operator", "analyst", "auditor")) -> str:
    auth = engine_authenticator(engine)
    assert auth.local_key is not None
    request = TokenRequest(scope="", sub="olga", roles=roles, ttl_seconds=300, client_id=LOGIN_CLIENT_ID)
    return f"http://127.0.0.1:{engine.http_port}/console/login?token={issue_token(auth.settings, auth.local_key, request)}"


def dead_row(store: Store) -> int:
    """One dead outbox row of a sink ``hooks`` with its last error (as the dispatcher leaves it)."""
    with store.transaction() as conn:
        event_key = conn.execute(
            insert(OutboxEvent.__table__).values(event="encounter.admitted", payload="{}")  # type: ignore[attr-defined]
        ).inserted_primary_key
        assert event_key is not None
        event_id = event_key[0]
        row_key = conn.execute(
            insert(OutboxRow.__table__).values(  # type: ignore[attr-defined]
                destination="hooks",
                event_id=event_id,
                event="encounter.admitted",
                status="dead",
                attempts=9,
                last_error="HTTP 503 from the receiver",
            )
        ).inserted_primary_key
    assert row_key is not None
    return int(row_key[0])


def screenshot_dirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / "screenshots"]
    extra = os.environ.get("HMS_ACH_CONSOLE_SCREENSHOTS")
    if extra:
        dirs.append(Path(extra))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


async def shoot(page: Any, dirs: list[Path], name: str) -> None:
    first = dirs[0] / name
    await page.screenshot(path=str(first), full_page=False)
    for d in dirs[1:]:
        shutil.copy(first, d / name)
    assert first.stat().st_size > 1000


async def test_console_tour_in_chromium(store: Store, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package): the console is not driven in a browser")
    shots = screenshot_dirs(tmp_path)
    async with running_engine(tmp_path, store, mllp_yaml("adt_in")) as engine:
        port = mllp_channel(engine, "adt_in").port
        base = f"http://127.0.0.1:{engine.http_port}"
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM)
            page = await (await browser.new_context(viewport={"width": 1400, "height": 900})).new_page()
            # a guard against a hang (the pages load under the parallel pass); latency is asserted apart
            page.set_default_timeout(15000)

            # sign-in: the link opens a session; the same link is refused the second time
            link = login_link(engine)
            await page.goto(link)
            assert page.url == f"{base}/console"
            assert "olga" in (await page.text_content("#user") or "")
            async with httpx.AsyncClient() as client:
                again = await client.get(link)
                assert again.status_code == 401 and "already used" in again.text
                assert (await client.get(f"{base}/console")).status_code == 401  # no cookie, no page

            # the dashboard lists the channel
            assert "adt_in" in (await page.text_content("#channels") or "")

            # an A01 over MLLP shows in the live list within 2 s of its ACK
            await page.goto(f"{base}/console/messages?live=1")
            acks = await send_messages("127.0.0.1", port, [a01("CONSOLE-1")], timeout=10)
            assert b"MSA|AA|CONSOLE-1" in acks[0]
            acked = time.monotonic()
            await page.locator("#messages", has_text="CONSOLE-1").wait_for(timeout=2000)
            assert time.monotonic() - acked < 2.0

            # one message: the tree with field names, the ACK, the records and their lineage
            await page.locator("#messages a").first.click()
            await page.wait_for_selector("#tree")
            tree = await page.text_content("#tree") or ""
            assert "PID-5" in tree and "patient name" in tree and "Rivera" in tree
            assert "MSA|AA|CONSOLE-1" in (await page.text_content("#ack") or "")
            records = await page.text_content("#records") or ""
            assert "Patient/" in records and "Encounter/" in records
            assert "PID" in (await page.text_content("#lineage") or "")
            await shoot(page, shots, "console-message.png")

            # replay: a dry run shows the diff first, then it can be applied
            await page.click("#replay-dry-run")
            report = await page.text_content("#replay-report") or ""
            assert "would change" in report and "processed" in report
            await page.click("#replay-apply")
            assert "changed" in (await page.text_content("#replay-report") or "")

            # a dead outbox row, with its last error, is retried
            row = await asyncio.to_thread(dead_row, store)
            await page.goto(f"{base}/console/outbox?status=dead")
            line = page.locator(f"tr[data-row='{row}']")
            assert "HTTP 503" in (await line.text_content() or "")
            await line.locator("button").click()
            await page.goto(f"{base}/console/outbox?sink=hooks")
            assert (await page.locator(f"tr[data-row='{row}'] .row-status").text_content()) == "pending"

            # a pasted sample previews with lineage
            await page.goto(f"{base}/console/workbench")
            await page.fill("#sample", a01("WB-1").decode().replace("\r", "\n"))
            await page.click("#preview")
            lineage = await page.text_content("#previews .lineage") or ""
            assert "PID-5" in lineage and "Patient" in lineage

            # or a file chosen in the page fills the sample (read by the browser, sent like pasted text)
            sample = tmp_path / "sample.csv"
            sample.write_text("a,b\n1,2\n")
            await page.set_input_files("#sample-file", str(sample))
            # polled from here: the page's CSP forbids the eval a wait_for_function string needs
            deadline = time.monotonic() + 10
            while not (await page.input_value("#sample")).startswith("a,b"):
                assert time.monotonic() < deadline, "the chosen file never filled the sample"
                await asyncio.sleep(0.05)

            # pause: the next MLLP sender waits for its ACK; resume: it is served
            await page.goto(f"{base}/console/channels")
            await page.locator("tr[data-channel='adt_in'] button").click()
            assert (await page.text_content("tr[data-channel='adt_in'] .state")) == "paused"
            sender = asyncio.create_task(send_messages("127.0.0.1", port, [a01("PAUSED-1")], timeout=10))
            await asyncio.sleep(0.8)
            assert not sender.done(), "a paused channel answered"
            await page.locator("tr[data-channel='adt_in'] button").click()
            assert (await page.text_content("tr[data-channel='adt_in'] .state")) == "running"
            acks = await asyncio.wait_for(sender, 5)
            assert b"MSA|AA|PAUSED-1" in acks[0]

            await page.goto(f"{base}/console")
            await page.locator("#channels", has_text="processed").wait_for()
            await shoot(page, shots, "console-dashboard.png")
            await browser.close()
