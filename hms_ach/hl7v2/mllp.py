"""MLLP transport: framing and the listener (the client of ``hms-ach send`` is :mod:`hms_ach.hl7v2.client`).

Only bytes move here; what a frame means (parse, store, which ACK) is the handler's business.

Framing (HL7 v2 MLLP, release 2): ``<VT> payload <FS><CR>``. The frame reader is strict about
what it keeps and lenient about what it skips:

* CR, LF, space and tab between frames are ignored; any other byte before a VT is discarded and
  reported as :class:`Garbage`.
* A frame ends at FS. The CR after it is expected but not required: 0x1c can never occur inside
  ER7 text, so a lone FS is already an unambiguous end, and the CR that normally follows is then
  an ordinary between-frames byte. This also means a frame is answered as soon as its FS arrives.
* A VT inside a frame (the sender lost its frame end and started again) ends the broken frame as
  :class:`TruncatedFrame` and starts a new one; EOF inside a frame is a :class:`TruncatedFrame` too.
* A payload longer than ``max_message_bytes`` is not buffered: its first bytes are kept for the
  AR (:data:`OVERSIZE_PREFIX_BYTES`) and the rest is counted and dropped until its FS, which then
  yields one :class:`OversizeFrame`.
* Empty frames are passed on like any other; the handler decides what they deserve.

The listener processes the frames of one connection strictly in order, one at a time, and sends
an ACK only when the handler returns one. A handler error closes the connection without an ACK,
so that the sender resends. Logs are structured events named ``mllp.*`` and never hold payloads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hms_ach.core.errors import HmsAchError

VT = b"\x0b"  #: start block
FS = b"\x1c"  #: end block
CR = b"\x0d"  #: follows FS
END_BLOCK = FS + CR
#: How much of an oversize frame is kept for the AR (enough for any sane MSH).
OVERSIZE_PREFIX_BYTES = 4096
_BETWEEN_FRAMES = b"\r\n \t"

log = logging.getLogger(__name__)


def _event(level: int, name: str, **fields: Any) -> None:
    """One structured log event: a stable ``name`` plus key=value fields (never payloads)."""
    if log.isEnabledFor(level):
        text = " ".join([name, *(f"{k}={v}" for k, v in fields.items())])
        log.log(level, "%s", text, extra={"event": name, "fields": fields})


class MllpError(HmsAchError):
    """An MLLP exchange failed (connect, send, or no ACK). ``acks`` holds the ACKs received before."""

    def __init__(self, message: str, acks: list[bytes] | None = None):
        self.message = message
        self.acks = acks or []
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Framing


@dataclass(frozen=True)
class Frame:
    """A complete frame: the bytes between VT and FS, unchanged."""

    payload: bytes


@dataclass(frozen=True)
class OversizeFrame:
    """A frame longer than the limit: its first bytes and its full payload size."""

    prefix: bytes
    size: int


@dataclass(frozen=True)
class Garbage:
    """Bytes outside any frame that were neither VT nor CR/LF/space/tab (discarded)."""

    size: int


@dataclass(frozen=True)
class TruncatedFrame:
    """A frame cut short by a new VT or by EOF (discarded); ``size`` bytes had arrived."""

    size: int


FrameEvent = Frame | OversizeFrame | Garbage | TruncatedFrame

_OUTSIDE, _INSIDE, _DISCARDING = "outside", "inside", "discarding"


class MllpFramer:
    """Socket-free MLLP frame reader: ``feed()`` bytes, get :data:`FrameEvent` s back in order.

    Memory is bounded: at most ``max_message_bytes`` of one frame are ever buffered.
    """

    def __init__(self, max_message_bytes: int, prefix_bytes: int = OVERSIZE_PREFIX_BYTES):
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        self.max_message_bytes = max_message_bytes
        self.prefix_bytes = min(prefix_bytes, max_message_bytes)
        self._state = _OUTSIDE
        self._buffer = bytearray()
        self._prefix = b""
        self._size = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current frame held in memory (never more than ``max_message_bytes``)."""
        return len(self._buffer)

    @property
    def in_frame(self) -> bool:
        """True between a VT and its FS (including while an oversize frame is being skipped)."""
        return self._state != _OUTSIDE

    def feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        view = memoryview(data)
        pos, end_of_data = 0, len(data)
        while pos < end_of_data:
            if self._state == _OUTSIDE:
                start = data.find(VT, pos)
                stop = end_of_data if start < 0 else start
                if stop > pos:
                    junk = len(data[pos:stop].translate(None, _BETWEEN_FRAMES))
                    if junk:
                        events.append(Garbage(junk))
                if start < 0:
                    break
                self._begin()
                pos = start + 1
                continue
            fs_at, vt_at = data.find(FS, pos), data.find(VT, pos)
            stop = min((i for i in (fs_at, vt_at) if i >= 0), default=end_of_data)
            self._take(view[pos:stop])
            if stop == end_of_data:
                break
            if stop == fs_at:
                events.append(self._complete())
                self._reset()
            else:
                events.append(TruncatedFrame(self._size))
                self._begin()
            pos = stop + 1
        return events

    def finish(self) -> list[FrameEvent]:
        """The stream ended: a frame still open is reported as truncated and dropped."""
        if self._state == _OUTSIDE:
            return []
        size = self._size
        self._reset()
        return [TruncatedFrame(size)]

    def _begin(self) -> None:
        self._reset()
        self._state = _INSIDE

    def _reset(self) -> None:
        self._state = _OUTSIDE
        self._buffer = bytearray()
        self._prefix = b""
        self._size = 0

    def _take(self, chunk: memoryview) -> None:
        self._size += len(chunk)
        if self._state == _DISCARDING:
            return
        if self._size <= self.max_message_bytes:
            self._buffer += chunk
            return
        missing = max(0, self.prefix_bytes - len(self._buffer))
        self._prefix = bytes(self._buffer[: self.prefix_bytes]) + bytes(chunk[:missing])
        self._buffer = bytearray()
        self._state = _DISCARDING

    def _complete(self) -> FrameEvent:
        if self._state == _DISCARDING:
            return OversizeFrame(self._prefix, self._size)
        return Frame(bytes(self._buffer))


def frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in an MLLP block."""
    return VT + payload + END_BLOCK


# ---------------------------------------------------------------------------------------------
# Listener

#: Returns the reply to a frame: one ACK, several sent in order (a commit ACK then an application
#: ACK), or None / [] for none.
FrameHandler = Callable[[bytes, str], Awaitable[bytes | list[bytes] | None]]
OversizeHandler = Callable[[bytes, int, str], bytes | None | Awaitable[bytes | None]]


class MllpConfig(BaseModel):
    """Settings of one MLLP listener."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("0.0.0.0", description="Address to listen on (0.0.0.0 = all IPv4 interfaces).")
    port: int = Field(
        2575, ge=0, le=65535, description="TCP port to listen on; 0 lets the OS choose (tests)."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Largest payload (bytes between VT and FS) accepted; longer frames are skipped and "
        "answered by the oversize callback (an AR).",
    )
    idle_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="A connection that sends nothing (or cannot take our ACK) for this long is closed.",
    )
    max_connections: int = Field(
        100, ge=1, description="Open connections allowed at once; further connections are closed at once."
    )
    read_chunk_bytes: int = Field(
        65536, ge=512, le=16 * 1024 * 1024, description="Bytes read from a socket per read call."
    )


@dataclass(slots=True)
class _Connection:
    peer: str
    writer: asyncio.StreamWriter
    busy: bool = False  # True while a frame of this connection is being handled or answered


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class MllpServer:
    """An MLLP listener on ``asyncio.start_server``; see the module docstring for the behaviour.

    ``handler(payload, peer)`` returns the ACK to send (encoded, without MLLP framing), a list of
    ACKs sent one after the other (each its own frame), or None.
    ``on_oversize(prefix, size, peer)`` (plain or async) returns the AR for a frame over the limit,
    after which the connection keeps going; without it, or when it returns None, the connection
    is closed.
    """

    def __init__(self, config: MllpConfig, handler: FrameHandler, on_oversize: OversizeHandler | None = None):
        self.config = config
        self._handler = handler
        self._on_oversize = on_oversize
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (the OS-chosen one when configured with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MllpServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._stopping = False
        limit = max(self.config.read_chunk_bytes, 65536)
        self._server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, limit=limit
        )
        _event(logging.INFO, "mllp.listening", host=self.config.host, port=self.port)

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, close idle connections, let busy ones finish their current frame
        (up to ``grace_seconds``, then cancel them) and wait until all are gone."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for conn in self._connections.values():
            if not conn.busy:
                conn.writer.close()
        tasks = list(self._connections)
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        _event(logging.INFO, "mllp.stopped")

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_name(writer)
        if self._stopping or len(self._connections) >= self.config.max_connections:
            _event(
                logging.WARNING,
                "mllp.connection_rejected",
                peer=peer,
                open=len(self._connections),
                max_connections=self.config.max_connections,
            )
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        assert task is not None  # we always run inside the task start_server made
        conn = _Connection(peer, writer)
        self._connections[task] = conn
        _event(logging.INFO, "mllp.connection_opened", peer=peer)
        reason = "eof"
        try:
            reason = await self._read_loop(reader, conn)
        except (ConnectionError, OSError) as exc:
            reason = f"network_error:{type(exc).__name__}"
        finally:
            try:
                writer.close()
                with suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
                _event(logging.INFO, "mllp.connection_closed", peer=peer, reason=reason)
            finally:
                del self._connections[task]  # only now, so that close() waits for this task

    async def _read_loop(self, reader: asyncio.StreamReader, conn: _Connection) -> str:
        framer = MllpFramer(self.config.max_message_bytes)
        while not self._stopping:
            try:
                async with asyncio.timeout(self.config.idle_timeout_seconds):
                    chunk = await reader.read(self.config.read_chunk_bytes)
            except TimeoutError:
                _event(
                    logging.INFO,
                    "mllp.idle_timeout",
                    peer=conn.peer,
                    seconds=self.config.idle_timeout_seconds,
                    in_frame=framer.in_frame,
                )
                return "idle_timeout"
            events = framer.feed(chunk) if chunk else framer.finish()
            conn.busy = True
            try:
                for event in events:
                    if self._stopping:
                        return "server_stopping"
                    if not await self._on_event(event, conn):
                        return "handler_failed" if isinstance(event, Frame) else "oversize"
            finally:
                conn.busy = False
            if not chunk:
                return "eof"
        return "server_stopping"

    async def _on_event(self, event: FrameEvent, conn: _Connection) -> bool:
        """Act on one framing event; False means: close this connection now."""
        peer = conn.peer
        if isinstance(event, Garbage):
            _event(logging.WARNING, "mllp.garbage_discarded", peer=peer, bytes=event.size)
            return True
        if isinstance(event, TruncatedFrame):
            _event(logging.WARNING, "mllp.truncated_frame", peer=peer, bytes=event.size)
            return True
        if isinstance(event, OversizeFrame):
            _event(
                logging.WARNING,
                "mllp.oversize",
                peer=peer,
                bytes=event.size,
                max_message_bytes=self.config.max_message_bytes,
            )
            if self._on_oversize is None:
                return False
            try:
                reply = self._on_oversize(event.prefix, event.size, peer)
                if inspect.isawaitable(reply):
                    reply = await reply
            except Exception:
                log.exception(
                    "mllp.handler_failed",
                    extra={"event": "mllp.handler_failed", "fields": {"peer": peer, "what": "on_oversize"}},
                )
                return False
            return reply is not None and await self._send(conn, reply)
        _event(logging.DEBUG, "mllp.frame_received", peer=peer, bytes=len(event.payload))
        try:
            ack = await self._handler(event.payload, peer)
        except Exception:
            log.exception(
                "mllp.handler_failed", extra={"event": "mllp.handler_failed", "fields": {"peer": peer}}
            )
            return False
        for reply in [ack] if isinstance(ack, bytes) else ack or []:
            if not await self._send(conn, reply):
                return False
        return True

    async def _send(self, conn: _Connection, ack: bytes) -> bool:
        conn.writer.write(frame(ack))
        try:
            async with asyncio.timeout(self.config.idle_timeout_seconds):
                await conn.writer.drain()
        except TimeoutError:
            _event(logging.WARNING, "mllp.send_timeout", peer=conn.peer)
            return False
        _event(logging.DEBUG, "mllp.ack_sent", peer=conn.peer, bytes=len(ack))
        return True
