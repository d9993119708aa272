"""MLLP client: what ``hms-ach send`` uses to send files of HL7 v2 messages and collect the ACKs.

:func:`send_each` (``hms-ach send``) reads the ACKs each message asks for: one in original mode; in
enhanced mode the commit ACK as MSH-15 says and the application ACK as MSH-16 says, on the same
connection (see ``docs/hl7-acks.md``). An ACK asked for always (AL, or an empty MSH-15) is waited
for up to ``timeout``; one asked for only on error or only on success (ER, SU) that may never come
is waited for ``conditional_wait`` seconds at most once the certain ones are in. An ACK whose MSA-2
is not the message's MSH-10 (a late answer to an earlier message) is skipped. After a timeout or a
lost connection it goes on with the next message on a new connection, so that a late ACK is never
taken for the next message's. :func:`send_messages` reads one ACK per message and stops at the
first failure.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeAlias

from hms_ach.core.errors import Err0357, RejectError
from hms_ach.hl7v2.ack import msa_code
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


async def connect(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None, handshake_timeout: float = 30
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open an MLLP connection, over TLS when ``ssl_context`` is given (the server's certificate is
    checked against ``host`` as the context says). Raises MllpError saying why it failed."""
    try:
        if ssl_context is None:
            return await asyncio.open_connection(host, port)
        return await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=host, ssl_handshake_timeout=handshake_timeout
        )
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or exc.reason or "verification failed"
        raise MllpError(f"cannot connect to {host}:{port}: server certificate not trusted: {why}") from exc
    except ssl.SSLError as exc:
        raise MllpError(
            f"cannot connect to {host}:{port}: TLS handshake failed: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise MllpError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc


async def send_messages(
    host: str,
    port: int,
    messages: list[bytes],
    timeout: float = 30,
    max_ack_bytes: int = 1024 * 1024,
    ssl_context: ssl.SSLContext | None = None,
) -> list[bytes]:
    """Send ``messages`` in order on one connection, each after the ACK of the one before.

    Returns the ACK payloads (unframed). ``timeout`` bounds the connect and each send+ACK round;
    an ACK over ``max_ack_bytes`` is an error. Raises MllpError (with the ACKs so far) on failure.
    With ``ssl_context`` the connection is TLS (see :func:`connect`).
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await connect(host, port, ssl_context, timeout)
    except TimeoutError as exc:
        raise MllpError(f"cannot connect to {host}:{port}: timed out") from exc
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


def _msh_fields(message: bytes) -> list[bytes]:
    """MSH split at its field separator: ``fields[n - 1]`` is MSH-n (MSH-1 is the separator itself)."""
    segments = _segments(message)
    first = segments[0] if segments else b""
    if not first.startswith(b"MSH") or len(first) < 4:
        return []
    return first.split(first[3:4])


def _msh(fields: list[bytes], n: int) -> str:
    return fields[n - 1].decode("latin-1").strip().upper() if n - 1 < len(fields) else ""


def expects_ack(message: bytes) -> bool:
    """False when MSH-15 (accept acknowledgment type) is NE: the receiver sends no commit ACK.

    An empty MSH-15 (original mode) and every other value expect one."""
    return _msh(_msh_fields(message), 15) != "NE"


def ack_types(message: bytes) -> tuple[str, str] | None:
    """(MSH-15, MSH-16) upper-cased, or None in original mode (both empty, or no readable MSH)."""
    fields = _msh_fields(message)
    accept, application = _msh(fields, 15), _msh(fields, 16)
    return (accept, application) if accept or application else None


#: What is still to come for a message: nothing, an ACK for sure, or an ACK that may not come.
_DONE, _REQUIRED, _POSSIBLE = "done", "required", "possible"


def _still_expected(types: tuple[str, str], commit: bytes | None, app: bytes | None) -> str:
    """What the receiver still owes in enhanced mode, given what came (HL7 table 0155 conditions).

    The commit ACK comes first: CR or CE ends the exchange (no application ACK follows a message
    that was not accepted), and an application ACK means the commit ACK is settled too."""
    accept, application = types
    if app is not None or (commit is not None and msa_code(_text(commit)) in ("CR", "CE")):
        return _DONE
    app_wanted = {"AL": _REQUIRED, "ER": _POSSIBLE, "SU": _POSSIBLE}.get(application, _DONE)
    if commit is None and accept != "NE":
        if accept in ("ER", "SU"):  # may be skipped; an application ACK AL then comes in any case
            return _REQUIRED if app_wanted == _REQUIRED else _POSSIBLE
        return _REQUIRED  # AL, or empty: every receiver sends a first ACK
    return app_wanted


def _text(ack: bytes) -> str:
    return ack.decode("latin-1")


def answers(ack: bytes, control_id: str) -> bool:
    """MSA-2 of ``ack`` is ``control_id`` (an ACK without a readable MSA-2 is taken as an answer)."""
    for segment in _text(ack).split("\r"):
        if segment.startswith("MSA") and len(segment) > 3:
            fields = segment.split(segment[3])
            return len(fields) < 3 or not fields[2] or fields[2] == control_id
    return True


@dataclass(frozen=True)
class Sent:
    """What became of one message: its ACK(s), no ACK because none was asked (MSH-15 NE), or an error.

    ``ack`` is the one ACK (original mode) or the commit ACK (enhanced mode), ``app_ack`` the
    application ACK (enhanced mode, MSH-16); either is None when it was not sent."""

    ack: bytes | None = None
    error: str | None = None
    ack_expected: bool = True
    app_ack: bytes | None = None

    @property
    def acks(self) -> list[bytes]:
        return [a for a in (self.ack, self.app_ack) if a is not None]


_Conn: TypeAlias = tuple[asyncio.StreamReader, asyncio.StreamWriter, MllpFramer, deque[FrameEvent]]


async def send_each(
    host: str,
    port: int,
    messages: list[bytes],
    timeout: float = 30,
    max_ack_bytes: int = 1024 * 1024,
    conditional_wait: float = 1.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[Sent]:
    """Send ``messages`` in order and return one :class:`Sent` per message; never raises MllpError.

    ``timeout`` bounds the connect, the send and all the ACKs of each message; within it, an ACK
    asked for only on error or only on success (ER/SU) is waited for ``conditional_wait`` at most. A
    message that asks for no ACK (MSH-15 NE, MSH-16 NE or empty) is written and not waited for.
    After a failure the connection is closed and the next message opens a new one. With
    ``ssl_context`` every connection is TLS (see :func:`connect`).
    """
    results: list[Sent] = []
    conn: _Conn | None = None
    try:
        for number, message in enumerate(messages, 1):
            types = ack_types(message)
            wants_ack = types is None or _still_expected(types, None, None) != _DONE
            got = _Exchange()
            try:
                async with asyncio.timeout(timeout):
                    if conn is None:
                        reader, writer = await connect(host, port, ssl_context, timeout)
                        conn = (reader, writer, MllpFramer(max_ack_bytes), deque())
                    writer = conn[1]
                    writer.write(frame(normalise_message(message)))
                    await writer.drain()
                    if types is None:
                        results.append(Sent(ack=await _next_ack(conn[0], conn[2], conn[3])))
                        continue
                    await _enhanced_acks(conn, message, types, conditional_wait, got)
                    results.append(Sent(ack=got.commit, ack_expected=wants_ack, app_ack=got.app))
                    continue
            except TimeoutError:
                error = f"message {number}: no ACK from {host}:{port} within {timeout} s"
                if got.commit is not None:
                    error = (
                        f"message {number}: commit ACK {msa_code(_text(got.commit))} but no "
                        f"application ACK (MSH-16 {types[1] if types else ''}) from {host}:{port} "
                        f"within {timeout} s"
                    )
            except MllpError as exc:
                error = f"message {number}: {exc.message}"
            except OSError as exc:
                error = f"message {number}: connection to {host}:{port} failed: {exc}"
            results.append(Sent(error=error, ack_expected=wants_ack, ack=got.commit))
            if conn is not None:
                await _close(conn[1])
                conn = None
    finally:
        if conn is not None:
            await _close(conn[1])
    return results


@dataclass
class _Exchange:
    """The ACKs of one enhanced-mode message so far (kept when the deadline passes)."""

    commit: bytes | None = None
    app: bytes | None = None


async def _enhanced_acks(
    conn: _Conn, message: bytes, types: tuple[str, str], conditional_wait: float, got: _Exchange
) -> None:
    """Read the commit and application ACKs of one enhanced-mode message into ``got`` (see
    :func:`_still_expected`). Runs under the caller's deadline; an ACK that may not come is waited
    for ``conditional_wait`` seconds."""
    reader, _writer, framer, pending = conn
    fields = _msh_fields(message)
    control_id = fields[9].decode("latin-1") if len(fields) > 9 else ""
    app_wanted = types[1] in ("AL", "ER", "SU")
    while (expected := _still_expected(types, got.commit, got.app)) != _DONE:
        if expected == _REQUIRED:
            ack = await _next_ack(reader, framer, pending)
        else:
            try:
                async with asyncio.timeout(conditional_wait):
                    ack = await _next_ack(reader, framer, pending)
            except TimeoutError:
                break
        if not answers(ack, control_id):
            continue  # a late answer to an earlier message
        code = msa_code(_text(ack))
        # An A* code is the application ACK when one is asked for; otherwise it is the first ACK
        # (a receiver that answers an enhanced-mode message with an original-mode ACK).
        if app_wanted and code.startswith("A") and got.app is None:
            got.app = ack
        elif got.commit is None:
            got.commit = ack
        else:
            got.app = ack


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
