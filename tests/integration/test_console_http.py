"""The console over plain HTTP (no browser): who may see and do what, the CSRF check, the cookie,
the access records of what the console shows, the patient identifier search, the chain check and a
paused file_drop channel (docs/console.md)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner, Result

from hms_ach.app.cli import app
from hms_ach.channels.file_drop import FileDropChannel
from hms_ach.hl7v2.client import send_messages
from hms_ach.store.access_log import AccessQuery, search_records
from hms_ach.store.db import Store
from tests.integration.engine_helpers import (
    ROOT,
    mllp_channel,
    mllp_yaml,
    running_engine,
)

A01 = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes()


def cli_link(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["console", *args, "--config", str(config)])


async def signed_in(engine: Any, config: Path, sub: str, *roles: str) -> tuple[httpx.AsyncClient, str]:
    """A client holding the session cookie of ``sub`` with ``roles`` (its link printed by
    ``hms-ach console``), and the session's CSRF token."""
    base = f"http://127.0.0.1:{engine.http_port}"
    flags = [f"--role={r}" for r in roles]
    printed = await asyncio.to_thread(cli_link, config, *flags, "--sub", sub, "--url", base)
    assert printed.exit_code == 0, printed.output
    # stdout alone: CliRunner swaps the process's sys.stderr, and a warning the running engine logs
    # from another thread meanwhile (logging's last-resort handler) lands in printed.output
    link = printed.stdout.strip()
    assert link.startswith(f"{base}/console/login?token=")
    client = httpx.AsyncClient(base_url=base)
    answer = await client.get(link)
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert "secure" not in cookie  # plain HTTP here
    page = await client.get("/console")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match is not None
    return client, match.group(1)


async def wait_for_access(store: Store, sub: str, subtype: str, entity: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        rows, _ = await asyncio.to_thread(
            search_records, store, AccessQuery(agent=sub, subtype=subtype, limit=1000)
        )
        found = [r for r in rows if entity in (r["entities"] or "").split()]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {subtype} access record of {sub} naming {entity}"
        await asyncio.sleep(0.1)


async def test_roles_csrf_access_records_and_search(store: Store, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    channels = mllp_yaml("adt_in") + (
        f"  - name: drop_in\n    type: file_drop\n    directory: {drop}\n    work_dir: {tmp_path / 'work'}\n"
        "    min_file_age_seconds: 0\n    stable_seconds: 0\n"
    )
    async with running_engine(tmp_path, store, channels) as engine:
        acks = await send_messages("127.0.0.1", mllp_channel(engine).port, [A01], timeout=10)
        assert b"MSA|AA" in acks[0]
        operator, csrf = await signed_in(engine, tmp_path / "channels.yaml", "olga", "operator")
        analyst, analyst_csrf = await signed_in(engine, tmp_path / "channels.yaml", "ana", "analyst")
        auditor, auditor_csrf = await signed_in(engine, tmp_path / "channels.yaml", "aud", "auditor")
        try:
            # the patient identifier search finds the message that wrote that patient, and is recorded
            found = await operator.get(
                "/console/messages", params={"patient": "urn:hms-ach:id:GENHOSP|100001"}
            )
            assert "S-A01-0001" in found.text
            assert (
                "S-A01-0001" in (await operator.get("/console/messages", params={"patient": "100001"})).text
            )
            assert (
                "no message matches"
                in (await operator.get("/console/messages", params={"patient": "999"})).text
            )
            message_id = re.search(r'href="/console/messages/(\d+)"', found.text)
            assert message_id is not None
            mid = message_id.group(1)
            await wait_for_access(store, "olga", "search-type", f"Message/{mid}")
            assert (await operator.get("/console/messages", params={"status": "bogus"})).status_code == 400

            # one message's view is recorded with the records it showed
            view = await analyst.get(f"/console/messages/{mid}")
            assert view.status_code == 200 and "MSA|AA" in view.text
            record = await wait_for_access(store, "ana", "read", f"Message/{mid}")
            assert "Patient/" in record["entities"]

            # roles: the auditor sees no message, the analyst pauses nothing, retries nothing
            assert (await auditor.get(f"/console/messages/{mid}")).status_code == 403
            assert (await auditor.get("/console/audit")).status_code == 200
            assert (await analyst.get("/console/audit")).status_code == 403
            refused = await analyst.post("/console/channels/adt_in/pause", data={"csrf": analyst_csrf})
            assert refused.status_code == 403
            apply = await analyst.post(
                f"/console/messages/{mid}/replay", data={"csrf": analyst_csrf, "apply": "1"}
            )
            assert apply.status_code == 403  # a dry run only
            assert (
                await analyst.post(f"/console/messages/{mid}/replay", data={"csrf": analyst_csrf})
            ).status_code == 200
            async with httpx.AsyncClient() as stranger:  # no session cookie
                assert (
                    await stranger.get(f"http://127.0.0.1:{engine.http_port}/console/messages")
                ).status_code == 401

            # CSRF: a POST without the session's token, or with another session's, changes nothing
            for data in ({}, {"csrf": "forged"}, {"csrf": auditor_csrf}):
                answer = await operator.post("/console/channels/drop_in/pause", data=data)
                assert answer.status_code == 403 and "CSRF" in answer.text
            channel = engine.channels["drop_in"]
            assert isinstance(channel, FileDropChannel) and not channel.pause_switch.paused

            # a paused file_drop channel skips its polls; resumed, it takes the file
            assert (
                await operator.post("/console/channels/drop_in/pause", data={"csrf": csrf})
            ).status_code == 303
            (drop / "a01.hl7").write_bytes(A01.replace(b"S-A01-0001", b"DROP-1"))
            skipped = await channel.poll()
            assert skipped.skipped == ["channel paused"] and not skipped.files
            assert (
                await operator.post("/console/channels/drop_in/resume", data={"csrf": csrf})
            ).status_code == 303
            assert [f.status for f in (await channel.poll()).files] == ["processed"]
            await wait_for_access(store, "olga", "pause", "Channel/drop_in")

            # the mapping reload and the audit viewer with its chain check
            reload = await operator.post("/console/reload", data={"csrf": csrf}, follow_redirects=True)
            assert "mapping reload: ok" in reload.text
            trail = await auditor.get("/console/audit", params={"user": "olga", "verify": "1"})
            assert "change trail intact" in trail.text and "pause" in trail.text

            # sign out: the cookie no longer opens a page
            assert (await auditor.post("/console/logout", data={"csrf": auditor_csrf})).status_code == 303
            assert (await auditor.get("/console")).status_code == 401
        finally:
            for client in (operator, analyst, auditor):
                await client.aclose()


def test_the_console_command_refuses_what_it_cannot_sign(tmp_path: Path) -> None:
    config = tmp_path / "channels.yaml"
    config.write_text("engine:\n  data_dir: data\nhttp:\n  host: 127.0.0.1\n  port: 8123\nchannels: []\n")
    printed = cli_link(config, "--role", "analyst")
    assert printed.exit_code == 0 and printed.output.startswith("http://127.0.0.1:8123/console/login?token=")
    bogus = cli_link(config, "--role", "root")
    assert bogus.exit_code == 2 and "unknown console role root" in bogus.output
    config.write_text(
        "engine:\n  data_dir: data\nauth:\n  mode: oidc\n  issuer: https://idp.example\n"
        "  audience: urn:x\nchannels: []\n"
    )
    oidc = cli_link(config)
    assert oidc.exit_code == 2 and "/console/login" in oidc.output
