"""Shared pieces of the outbound tests: an engine with sinks, MLLP sending, a webhook receiver."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.outbound.webhook import verify

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
SECRET = "test-secret-0123456789"


def make_engine(tmp_path: Path, store_url: str, sinks_yaml: str, extra_yaml: str = "") -> Engine:
    """An engine with one MLLP channel (``adt_in``), no HTTP, the sinks of ``sinks_yaml`` and any
    further top-level sections (``jobs:``...) of ``extra_yaml``."""
    if not (tmp_path / "mappings").exists():
        shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  enabled: false\n"
        "channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
        "    idle_timeout_seconds: 5\n"
        "sinks:\n" + sinks_yaml + extra_yaml
    )
    return Engine(load_config(tmp_path / "channels.yaml"), database=store_url)


async def send_mllp(port: int, names: list[str]) -> list[str]:
    """Send sample files over MLLP on one connection; returns the MSA-1 code of each ACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    codes = []
    try:
        for name in names:
            text = (SAMPLES / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
            writer.write(b"\x0b" + text + b"\x1c\r")
            await writer.drain()
            ack = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
            msa = next(s for s in ack.decode().strip("\x0b\x1c\r").split("\r") if s.startswith("MSA"))
            codes.append(msa.split("|")[1])
    finally:
        writer.close()
    return codes


class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1 that checks every signature."""

    def __init__(self, fail_first: int = 0, status: Callable[[int], int] | None = None):
        self.fail_first = fail_first
        self.requests = 0
        self.events: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.bad_signatures = 0
        self.status = status
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if not verify(
            SECRET,
            request.headers.get("X-HMS-ACH-Timestamp", ""),
            body,
            request.headers.get("X-HMS-ACH-Signature", ""),
        ):
            self.bad_signatures += 1
            return web.Response(status=401)
        code = (
            self.status(self.requests) if self.status else (503 if self.requests <= self.fail_first else 200)
        )
        if code != 200:
            return web.Response(status=code, headers={"Retry-After": "0"})
        key = request.headers["Idempotency-Key"]
        if key not in self.keys:  # a receiver drops what it already has
            self.keys.append(key)
            self.events.append(orjson.loads(body))
        return web.Response(status=200, text="ok")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)
