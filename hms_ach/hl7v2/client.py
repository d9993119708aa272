"""MLLP client: what ``hms-ach send`` uses to send files of HL7 v2 messages and collect the ACKs.

:func:`send_each` (``hms-ach send``) waits for no ACK when a message's MSH-15 says NE, and goes on
with the next message after a timeout or a lost connection (on a new connection, so that a late
ACK is never taken for the next message's). :func:`send_messages` stops at the first failure.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from contextlib import suppress
from dataclasses import dataclass

from hms_ach.core.errors import Err0357, RejectError
from hms_ach.hl7v2.mllp import FS, VT, Frame, FrameEvent, MllpError, MllpFramer, OversizeFrame, frame

_LINE_END = re.compile(rb"\r\n|\n|\r")
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


def _is_segment(line: bytes, names: tuple[bytes, ...]) -> bool:
    return line[:3] in names and len(line) > 3 and not chr(line[3]).isalnum()


def _segments(data: bytes) -> list[bytes]:
    data = data.removeprefix(b"\xef\xbb\xbf").replace(VT, b"\r").replace(FS, b"\r")
    return [line for line in _LINE_END.split(data) if line.strip()]


def normalise_message(data: bytes) -> bytes:
    """One message as ER7 on the wire: CR after every segment, no blank lines, no MLLP bytes."""
    return b"".join(segment + b"\r" for segment in _segments(data))


def split_messages(data: bytes) -> list[bytes]:
    """Split a file into messages at each MSH; FHS/BHS/BTS/FTS batch envelope lines are dropped.

    Line ends may be CR, LF or CRLF; MLLP framing bytes in the file are ignored. Raises
    RejectError for a segment before the first MSH.
    """
    messages: list[list[bytes]] = []
    for number, segment in enumerate(_segments(data), 1):
        if _is_segment(segment, _ENVELOPE):
            continue
        if _is_segment(segment, (b"MSH",)):
            messages.append([])
        elif not messages:
            name = segment[:3].decode("latin-1", "replace")
            raise RejectError(
                f"segment {number} ({name!r}) comes before the first MSH segment",
                f"segment {number}",
                Err0357.SEGMENT_SEQUENCE,
            )
        messages[-1].append(segment)
    return [b"".join(s + b"\r" for s in segments) for segments in messages]


async def send_messages(
    host: str, port: int, messages: list[bytes], timeout: float = 30, max_ack_bytes: int = 1024 * 1024
) -> list[bytes]:
    """Send ``messages`` in order on one connection, each after the ACK of the one before.

    Returns the ACK payloads (unframed). ``timeout`` bounds the connect and each send+ACK round;
    an ACK over ``max_ack_bytes`` is an error. Raises MllpError (with the ACKs so far) on failure.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise MllpError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    framer = MllpFramer(max_ack_bytes)
    pending: deque[FrameEvent] = deque()
    acks: list[bytes] = []
    try:
        for number, message in enumerate(messages, 1):
            try:
                async with asyncio.timeout(timeout):
                    writer.write(frame(normalise_message(message)))
                    await writer.drain()
                    acks.append(await _next_ack(reader, framer, pending))
            except TimeoutError as exc:
                raise MllpError(
                    f"message {number}: no ACK from {host}:{port} within {timeout} s", acks
                ) from exc
            except MllpError as exc:
                raise MllpError(f"message {number}: {exc.message}", acks) from exc
            except OSError as exc:
                raise MllpError(f"message {number}: connection to {host}:{port} failed: {exc}", acks) from exc
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    return acks


async def _next_ack(reader: asyncio.StreamReader, framer: MllpFramer, pending: deque[FrameEvent]) -> bytes:
    while True:
        while pending:
            event = pending.popleft()
            if isinstance(event, Frame):
                return event.payload
            if isinstance(event, OversizeFrame):
                raise MllpError(
                    f"the ACK is {event.size} bytes, over the {framer.max_message_bytes} byte limit"
                )
        chunk = await reader.read(65536)
        if not chunk:
            raise MllpError("the server closed the connection without an ACK")
        pending.extend(framer.feed(chunk))


def expects_ack(message: bytes) -> bool:
    """False when MSH-15 (accept acknowledgment type) is NE: the receiver sends no commit ACK.

    An empty MSH-15 (original mode) and every other value expect one."""
    first = _segments(message)[0] if _segments(message) else b""
    if not first.startswith(b"MSH") or len(first) < 4:
        return True
    fields = first.split(first[3:4])  # fields[n - 1] is MSH-n: MSH-1 is the separator itself
    return not (len(fields) > 14 and fields[14].strip().upper() == b"NE")


@dataclass(frozen=True)
class Sent:
    """What became of one message: its ACK, no ACK because none was asked (MSH-15 NE), or an error."""

    ack: bytes | None = None
    error: str | None = None
    ack_expected: bool = True


async def send_each(
    host: str, port: int, messages: list[bytes], timeout: float = 30, max_ack_bytes: int = 1024 * 1024
) -> list[Sent]:
    """Send ``messages`` in order and return one :class:`Sent` per message; never raises MllpError.

    ``timeout`` bounds the connect and each send+ACK round. A message whose MSH-15 is NE is written
    and not waited for. After a failure the connection is closed and the next message opens a new one.
    """
    results: list[Sent] = []
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, MllpFramer, deque[FrameEvent]] | None = None
    try:
        for number, message in enumerate(messages, 1):
            wants_ack = expects_ack(message)
            try:
                async with asyncio.timeout(timeout):
                    if conn is None:
                        try:
                            reader, writer = await asyncio.open_connection(host, port)
                        except OSError as exc:
                            raise MllpError(f"cannot connect to {host}:{port}: {exc}") from exc
                        conn = (reader, writer, MllpFramer(max_ack_bytes), deque())
                    reader, writer, framer, pending = conn
                    writer.write(frame(normalise_message(message)))
                    await writer.drain()
                    if not wants_ack:
                        results.append(Sent(ack_expected=False))
                        continue
                    results.append(Sent(ack=await _next_ack(reader, framer, pending)))
                    continue
            except TimeoutError:
                error = f"message {number}: no ACK from {host}:{port} within {timeout} s"
            except MllpError as exc:
                error = f"message {number}: {exc.message}"
            except OSError as exc:
                error = f"message {number}: connection to {host}:{port} failed: {exc}"
            results.append(Sent(error=error, ack_expected=wants_ack))
            if conn is not None:
                await _close(conn[1])
                conn = None
    finally:
        if conn is not None:
            await _close(conn[1])
    return results


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
