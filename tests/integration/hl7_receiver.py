"""A downstream HL7 v2 receiver nobody here wrote: python-hl7's asyncio MLLP server (``hl7.mllp``),
answering with python-hl7's own ``Message.create_ack``. A test scripts its misbehaviour: answer AE
to chosen deliveries, or drop the connection without an answer."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import hl7
import hl7.mllp

#: What the receiver does with the n-th message it reads (1-based): "AA", "AE", "AR", "drop" or "slow".
Script = Callable[[int], str]


class Hl7Receiver:
    def __init__(self, script: Script | None = None, delay_seconds: float = 0.0):
        self.script = script or (lambda _n: "AA")
        self.delay_seconds = delay_seconds
        self.received: list[str] = []  # every message read, in order (ER7, CR-separated)
        self.accepted: list[str] = []  # the messages answered AA
        self.answers: list[str] = []  # what each read message got: AA, AE, AR, drop
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _client(self, reader: Any, writer: Any) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    message = await reader.readmessage()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.received.append(str(message))
                action = self.script(len(self.received))
                self.answers.append(action)
                if action == "drop":
                    writer.close()
                    return
                if self.delay_seconds:
                    await asyncio.sleep(self.delay_seconds)
                writer.writemessage(
                    message.create_ack("AE" if action == "AE" else action if action == "AR" else "AA")
                )
                await writer.drain()
                if action not in ("AE", "AR"):
                    self.accepted.append(str(message))
        finally:
            writer.close()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> int:
        self._server = await hl7.mllp.start_hl7_server(
            self._client, "127.0.0.1", 0, limit=1024 * 1024, ssl=ssl_context
        )
        sockets = getattr(self._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def segments(message: str) -> dict[str, list[str]]:
    """The first occurrence of each segment of an ER7 message, split into fields (MSH as the others)."""
    out: dict[str, list[str]] = {}
    for line in message.replace("\n", "\r").split("\r"):
        if line[:3] and line[:3] not in out:
            out[line[:3]] = line.split("|")
    return out


async def received_from(engine_for: Callable[[int], Any], samples: list[str], count: int) -> Hl7Receiver:
    """A receiver that got ``count`` messages from the engine ``engine_for(receiver port)`` after the
    samples were sent to its ``adt_in`` channel (each answered AA); engine and receiver are stopped."""
    from tests.integration.engine_helpers import mllp_channel
    from tests.integration.outbound_helpers import send_mllp, wait_for

    receiver = Hl7Receiver()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(receiver.stop)
        engine = engine_for(await receiver.start())
        await engine.start()
        stack.push_async_callback(engine.stop)
        assert await send_mllp(mllp_channel(engine).port, samples) == ["AA"] * len(samples)
        await wait_for(lambda: len(receiver.accepted) == count)
    return receiver
