"""MLLP client: what ``hms-ach send`` uses to send files of HL7 v2 messages and collect the ACKs."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from contextlib import suppress

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
