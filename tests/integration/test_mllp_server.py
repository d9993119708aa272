"""MllpServer and send_messages over real sockets on 127.0.0.1, with python-hl7's clients and
server as independent peers."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import hl7
import hl7.client
import hl7.mllp
import pytest

from hms_ach.core.errors import Err0357, RejectError
from hms_ach.hl7v2.ack import build_ack, fallback_ack
from hms_ach.hl7v2.client import send_messages, split_messages
from hms_ach.hl7v2.mllp import (
    CR,
    FS,
    VT,
    FrameHandler,
    MllpConfig,
    MllpError,
    MllpServer,
    OversizeHandler,
    frame,
)
from hms_ach.hl7v2.mllp_limits import BufferBudget
from hms_ach.hl7v2.parse import read_header

MSA = re.compile(rb"MSA\|(\w+)\|([^|\r]*)")
LOGGER = "hms_ach.hl7v2.mllp"


def message(control_id: str, body: bytes = b"") -> bytes:
    return (
        b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ADT^A01^ADT_A01|"
        + control_id.encode()
        + b"|P|2.5.1\rPID|1||12345^^^HOSP^MR||DOE^JANE\r"
        + body
    )


def msa(ack: bytes) -> tuple[str, str]:
    m = MSA.search(ack)
    assert m, ack
    return m[1].decode(), m[2].decode()


async def aa_handler(payload: bytes, peer: str) -> bytes | None:
    try:
        header = read_header(payload)
    except RejectError as exc:
        return fallback_ack(payload, exc).encode()
    if header.control_id.startswith("BOOM"):
        raise RuntimeError("handler failure on purpose")
    await asyncio.sleep(random.uniform(0, 0.003))  # let other connections interleave
    return build_ack(header, "AA").encode()


def oversize_ar(prefix: bytes, size: int, peer: str) -> bytes:
    error = RejectError(f"message is {size} bytes, over the limit", "MSH", Err0357.VALUE_TOO_LONG)
    try:
        return build_ack(read_header(prefix), "AR", error).encode()
    except RejectError:
        return fallback_ack(prefix, error).encode()


Start = Callable[..., Awaitable[MllpServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    servers: list[MllpServer] = []

    async def start(
        handler: FrameHandler = aa_handler,
        on_oversize: OversizeHandler | None = oversize_ar,
        budget: BufferBudget[Any] | None = None,
        **settings: Any,
    ) -> MllpServer:
        config = MllpConfig(host="127.0.0.1", port=0, **settings)
        server = MllpServer(
            config, handler, on_oversize, budget if budget is not None else BufferBudget(1 << 30)
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close(grace_seconds=2)


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "event", "")) for r in caplog.records if r.name == LOGGER]


async def wait_for_eof(reader: asyncio.StreamReader, within: float = 5) -> bytes:
    """Read until the server closes; returns what was received."""
    received = b""
    async with asyncio.timeout(within):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def test_many_messages_in_order_on_one_connection_hl7_asyncio_client(serve: Start) -> None:
    server = await serve()
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", server.port, limit=1024 * 1024)
    ids = [f"C{i:03d}" for i in range(50)]
    for control_id in ids:  # pipelined: all sent before any ACK is read
        writer.writemessage(hl7.parse(message(control_id).decode()))
    await writer.drain()
    acks = [await asyncio.wait_for(reader.readmessage(), 5) for _ in ids]
    assert [str(a.segment("MSA")[2]) for a in acks] == ids
    assert {str(a.segment("MSA")[1]) for a in acks} == {"AA"}
    writer.close()
    await writer.wait_closed()


async def test_mllp_send_console_script_with_a_file(serve: Start, tmp_path: Path) -> None:
    server = await serve()
    path = tmp_path / "batch.hl7"
    path.write_bytes(b"\n".join(message(f"F{i}").replace(b"\r", b"\n") for i in range(3)))
    script = Path(sys.executable).parent / "mllp_send"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hl7.client"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        "--loose",
        "-f",
        str(path),
        "-p",
        str(server.port),
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    assert [msa(a) for a in out.split(FS)[:-1]] == [("AA", "F0"), ("AA", "F1"), ("AA", "F2")]


async def test_blocking_mllp_client(serve: Start) -> None:
    server = await serve()

    def run() -> list[bytes]:
        with hl7.client.MLLPClient("127.0.0.1", server.port) as client:
            return [client.send_message(message(f"B{i}")) for i in range(5)]

    acks = await asyncio.to_thread(run)
    assert [msa(a) for a in acks] == [("AA", f"B{i}") for i in range(5)]
    assert all(a.startswith(VT) and a.endswith(FS + CR) for a in acks)


async def test_three_concurrent_connections(serve: Start) -> None:
    active = peak = 0

    async def handler(payload: bytes, peer: str) -> bytes | None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.005)
            return build_ack(read_header(payload), "AA").encode()
        finally:
            active -= 1

    server = await serve(handler)
    batches = [[message(f"K{k}-{i}") for i in range(15)] for k in range(3)]
    results = await asyncio.gather(*(send_messages("127.0.0.1", server.port, b) for b in batches))
    for k, acks in enumerate(results):
        assert [msa(a) for a in acks] == [("AA", f"K{k}-{i}") for i in range(15)]
    assert peak >= 2  # the connections really were served at the same time


async def test_idle_connection_is_closed(serve: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(idle_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    assert await wait_for_eof(reader) == b""
    assert 0.4 <= time.monotonic() - started < 3
    writer.close()
    assert "mllp.idle_timeout" in events(caplog)
    # an active connection is not affected: each message resets the clock
    acks = await send_messages("127.0.0.1", server.port, [message("I1"), message("I2")])
    assert len(acks) == 2


async def open_from(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the listener from the loopback address ``source`` (Linux routes 127/8 to lo)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, control_id: str
) -> tuple[str, str]:
    writer.write(frame(message(control_id)))
    await writer.drain()
    return msa(await asyncio.wait_for(reader.readuntil(FS + CR), 5))


async def wait_until(condition: Callable[[], bool], within: float = 5) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def test_connection_cap_closes_the_longest_idle_connection_for_a_new_one(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for i, (reader, writer) in enumerate(held):  # both registered, the first one idle longest
        assert await exchange(reader, writer, f"H{i}") == ("AA", f"H{i}")
    assert server.connection_count == 2
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await exchange(reader, writer, "NEW") == ("AA", "NEW")
    assert await wait_for_eof(held[0][0]) == b""  # the longest idle made room
    assert await exchange(*held[1], "STILL") == ("AA", "STILL")
    assert "mllp.connection_evicted" in events(caplog)
    for _reader, w in (held[1], (reader, writer)):
        w.close()


async def test_connection_cap_refuses_when_every_connection_is_inside_a_frame(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for _reader, writer in held:
        writer.write(VT + message("PART")[:20])  # a frame begun, not finished
        await writer.drain()
    await wait_until(lambda: server.buffered_bytes >= 40)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await wait_for_eof(reader) == b""
    writer.close()
    assert "mllp.connection_rejected" in events(caplog)
    for r, w in held:  # the frames can still be finished and answered
        w.write(message("PART")[20:] + FS + CR)
        await w.drain()
        assert msa(await asyncio.wait_for(r.readuntil(FS + CR), 5)) == ("AA", "PART")
        w.close()


async def test_per_source_limit_leaves_other_sources_alone(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(max_connections=10, max_connections_per_source=2)
    crowd = [await open_from(server.port, "127.0.0.2") for _ in range(2)]
    for _reader, writer in crowd:  # both inside a frame: not evictable
        writer.write(VT + b"MSH|")
        await writer.drain()
    await wait_until(lambda: server.buffered_bytes >= 8)
    third = await open_from(server.port, "127.0.0.2")
    assert await wait_for_eof(third[0]) == b""  # refused: its source is at the cap
    third[1].close()
    assert "mllp.connection_rejected" in events(caplog)
    legit = await open_from(server.port, "127.0.0.1")
    assert await exchange(*legit, "LEGIT") == ("AA", "LEGIT")
    for _r, w in [*crowd, legit]:
        w.close()


async def test_per_source_limit_recycles_that_sources_idle_connection(serve: Start) -> None:
    server = await serve(max_connections=10, max_connections_per_source=1)
    first = await open_from(server.port, "127.0.0.3")
    assert await exchange(*first, "ONE") == ("AA", "ONE")
    second = await open_from(server.port, "127.0.0.3")  # e.g. the sender restarted
    assert await exchange(*second, "TWO") == ("AA", "TWO")
    assert await wait_for_eof(first[0]) == b""
    first[1].close()
    second[1].close()


async def test_frame_timeout_closes_a_steady_trickle(serve: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(frame_timeout_seconds=0.8, min_bytes_per_second=0, idle_timeout_seconds=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    writer.write(VT)
    closed = False
    async with asyncio.timeout(5):
        while not closed:  # one byte every 50 ms: never idle, never finishing
            writer.write(b"x")
            with suppress(ConnectionError):
                await writer.drain()
            closed = reader.at_eof()
            with suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    closed = closed or await reader.read(10) == b""
    assert 0.7 <= time.monotonic() - started < 3
    assert "mllp.frame_timeout" in events(caplog)
    writer.close()


async def test_a_frame_slower_than_the_minimum_rate_is_closed(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(frame_timeout_seconds=30, min_bytes_per_second=1000, rate_window_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(VT + b"MSH|")  # then nothing: 4 bytes in the first window
    await writer.drain()
    started = time.monotonic()
    assert await wait_for_eof(reader) == b""
    assert time.monotonic() - started < 3
    assert "mllp.frame_too_slow" in events(caplog)
    writer.close()


async def test_bytes_between_frames_do_not_keep_a_connection_open(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(idle_timeout_seconds=0.6)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await exchange(reader, writer, "FIRST") == ("AA", "FIRST")
    started = time.monotonic()

    async def chatter() -> None:
        with suppress(ConnectionError):
            while True:
                writer.write(b"\r")
                await writer.drain()
                await asyncio.sleep(0.05)

    talking = asyncio.create_task(chatter())
    try:
        assert await wait_for_eof(reader) == b""
    finally:
        talking.cancel()
        await asyncio.gather(talking, return_exceptions=True)
    assert 0.5 <= time.monotonic() - started < 3
    assert "mllp.idle_timeout" in events(caplog)
    writer.close()


async def test_a_full_buffer_budget_holds_large_frames_back_and_lets_small_ones_through(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    budget: BufferBudget[Any] = BufferBudget(1024 * 1024)
    server = await serve(
        max_message_bytes=700_000,
        process_buffer_budget_bytes=1024 * 1024,
        max_connections=4,
        min_bytes_per_second=1000,
        rate_window_seconds=0.5,
        budget=budget,
    )
    hog = await asyncio.open_connection("127.0.0.1", server.port)
    hog[1].write(VT + message("HOG") + b"NTE|1||" + b"h" * 600_000)  # then it stalls, unterminated
    await hog[1].drain()
    await wait_until(lambda: server.buffered_bytes >= 600_000)
    big = await asyncio.open_connection("127.0.0.1", server.port)
    big[1].write(frame(message("BIGLEGIT", b"OBX|1|ED|||" + b"a" * 400_000 + b"\r")))
    await big[1].drain()
    small = await asyncio.open_connection("127.0.0.1", server.port)
    # the small message is read and answered at once, while the big one waits for room
    assert await exchange(*small, "SMALL") == ("AA", "SMALL")
    assert budget.used_bytes <= 1024 * 1024 - 200 * 1024
    # no room comes for a rate window: the hog (the largest unfinished frame) is closed, and the
    # big message gets the room and its AA
    assert msa(await asyncio.wait_for(big[0].readuntil(FS + CR), 10)) == ("AA", "BIGLEGIT")
    assert await wait_for_eof(hog[0]) == b""
    assert "mllp.buffer_budget_exceeded" in events(caplog)
    assert budget.used_bytes <= 1024 * 1024
    for _r, w in (hog, big, small):
        w.close()
    await wait_until(lambda: server.connection_count == 0)
    assert budget.used_bytes == 0


async def test_close_does_not_wait_for_a_frame_held_back_for_buffer_room(serve: Start) -> None:
    budget: BufferBudget[Any] = BufferBudget(1024 * 1024)
    server = await serve(
        max_message_bytes=780_000, process_buffer_budget_bytes=1024 * 1024, max_connections=4, budget=budget
    )
    hog = await asyncio.open_connection("127.0.0.1", server.port)
    hog[1].write(VT + message("HOG") + b"NTE|1||" + b"h" * 760_000)  # held back at three quarters
    await hog[1].drain()
    await wait_until(lambda: server.buffered_bytes >= 600_000)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await server.close(grace_seconds=5)
    assert time.monotonic() - started < 2
    assert await wait_for_eof(hog[0]) == b""
    hog[1].close()
    assert budget.used_bytes == 0


async def test_a_stream_of_junk_and_vts_is_not_a_stream_of_log_lines(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(20):
        writer.write(b"junk" + VT * 500)  # 500 truncated frames and 4 bytes of garbage each time
        await writer.drain()
    writer.write(CR + frame(message("AFTER")))  # the connection still works
    await writer.drain()
    assert msa(await asyncio.wait_for(reader.readuntil(FS + CR), 5)) == ("AA", "AFTER")
    writer.close()
    await wait_until(lambda: server.connection_count == 0)
    names = events(caplog)
    assert names.count("mllp.truncated_frame") == 1 and names.count("mllp.garbage_discarded") == 1
    closed = [r for r in caplog.records if getattr(r, "event", "") == "mllp.connection_closed"]
    fields = closed[-1].fields  # type: ignore[attr-defined]
    assert fields["truncated_frames"] >= 9_999 and fields["garbage_bytes"] == 4


async def test_stop_accepting_lets_a_frame_in_progress_finish(serve: Start) -> None:
    server = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(VT + message("HALF")[:25])
    await writer.drain()
    await wait_until(lambda: server.buffered_bytes >= 25 and server.connection_count == 2)
    closing = asyncio.create_task(server.close(grace_seconds=5))
    assert await wait_for_eof(idle_reader) == b""  # between frames: closed at once
    writer.write(message("HALF")[25:] + FS + CR)
    await writer.drain()
    assert msa(await asyncio.wait_for(reader.readuntil(FS + CR), 5)) == ("AA", "HALF")
    assert await wait_for_eof(reader) == b""  # then closed
    await asyncio.wait_for(closing, 5)
    writer.close()
    idle_writer.close()


def _send_big_then_small(port: int, big: bytes) -> tuple[bytes, bytes]:
    """Blocking peer: a 20 MB frame sent from a memoryview (no copy), then a normal message."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(VT)
        sock.sendall(memoryview(big))
        sock.sendall(FS + CR)
        first = _recv_frame(sock)
        sock.sendall(frame(message("AFTER")))
        return first, _recv_frame(sock)


def _recv_frame(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(FS + CR):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


async def test_oversize_message_gets_an_ar_with_bounded_memory(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve(max_message_bytes=1024 * 1024)
    big = message("BIG", b"OBX|1|ED|||" + b"A" * (20 * 1024 * 1024) + b"\r")
    tracemalloc.start()
    try:
        reply, after = await asyncio.to_thread(_send_big_then_small, server.port, big)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msa(reply) == ("AR", "BIG")
    assert b"ERR|" in reply and b"104" in reply
    assert msa(after) == ("AA", "AFTER")  # the same connection keeps going
    assert peak < 6 * 1024 * 1024, f"peak traced memory {peak} bytes"
    assert "mllp.oversize" in events(caplog)
    acks = await send_messages("127.0.0.1", server.port, [message("NEXT")])
    assert msa(acks[0]) == ("AA", "NEXT")


async def test_oversize_without_reply_closes_the_connection(serve: Start) -> None:
    server = await serve(max_message_bytes=1024, on_oversize=None)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(frame(message("BIG", b"NTE|1||" + b"x" * 5000 + b"\r")) + frame(message("LOST")))
    await writer.drain()
    assert await wait_for_eof(reader) == b""
    writer.close()
    assert msa((await send_messages("127.0.0.1", server.port, [message("OK")]))[0]) == ("AA", "OK")


async def test_handler_error_closes_without_ack(serve: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve()
    with pytest.raises(MllpError) as info:
        await send_messages(
            "127.0.0.1", server.port, [message("OK1"), message("BOOM"), message("OK2")], timeout=5
        )
    assert "message 2" in info.value.message
    assert [msa(a) for a in info.value.acks] == [("AA", "OK1")]
    assert "mllp.handler_failed" in events(caplog)
    acks = await send_messages("127.0.0.1", server.port, [message("OK3")])
    assert msa(acks[0]) == ("AA", "OK3")


async def test_truncated_frame_then_disconnect(serve: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await serve()
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"junk" + VT + message("CUT")[:30])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if "mllp.connection_closed" in events(caplog):
            break
        await asyncio.sleep(0.01)
    assert {"mllp.garbage_discarded", "mllp.truncated_frame", "mllp.connection_closed"} <= set(events(caplog))
    acks = await send_messages("127.0.0.1", server.port, [message("WHOLE")])
    assert msa(acks[0]) == ("AA", "WHOLE")


async def test_close_lets_a_busy_connection_finish_its_frame(serve: Start) -> None:
    started = asyncio.Event()

    async def slow(payload: bytes, peer: str) -> bytes | None:
        started.set()
        await asyncio.sleep(0.3)
        return build_ack(read_header(payload), "AA").encode()

    server = await serve(slow)
    port = server.port
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    sending = asyncio.create_task(send_messages("127.0.0.1", server.port, [message("SLOW")], timeout=5))
    await asyncio.wait_for(started.wait(), 5)
    await server.close(grace_seconds=5)
    assert msa((await sending)[0]) == ("AA", "SLOW")
    assert await wait_for_eof(idle_reader) == b""
    idle_writer.close()
    assert server.connection_count == 0
    with pytest.raises(MllpError):
        await send_messages("127.0.0.1", port, [message("X")], timeout=2)  # no longer listening


async def test_send_messages_to_a_python_hl7_server(tmp_path: Path) -> None:
    async def answer(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                received = await reader.readmessage()
                writer.writemessage(received.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await hl7.mllp.start_hl7_server(answer, "127.0.0.1", 0, limit=1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    try:
        data = (
            b"FHS|^~\\&\r\n"
            + b"".join(message(f"S{i}").replace(b"\r", b"\r\n") for i in range(4))
            + b"FTS|1\r\n"
        )
        messages = split_messages(data)
        assert len(messages) == 4
        acks = await send_messages("127.0.0.1", port, messages, timeout=5)
        assert [msa(a) for a in acks] == [("AA", f"S{i}") for i in range(4)]
    finally:
        server.close()
        await server.wait_closed()


async def test_send_messages_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MllpError, match="cannot connect"):
        await send_messages("127.0.0.1", port, [message("X")], timeout=2)
