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

Limits against slow, idle and greedy clients (the pieces are in :mod:`hms_ach.hl7v2.mllp_limits`;
docs/reliability.md, "MLLP limits", is the operator's account):

* each connection has an idle clock (between frames; chatter does not reset it), a frame clock
  (VT to FS) and a minimum byte rate inside a frame;
* connections are capped per source address and in total; at a cap an idle connection (or, with
  none, one stuck in a frame for a second or more) makes room, and a source with recent strikes
  (connections closed by a limit) may take free slots only;
* the bytes of unfinished and in-process frames are bounded per connection
  (``max_message_bytes``) and, across every listener of the process, by one
  :class:`~hms_ach.hl7v2.mllp_limits.BufferBudget`: large frames may use three quarters of it and
  wait (unread) when that is full; small frames always find room in the last quarter.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hms_ach.core.errors import HmsAchError
from hms_ach.core.tls import (
    LOOPBACK_ONLY,
    CertSubject,
    MllpTlsSettings,
    SourceAllowList,
    check_cidrs,
    subject_allowed,
    subject_of,
)
from hms_ach.hl7v2.mllp_limits import (
    BUFFER_BUDGET,
    EVICTED,
    FRAME_TIMEOUT,
    FRAME_TOO_SLOW,
    IDLE_TIMEOUT,
    BufferBudget,
    FrameClock,
    SourceStrikes,
    admit,
)

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

_OUTSIDE, _INSIDE, _DISCARDING, _ABANDONED = "outside", "inside", "discarding", "abandoned"


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
        return self._state in (_INSIDE, _DISCARDING)

    def buffered_after(self, nbytes: int) -> int:
        """The most bytes this framer can hold (buffered or in the frames it returns) after being
        fed ``nbytes`` more: what a connection claims from the buffer budget before a read."""
        if self._state == _INSIDE:
            return len(self._buffer) + nbytes
        return 0 if self._state == _ABANDONED else nbytes

    def abandon(self) -> None:
        """Drop the unfinished frame now (its memory is freed) and ignore everything fed later."""
        self._reset()
        self._state = _ABANDONED

    def feed(self, data: bytes) -> list[FrameEvent]:
        if self._state == _ABANDONED:
            return []
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
        if self._state in (_OUTSIDE, _ABANDONED):
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


class Peer(str):
    """Who is at the other end of a connection, as handlers get it: the string is ``host:port``
    (what the logs show); ``host`` is the source address and ``cert_subject`` the subject of the
    client certificate verified during a mutual-TLS handshake (None over plain TCP or without one)."""

    host: str
    cert_subject: CertSubject | None

    def __new__(cls, text: str, host: str, cert_subject: CertSubject | None = None) -> Peer:
        peer = super().__new__(cls, text)
        peer.host = host
        peer.cert_subject = cert_subject
        return peer


#: Returns the reply to a frame: one ACK, several sent in order (a commit ACK then an application
#: ACK), or None / [] for none. The ``peer`` passed is a :class:`Peer` (a ``str``).
FrameHandler = Callable[[bytes, str], Awaitable[bytes | list[bytes] | None]]
OversizeHandler = Callable[[bytes, int, str], bytes | None | Awaitable[bytes | None]]

MIB = 1024 * 1024


class MllpConfig(BaseModel):
    """Settings of one MLLP listener (see docs/reliability.md, "MLLP limits")."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("0.0.0.0", description="Address to listen on (0.0.0.0 = all IPv4 interfaces).")
    port: int = Field(
        2575, ge=0, le=65535, description="TCP port to listen on; 0 lets the OS choose (tests)."
    )
    max_message_bytes: int = Field(
        16 * MIB,
        ge=1,
        description="Largest payload (bytes between VT and FS) accepted; longer frames are skipped and "
        "answered by the oversize callback (an AR). Also the most one connection buffers.",
    )
    idle_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="Between frames, a connection must start its next frame within this long of its "
        "last answer (or of connecting), else it is closed; CR, LF or other bytes between frames do "
        "not reset this clock.",
    )
    frame_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A frame must end (FS) within this long of its first byte (VT), however steadily "
        "it arrives, else the connection is closed without an answer.",
    )
    min_bytes_per_second: float = Field(
        1024.0,
        ge=0,
        description="Inside a frame, each rate_window_seconds must bring at least this many bytes per "
        "second on average, else the connection is closed; 0 turns the check off.",
    )
    rate_window_seconds: float = Field(
        10.0, gt=0, description="The window over which min_bytes_per_second is measured."
    )
    ack_send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A peer that does not take our ACK within this long (it stopped reading) is "
        "disconnected.",
    )
    max_connections: int = Field(
        100,
        ge=1,
        description="Open connections allowed at once. At the cap a new connection closes an idle one "
        "(between frames), if there is one, and is refused otherwise.",
    )
    max_connections_per_source: int = Field(
        20,
        ge=1,
        description="Open connections allowed from one source address. At the cap a new connection "
        "from it closes that source's longest-idle connection, if one is idle, and is refused otherwise.",
    )
    process_buffer_budget_bytes: int = Field(
        256 * MIB,
        ge=1,
        description="Bytes of unfinished and in-process frames that all MLLP connections of the "
        "process may hold together (the smallest value among running MLLP channels applies). Past it "
        "the connection holding the largest unfinished frame is closed without an answer.",
    )
    listen_backlog: int = Field(
        1024,
        ge=1,
        le=65535,
        description="Connections the kernel queues before the listener accepts them (capped by the "
        "OS, net.core.somaxconn on Linux). A full queue makes new senders wait for SYN retransmits "
        "(1 s, 3 s, ...), so keep it well above the connection churn of a busy second.",
    )
    read_chunk_bytes: int = Field(
        65536, ge=512, le=16 * MIB, description="Bytes read from a socket per read call."
    )
    allow_from: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_ONLY),
        description="Source addresses allowed to connect, as CIDR networks (IPv4 and IPv6); other "
        "sources are closed at once. Default (key absent): loopback only, 127.0.0.0/8 and ::1; "
        "[0.0.0.0/0, ::/0] allows every source",
    )
    tls: MllpTlsSettings | None = Field(
        None,
        description="MLLP over TLS (TLS 1.2 or later), optionally with client certificates (mTLS); "
        "absent: plain TCP unless HMS_ACH_MLLP_TLS_CERT is set",
    )

    @field_validator("allow_from")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)

    @model_validator(mode="after")
    def _budget_holds_one_message(self) -> Self:
        if self.max_message_bytes * 4 > self.process_buffer_budget_bytes * 3:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must not exceed three quarters of "
                f"process_buffer_budget_bytes ({self.process_buffer_budget_bytes}): large frames "
                "may hold only that much of the budget, so a message of the maximum size could "
                "never be buffered"
            )
        return self


@dataclass(slots=True, eq=False)
class _Connection:
    """One open connection: what the listener, the admission rule and the budget know of it."""

    peer: str  # host:port, for the logs
    source: str  # host: the unit of max_connections_per_source
    writer: asyncio.StreamWriter | None  # None while its TLS handshake runs
    framer: MllpFramer
    clock: FrameClock
    busy: bool = False  # True while a frame of this connection is being handled or answered
    held_back: bool = False  # True while its large frame waits for buffer room, unread
    frames_seen: int = 0  # frames completed (Frame or OversizeFrame)
    bytes_received: int = 0
    garbage_bytes: int = 0  # bytes discarded outside frames
    truncated_frames: int = 0  # frames cut short by a VT
    close_reason: str | None = None  # set when the listener decided to close it
    #: The task serving it: closing it during its TLS handshake (no writer yet) cancels the handshake
    task: asyncio.Task[Any] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set with close_reason

    @property
    def idle_since(self) -> float:
        return self.clock.idle_since

    @property
    def evictable(self) -> bool:
        return not self.busy and not self.framer.in_frame and self.close_reason is None

    @property
    def open_frame_since(self) -> float | None:
        if self.busy or not self.framer.in_frame or self.close_reason is not None:
            return None
        return self.clock.frame_started

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close from outside its task: drop its unfinished frame now, close (or reset) the socket;
        its task then sees EOF and ends with ``reason``."""
        if self.close_reason is None:
            self.close_reason = reason
        self.closed.set()
        self.framer.abandon()
        if self.writer is None:
            if self.task is not None:
                self.task.cancel()
        elif abort:
            self.writer.transport.abort()
        else:
            self.writer.close()


#: Reasons to close a TLS connection before its first frame.
TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
TLS_SUBJECT_REFUSED = "tls_subject_refused"

#: Reasons to close a connection that count against its source (see SourceStrikes): misbehaving
#: inside a frame, or sitting idle without ever completing a frame.
_STRIKING = frozenset({FRAME_TIMEOUT, FRAME_TOO_SLOW, BUFFER_BUDGET})
_STRIKING_IF_FRAMELESS = frozenset({IDLE_TIMEOUT, EVICTED, TLS_HANDSHAKE_FAILED, TLS_SUBJECT_REFUSED})

#: A source's refused connections are logged once per this many seconds (with a count).
REJECTION_LOG_SECONDS = 10.0

#: The buffer budget every :class:`MllpServer` of the process shares unless given its own.
PROCESS_BUFFER_BUDGET: BufferBudget[_Connection] = BufferBudget(
    MllpConfig.model_fields["process_buffer_budget_bytes"].default
)


def _tls_fields(conn: _Connection) -> dict[str, Any]:
    """The TLS facts of a connection for ``mllp.connection_opened`` (none over plain TCP)."""
    ssl_object = conn.writer.get_extra_info("ssl_object") if conn.writer is not None else None
    if ssl_object is None:
        return {}
    subject = conn.peer.cert_subject if isinstance(conn.peer, Peer) else None
    fields: dict[str, Any] = {"tls": ssl_object.version()}
    if subject is not None:
        fields["subject"] = subject.rfc4514
    return fields


async def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on the first address ``host`` resolves to."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _peer_of(peer: Any) -> tuple[str, str]:
    """(``host:port``, ``host``) of a peer address (``peername``)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    return str(peer), str(peer)


class MllpServer:
    """An MLLP listener on ``asyncio.start_server``; see the module docstring for the behaviour.

    ``handler(payload, peer)`` returns the ACK to send (encoded, without MLLP framing), a list of
    ACKs sent one after the other (each its own frame), or None.
    ``on_oversize(prefix, size, peer)`` (plain or async) returns the AR for a frame over the limit,
    after which the connection keeps going; without it, or when it returns None, the connection
    is closed. ``budget`` is the buffer budget to share (the process-wide one by default).

    Limits (:mod:`hms_ach.hl7v2.mllp_limits`): the idle, frame and rate clocks of each connection,
    the per-source and total connection caps with eviction of idle connections, and the buffer
    budget. Each closes a connection with a structured ``mllp.*`` event naming the peer and the
    reason, never the payload.
    """

    def __init__(
        self,
        config: MllpConfig,
        handler: FrameHandler,
        on_oversize: OversizeHandler | None = None,
        budget: BufferBudget[_Connection] | None = None,
    ):
        self.config = config
        self._handler = handler
        self._on_oversize = on_oversize
        self._budget = PROCESS_BUFFER_BUDGET if budget is None else budget
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._strikes = SourceStrikes()
        self._rejections: dict[str, tuple[int, float]] = {}  # source -> (not logged, last logged)
        self._stopping = False
        self._allow_from = SourceAllowList(config.allow_from)
        self._listener: socket.socket | None = None  # the listening socket of a TLS listener
        self._accept_task: asyncio.Task[None] | None = None
        #: The server TLS context (built from ``config.tls``; TlsConfigError when unusable), or None.
        self.ssl_context: ssl.SSLContext | None = config.tls.context("tls") if config.tls else None

    @property
    def port(self) -> int:
        """The bound port (the OS-chosen one when configured with port 0)."""
        if self._listener is not None:
            return int(self._listener.getsockname()[1])
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MllpServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of frames held by this listener's connections now (unfinished or being handled)."""
        return sum(self._budget.held_by(conn) for conn in self._connections.values())

    async def start(self) -> None:
        self._stopping = False
        limit = max(self.config.read_chunk_bytes, 65536)
        if self.ssl_context is None:
            self._server = await asyncio.start_server(
                self._serve,
                self.config.host,
                self.config.port,
                limit=limit,
                backlog=self.config.listen_backlog,
            )
        else:
            # TLS: our own accept loop, so that a connection is checked (allow_from, the caps) before
            # its handshake and counts against the caps during it; the loop's TLS layer then takes
            # the socket over before a byte is read from it
            self._listener = await _listen(self.config.host, self.config.port, self.config.listen_backlog)
            self._accept_task = asyncio.create_task(self._accept(self._listener, limit))
        self._budget.register(self, self.config.process_buffer_budget_bytes)
        _event(logging.INFO, "mllp.listening", host=self.config.host, port=self.port)

    def stop_accepting(self) -> None:
        """Stop listening (idempotent). Connections between frames (or whose large frame is held
        back for buffer room) are closed now; a connection inside a frame or being answered may
        finish that frame and get its ACK, then is closed."""
        if (self._server is None and self._listener is None) or self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        for conn in self._connections.values():
            if conn.evictable or conn.held_back:  # a held-back frame may never get its room
                conn.close("server_stopping", abort=conn.held_back)

    async def close(self, grace_seconds: float = 10.0) -> None:
        """:meth:`stop_accepting`, then wait up to ``grace_seconds`` for the connections still
        finishing a frame, cancel those left, and return when all are gone."""
        if self._server is None and self._listener is None:
            return
        self.stop_accepting()
        if self._accept_task is not None:
            await asyncio.gather(self._accept_task, return_exceptions=True)
        tasks = list(self._connections)
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._listener = None
        self._accept_task = None
        self._budget.unregister(self)
        _event(logging.INFO, "mllp.stopped")

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one plain-TCP connection (the callback of ``asyncio.start_server``)."""
        peer, source = _peer_of(writer.get_extra_info("peername"))
        conn = self._open(peer, source, writer)
        if conn is None:
            writer.transport.abort()
            return
        await self._run(conn, reader)

    async def _accept(self, listener: socket.socket, limit: int) -> None:
        """The accept loop of a TLS listener: one task per connection, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors...: the kernel queues meanwhile
                if self._stopping:
                    return
                _event(logging.WARNING, "mllp.accept_failed", error=type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            # the task registers itself in _connections (close() waits for it there)
            asyncio.get_running_loop().create_task(self._serve_tls(sock, address, limit))

    async def _serve_tls(self, sock: socket.socket, address: Any, limit: int) -> None:
        """Serve one TLS connection: the checks, the handshake (within its deadline), the client
        certificate's subject, then frames as over plain TCP."""
        peer, source = _peer_of(address)
        conn = self._open(peer, source, None)
        if conn is None:
            sock.close()
            return
        tls, context = self.config.tls, self.ssl_context
        assert tls is not None and context is not None  # only TLS listeners accept here
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            # (uvloop returns its TLS protocol, not ours, as the second item: ours is kept here)
            transport, _protocol = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=context,
                ssl_handshake_timeout=tls.handshake_timeout_seconds,
            )
        except asyncio.CancelledError:
            sock.close()
            if conn.close_reason is None:  # cancelled from outside, not closed by this listener
                self._forget(conn)
                raise
            self._closed(conn, conn.close_reason)
            return
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            sock.close()
            detail = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
            _event(logging.WARNING, "mllp.tls_handshake_failed", peer=peer, error=detail)
            self._closed(conn, TLS_HANDSHAKE_FAILED)
            return
        conn.writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if conn.close_reason is None:
            ssl_object = conn.writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            subject = subject_of(der)
            conn.peer = Peer(peer, source, subject)
            if not subject_allowed(subject, tls.allowed_subjects):
                _event(
                    logging.WARNING,
                    "mllp.tls_subject_refused",
                    peer=peer,
                    subject=subject.rfc4514 if subject else "-",
                )
                conn.close_reason = TLS_SUBJECT_REFUSED
        await self._run(conn, reader)

    def _open(self, peer: str, source: str, writer: asyncio.StreamWriter | None) -> _Connection | None:
        """Check a new connection (allow_from, then the caps) and register it under the current
        task; None when it is refused (the caller closes it)."""
        if not self._allow_from.allows(source):
            self._log_rejection(peer, source, "allow_from", len(self._connections))
            return None
        if not self._admit(peer, source):
            return None
        task = asyncio.current_task()
        assert task is not None  # we always run inside a task of our own
        cfg = self.config
        clock = FrameClock(
            idle_timeout_seconds=cfg.idle_timeout_seconds,
            frame_timeout_seconds=cfg.frame_timeout_seconds,
            min_bytes_per_second=cfg.min_bytes_per_second,
            rate_window_seconds=cfg.rate_window_seconds,
            now=asyncio.get_running_loop().time(),
        )
        conn = _Connection(Peer(peer, source), source, writer, MllpFramer(cfg.max_message_bytes), clock)
        conn.task = task
        self._connections[task] = conn
        return conn

    async def _run(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        """Read and answer frames until the connection ends; then close it and log why."""
        writer = conn.writer
        assert writer is not None  # the handshake, if any, is done
        reason = conn.close_reason or "eof"
        try:
            if conn.close_reason is None:
                _event(logging.INFO, "mllp.connection_opened", peer=str(conn.peer), **_tls_fields(conn))
                reason = await self._read_loop(reader, conn)
        except (ConnectionError, OSError) as exc:
            reason = conn.close_reason or f"network_error:{type(exc).__name__}"
        finally:
            try:
                conn.framer.abandon()
                self._budget.release(conn)
                writer.close()
                with suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            finally:
                self._closed(conn, reason)

    def _closed(self, conn: _Connection, reason: str) -> None:
        """The connection is gone: strike its source if it misbehaved, log, and forget it."""
        try:
            if reason in _STRIKING or (reason in _STRIKING_IF_FRAMELESS and conn.frames_seen == 0):
                self._strikes.strike(conn.source, asyncio.get_running_loop().time())
            extra = {"garbage_bytes": conn.garbage_bytes, "truncated_frames": conn.truncated_frames}
            _event(
                logging.INFO,
                "mllp.connection_closed",
                peer=str(conn.peer),
                reason=reason,
                frames=conn.frames_seen,
                bytes=conn.bytes_received,
                **{k: v for k, v in extra.items() if v},
            )
        finally:
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        """Drop the connection (only at its very end, so that close() waits for its task)."""
        if conn.task is not None:
            self._connections.pop(conn.task, None)

    def _admit(self, peer: str, source: str) -> bool:
        """Apply the connection caps to a new connection (closing an idle one to make room)."""
        if self._stopping:
            _event(logging.INFO, "mllp.connection_rejected", peer=peer, limit="server_stopping")
            return False
        open_now = [c for c in self._connections.values() if c.close_reason is None]
        decision = admit(
            open_now,
            source,
            max_connections=self.config.max_connections,
            max_connections_per_source=self.config.max_connections_per_source,
            now=asyncio.get_running_loop().time(),
            strikes=self._strikes,
        )
        if not decision.admitted:
            self._log_rejection(peer, source, decision.limit, len(open_now))
            return False
        if decision.evict is not None:
            victim = decision.evict
            in_frame = victim.framer.in_frame
            since = victim.clock.frame_started if in_frame else victim.idle_since
            _event(
                logging.INFO,
                "mllp.connection_evicted",
                peer=victim.peer,
                limit=decision.limit,
                in_frame=in_frame,
                seconds=round(asyncio.get_running_loop().time() - since, 3),
                frames=victim.frames_seen,
            )
            victim.close(EVICTED, abort=in_frame)
        return True

    def _log_rejection(self, peer: str, source: str, limit: str, open_count: int) -> None:
        """Log a refused connection: the first of a source, then one line per source every
        REJECTION_LOG_SECONDS with how many were refused meanwhile (a flood is not a log flood)."""
        now = asyncio.get_running_loop().time()
        count, last = self._rejections.get(source, (0, -REJECTION_LOG_SECONDS))
        if now - last < REJECTION_LOG_SECONDS:
            self._rejections[source] = (count + 1, last)
            return
        if len(self._rejections) >= 4096:
            self._rejections.clear()
        self._rejections[source] = (0, now)
        _event(
            logging.WARNING,
            "mllp.connection_rejected",
            peer=peer,
            limit=limit,
            open=open_count,
            max_connections=self.config.max_connections,
            max_connections_per_source=self.config.max_connections_per_source,
            not_logged_before=count,
        )

    async def _read_loop(self, reader: asyncio.StreamReader, conn: _Connection) -> str:
        loop = asyncio.get_running_loop()
        framer, clock, budget = conn.framer, conn.clock, self._budget
        while True:
            if conn.close_reason is not None:
                return conn.close_reason
            if self._stopping and not framer.in_frame:
                return "server_stopping"
            room = self._room_to_wait_for(conn)
            if room:
                reason = await self._wait_for_room(conn, room)
                if reason is not None:
                    return reason
                continue
            try:
                async with asyncio.timeout_at(clock.deadline()):
                    chunk = await reader.read(self.config.read_chunk_bytes)
            except TimeoutError:
                reason = clock.expired(loop.time())
                if reason is None:
                    continue
                self._limit_event(conn, reason)
                return reason
            if conn.close_reason is not None:
                return conn.close_reason
            conn.bytes_received += len(chunk)
            if chunk and not self._claim(conn, len(chunk)):
                return BUFFER_BUDGET
            events = framer.feed(chunk) if chunk else framer.finish()
            completed = sum(isinstance(e, (Frame, OversizeFrame)) for e in events)
            conn.frames_seen += completed
            clock.received(loop.time(), len(chunk), in_frame=framer.in_frame, completed=completed > 0)
            pinned = sum(len(e.payload) for e in events if isinstance(e, Frame))
            budget.hold(conn, framer.buffered_bytes, pinned)
            if events:
                conn.busy = True
                try:
                    for event in events:
                        ok = await self._on_event(event, conn)
                        if isinstance(event, Frame):
                            pinned -= len(event.payload)
                            budget.hold(conn, framer.buffered_bytes, pinned)
                        if conn.close_reason is not None:
                            return conn.close_reason
                        if not ok:
                            return "handler_failed" if isinstance(event, Frame) else "oversize"
                finally:
                    conn.busy = False
                if completed:
                    clock.answered(loop.time())
            if not chunk:
                return "eof"
            reason = clock.expired(loop.time())
            if reason is not None:
                self._limit_event(conn, reason)
                return reason

    async def _wait_for_room(self, conn: _Connection, room: int) -> str | None:
        """Hold a large frame back, unread, until the budget has ``room`` free; None then.

        Meanwhile the frame clock runs but the rate clock does not (the window restarts after).
        When no room comes for ``rate_window_seconds``, the connection holding the largest
        unfinished frame (possibly this one) is closed to make some. A close from outside
        (eviction, stop) ends the wait at once. Returns the reason to close this connection."""
        loop = asyncio.get_running_loop()
        while True:
            waiter = asyncio.ensure_future(self._budget.wait_for_room(room))
            closed = asyncio.ensure_future(conn.closed.wait())
            frame_left = conn.clock.frame_deadline() - loop.time()
            timeout = max(0.0, min(frame_left, self.config.rate_window_seconds))
            conn.held_back = True
            try:
                done, _pending = await asyncio.wait(
                    {waiter, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                conn.held_back = False
                waiter.cancel()
                closed.cancel()
            if conn.close_reason is not None:
                return conn.close_reason
            if done:
                conn.clock.resumed(loop.time())
                return None
            if loop.time() >= conn.clock.frame_deadline():
                self._limit_event(conn, FRAME_TIMEOUT)
                return FRAME_TIMEOUT
            if self._budget.room_for(room):
                continue
            victim = self._budget.largest()
            if victim is None:
                continue
            self._budget_event(victim)
            self._budget.drop(victim)
            if victim is conn:
                conn.framer.abandon()
                return BUFFER_BUDGET
            victim.close(BUFFER_BUDGET, abort=True)

    def _room_to_wait_for(self, conn: _Connection) -> int:
        """The free budget this connection must wait for before it is read further, or 0 (read now).

        Large unfinished frames (over budget / (4 x max_connections)) may fill only three quarters
        of the budget; the last quarter is kept for small frames (every connection may hold one),
        so that ordinary messages are read at once however full the budget is."""
        chunk = self.config.read_chunk_bytes
        limit = self._budget.limit_bytes
        small = max(chunk, limit // (4 * self.config.max_connections))
        if conn.framer.buffered_bytes < small or self._budget.room_for(chunk + limit // 4):
            return 0
        return chunk + limit // 4

    def _claim(self, conn: _Connection, nbytes: int) -> bool:
        """Make room in the buffer budget for ``nbytes`` more of this connection; False when this
        connection is the one to go (it holds the largest unfinished frame)."""
        victims = self._budget.claim(conn, conn.framer.buffered_after(nbytes))
        if not victims:
            return True
        for victim in victims:
            self._budget_event(victim)
            if victim is conn:
                conn.framer.abandon()
                conn.close_reason = BUFFER_BUDGET
                conn.closed.set()
            else:
                victim.close(BUFFER_BUDGET, abort=True)
        return conn.close_reason is None

    def _budget_event(self, victim: _Connection) -> None:
        _event(
            logging.WARNING,
            "mllp.buffer_budget_exceeded",
            peer=victim.peer,
            buffered=victim.framer.buffered_bytes,
            budget_bytes=self._budget.limit_bytes,
            used_bytes=self._budget.used_bytes,
        )

    def _limit_event(self, conn: _Connection, reason: str) -> None:
        cfg = self.config
        if reason == IDLE_TIMEOUT:
            _event(
                logging.INFO,
                "mllp.idle_timeout",
                peer=conn.peer,
                seconds=cfg.idle_timeout_seconds,
                in_frame=conn.framer.in_frame,
            )
        elif reason == FRAME_TIMEOUT:
            _event(logging.WARNING, "mllp.frame_timeout", peer=conn.peer, seconds=cfg.frame_timeout_seconds)
        else:
            _event(
                logging.WARNING,
                "mllp.frame_too_slow",
                peer=conn.peer,
                min_bytes_per_second=cfg.min_bytes_per_second,
                window_seconds=cfg.rate_window_seconds,
            )

    async def _on_event(self, event: FrameEvent, conn: _Connection) -> bool:
        """Act on one framing event; False means: close this connection now."""
        peer = conn.peer
        # the first of each per connection is logged, the rest are counted in mllp.connection_closed
        # (a stream of junk or of VTs must not turn into a stream of log lines)
        if isinstance(event, Garbage):
            if not conn.garbage_bytes:
                _event(logging.WARNING, "mllp.garbage_discarded", peer=peer, bytes=event.size)
            conn.garbage_bytes += event.size
            return True
        if isinstance(event, TruncatedFrame):
            if not conn.truncated_frames:
                _event(logging.WARNING, "mllp.truncated_frame", peer=peer, bytes=event.size)
            conn.truncated_frames += 1
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
        writer = conn.writer
        if conn.close_reason is not None or writer is None:
            return False
        writer.write(frame(ack))
        try:
            async with asyncio.timeout(self.config.ack_send_timeout_seconds):
                await writer.drain()
        except TimeoutError:
            _event(logging.WARNING, "mllp.send_timeout", peer=conn.peer)
            return False
        _event(logging.DEBUG, "mllp.ack_sent", peer=conn.peer, bytes=len(ack))
        return True
