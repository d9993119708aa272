"""The limits of the MLLP listener that no single read can enforce, as socket-free pieces.

:class:`FrameClock`
    When the next read of a connection must complete, and why the connection is closed when it
    does not. Three clocks, none of which a byte of chatter resets:

    * **idle** (outside a frame): a frame must start within ``idle_timeout_seconds`` of the end of
      the previous frame's answer (or of the connection's start). CR, LF or garbage between frames
      do not count as activity.
    * **frame**: a frame must end (FS) within ``frame_timeout_seconds`` of the VT that opened it.
      A VT inside a frame (a truncated frame restarted) does not restart this clock.
    * **rate** (inside a frame): over each window of ``rate_window_seconds`` the frame must bring at
      least ``min_bytes_per_second`` on average. Time the listener itself spends not reading (while
      it answers, or while the frame waits for buffer room) does not count against the sender.

:class:`BufferBudget`
    The bytes of unfinished frames that all the connections sharing it may hold together. A
    connection claims room for each chunk it buffers; when the claim does not fit, the holders of
    the most buffered bytes are named for eviction (possibly the claimant itself) until it fits.
    The listener lets only small frames claim like that; a large frame waits for room first
    (:meth:`BufferBudget.wait_for_room`), so that a full budget stops reading instead of churning,
    and when no room comes for a rate window the largest unfinished frame is dropped
    (:meth:`BufferBudget.largest`, :meth:`BufferBudget.drop`).

:func:`admit` and :class:`SourceStrikes`
    Whether a new connection from a source address is let in, and which open connection, if any,
    makes room for it: per-source and total caps, evicting an idle connection (between frames and
    not being answered), or one stuck in a frame for a second or more, rather than refusing a new
    sender while such holders sit on every slot. Sources whose connections were recently closed
    by a limit (strikes) may take free slots only, and their connections are evicted first.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

#: Reasons a connection is closed by a limit (they appear as ``reason=`` in the logs).
IDLE_TIMEOUT = "idle_timeout"
FRAME_TIMEOUT = "frame_timeout"
FRAME_TOO_SLOW = "frame_too_slow"
BUFFER_BUDGET = "buffer_budget"
EVICTED = "evicted_for_new_connection"
PER_SOURCE_LIMIT = "per_source_limit"
MAX_CONNECTIONS = "max_connections"


class FrameClock:
    """The idle, frame and rate clocks of one connection (times from one monotonic clock)."""

    def __init__(
        self,
        *,
        idle_timeout_seconds: float,
        frame_timeout_seconds: float,
        min_bytes_per_second: float,
        rate_window_seconds: float,
        now: float,
    ):
        self.idle_timeout_seconds = idle_timeout_seconds
        self.frame_timeout_seconds = frame_timeout_seconds
        self.min_bytes_per_second = min_bytes_per_second
        self.rate_window_seconds = rate_window_seconds
        self.idle_since = now
        self.in_frame = False
        self.frame_started = now
        self._window_started = now
        self._window_bytes = 0

    def received(self, now: float, nbytes: int, *, in_frame: bool, completed: bool) -> None:
        """A chunk of ``nbytes`` was read at ``now``; after it a frame is open (``in_frame``) or not,
        and ``completed`` says whether a frame ended (FS) inside it."""
        if in_frame and (completed or not self.in_frame):
            self.frame_started = self._window_started = now  # a new frame opened in this chunk
            self._window_bytes = 0
        elif in_frame:
            self._window_bytes += nbytes
        elif completed:
            self.idle_since = now
        self.in_frame = in_frame

    def answered(self, now: float) -> None:
        """The frames of a chunk were handled and answered: the idle clock restarts, and so does the
        rate window of a frame that kept arriving meanwhile (it was not being read)."""
        self.idle_since = now
        self._window_started = now
        self._window_bytes = 0

    def resumed(self, now: float) -> None:
        """The frame was held back (waiting for buffer room) and is read again: the rate window
        restarts, since the sender was not slow; the frame clock keeps running."""
        self._window_started = now
        self._window_bytes = 0

    def frame_deadline(self) -> float:
        """When the open frame must have ended (meaningful inside a frame)."""
        return self.frame_started + self.frame_timeout_seconds

    def deadline(self) -> float:
        """The time by which the next read must bring something, or :meth:`expired` is to be asked."""
        if not self.in_frame:
            return self.idle_since + self.idle_timeout_seconds
        end = self.frame_started + self.frame_timeout_seconds
        if self.min_bytes_per_second > 0:
            end = min(end, self._window_started + self.rate_window_seconds)
        return end

    def expired(self, now: float) -> str | None:
        """The reason to close the connection at ``now``, or None; a rate window that has run its
        course and was fast enough is closed and the next one starts."""
        if not self.in_frame:
            return IDLE_TIMEOUT if now >= self.idle_since + self.idle_timeout_seconds else None
        if now >= self.frame_started + self.frame_timeout_seconds:
            return FRAME_TIMEOUT
        if self.min_bytes_per_second > 0 and now >= self._window_started + self.rate_window_seconds:
            elapsed = now - self._window_started
            if self._window_bytes < self.min_bytes_per_second * elapsed:
                return FRAME_TOO_SLOW
            self._window_started = now
            self._window_bytes = 0
        return None


H = TypeVar("H", bound=Hashable)


@dataclass(slots=True)
class _Holding:
    buffered: int = 0  # bytes of an unfinished frame: freed when the holder is evicted
    pinned: int = 0  # bytes of complete frames being handled: freed when the handler returns


class BufferBudget(Generic[H]):
    """Bytes of unfinished frames that every connection sharing this budget may hold together.

    The limit is the smallest of the limits registered by the listeners using the budget (one
    process-wide budget serves every MLLP channel), or ``default_limit_bytes`` when none is.
    """

    def __init__(self, default_limit_bytes: int):
        if default_limit_bytes < 1:
            raise ValueError("default_limit_bytes must be at least 1")
        self.default_limit_bytes = default_limit_bytes
        self._limits: dict[int, int] = {}
        self._holdings: dict[H, _Holding] = {}
        self._used = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def limit_bytes(self) -> int:
        return min(self._limits.values(), default=self.default_limit_bytes)

    @property
    def used_bytes(self) -> int:
        return self._used

    def register(self, owner: object, limit_bytes: int) -> None:
        """``owner`` (a listener) uses this budget with at most ``limit_bytes`` for all its users."""
        self._limits[id(owner)] = limit_bytes

    def unregister(self, owner: object) -> None:
        self._limits.pop(id(owner), None)

    def room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit without evicting anyone."""
        return self._used + nbytes <= self.limit_bytes

    async def wait_for_room(self, nbytes: int) -> None:
        """Return once ``nbytes`` more fit (the caller bounds the wait with its own deadline)."""
        while not self.room_for(nbytes):
            waiter = asyncio.get_running_loop().create_future()
            entry = (nbytes, waiter)
            self._waiters.append(entry)
            try:
                await waiter
            finally:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def held_by(self, holder: H) -> int:
        holding = self._holdings.get(holder)
        return 0 if holding is None else holding.buffered + holding.pinned

    def claim(self, holder: H, buffered: int) -> list[H]:
        """``holder`` is about to hold up to ``buffered`` bytes of an unfinished frame. Returns the
        holders to evict so that the total fits, largest unfinished frame first; the list may name
        ``holder`` itself (then it gets no room). An evicted holder's unfinished bytes are counted
        as freed at once: the caller must drop them."""
        self._set(holder, buffered, None)
        victims: list[H] = []
        limit = self.limit_bytes
        while self._used > limit:
            victim = max(self._holdings, key=lambda h: self._holdings[h].buffered, default=None)
            if victim is None or self._holdings[victim].buffered == 0:
                if holder not in victims:  # only pinned bytes left: the claimant cannot have room
                    victims.append(holder)
                    self._set(holder, 0, None)
                break
            victims.append(victim)
            self._set(victim, 0, None)
        return victims

    def largest(self) -> H | None:
        """The holder of the largest unfinished frame, or None when nobody holds one."""
        victim = max(self._holdings, key=lambda h: self._holdings[h].buffered, default=None)
        return victim if victim is not None and self._holdings[victim].buffered > 0 else None

    def drop(self, holder: H) -> None:
        """``holder``'s unfinished frame is dropped (evicted): its bytes are free now."""
        if holder in self._holdings:
            self._set(holder, 0, None)

    def hold(self, holder: H, buffered: int, pinned: int) -> None:
        """Record what ``holder`` holds now (never more than it claimed; nobody is evicted)."""
        self._set(holder, buffered, pinned)

    def release(self, holder: H) -> None:
        """``holder`` holds nothing any more (its connection closed)."""
        holding = self._holdings.pop(holder, None)
        if holding is not None:
            self._used -= holding.buffered + holding.pinned
            self._wake()

    def _set(self, holder: H, buffered: int, pinned: int | None) -> None:
        holding = self._holdings.get(holder)
        if holding is None:
            holding = self._holdings[holder] = _Holding()
        before = self._used
        self._used -= holding.buffered + holding.pinned
        holding.buffered = buffered
        if pinned is not None:
            holding.pinned = pinned
        self._used += holding.buffered + holding.pinned
        if self._used < before:
            self._wake()

    def _wake(self) -> None:
        """Wake the waiters whose room is there now (only those: a waiter woken for nothing costs)."""
        if not self._waiters:
            return
        room = self.limit_bytes - self._used
        still: list[tuple[int, asyncio.Future[None]]] = []
        for nbytes, waiter in self._waiters:
            if nbytes > room:
                still.append((nbytes, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._waiters = still


class SourceStrikes:
    """Which source addresses recently had a connection closed by a limit (inside a frame: the
    frame or rate clock or the buffer budget; idle or evicted: only if it never completed a frame):
    a strike each, forgotten after ``memory_seconds`` without a new one. At the total cap, connections of struck sources are
    evicted before those of sources in good standing, so that a flood of abusive connections
    recycles itself rather than the connection a legitimate sender has just opened."""

    def __init__(self, memory_seconds: float = 60.0, max_sources: int = 4096):
        self.memory_seconds = memory_seconds
        self.max_sources = max_sources
        self._strikes: dict[str, tuple[int, float]] = {}

    def strike(self, source: str, now: float) -> None:
        count = self.count(source, now)
        self._strikes.pop(source, None)
        self._strikes[source] = (count + 1, now)  # re-inserted: the dict stays oldest-first
        if len(self._strikes) > self.max_sources:
            for old in list(self._strikes)[: len(self._strikes) // 2]:
                del self._strikes[old]

    def count(self, source: str, now: float) -> int:
        entry = self._strikes.get(source)
        if entry is None or now - entry[1] >= self.memory_seconds:
            return 0
        return entry[0]


#: A frame open this long is far slower than any sender on a working network: when every slot is
#: taken and none is idle, the connection holding the oldest such frame makes room for a new one.
STALE_FRAME_SECONDS = 1.0


class Slot(Protocol):
    """What :func:`admit` needs to know about an open connection."""

    @property
    def source(self) -> str:
        """The peer's address (without the port)."""
        ...

    @property
    def idle_since(self) -> float:
        """When its last frame was answered, or when it opened."""
        ...

    @property
    def evictable(self) -> bool:
        """Between frames and not being answered: closing it loses nothing."""
        ...

    @property
    def frames_seen(self) -> int:
        """Frames it has completed."""
        ...

    @property
    def open_frame_since(self) -> float | None:
        """When its unfinished frame began, or None (no frame open, or one being answered)."""
        ...


S = TypeVar("S", bound=Slot)


@dataclass(frozen=True)
class Admission(Generic[S]):
    """The answer of :func:`admit`: ``admitted``, the connection to close to make room (if any),
    and the limit that was met (``""`` when none was)."""

    admitted: bool
    evict: S | None
    limit: str


def _stale_frame(slots: Sequence[S], now: float) -> S | None:
    """The connection whose unfinished frame is the oldest, if it is older than STALE_FRAME_SECONDS."""
    started = [(s.open_frame_since, s) for s in slots if s.open_frame_since is not None]
    if not started:
        return None
    since, oldest = min(started, key=lambda pair: pair[0])
    return oldest if now - since >= STALE_FRAME_SECONDS else None


def admit(
    open_slots: Sequence[S],
    source: str,
    *,
    max_connections: int,
    max_connections_per_source: int,
    now: float,
    strikes: SourceStrikes | None = None,
) -> Admission[S]:
    """Decide on a new connection from ``source`` given the connections open now.

    * Under both caps: admitted.
    * At a cap, a source with ``strikes`` is refused: it may take a free slot, never evict.
    * ``source`` already holds ``max_connections_per_source``: its own longest-idle evictable
      connection makes room, else its oldest frame open for STALE_FRAME_SECONDS or more; with
      neither, the new connection is refused. Other sources are never touched on its behalf.
    * The total is at ``max_connections``: an evictable connection makes room, chosen as the one
      that never completed a frame, then the one whose source has the most ``strikes``, then the
      one whose source holds the most connections, then the longest idle; with none idle, the
      oldest frame open for STALE_FRAME_SECONDS or more. With neither (every connection is being
      answered or inside a young frame) it is refused.
    """
    same = [s for s in open_slots if s.source == source]
    at_cap = len(same) >= max_connections_per_source or len(open_slots) >= max_connections
    if at_cap and strikes is not None and strikes.count(source, now):
        limit = PER_SOURCE_LIMIT if len(same) >= max_connections_per_source else MAX_CONNECTIONS
        return Admission(False, None, limit)  # a struck source takes free slots only
    if len(same) >= max_connections_per_source:
        victim = min((s for s in same if s.evictable), key=lambda s: s.idle_since, default=None)
        victim = victim or _stale_frame(same, now)
        return Admission(victim is not None, victim, PER_SOURCE_LIMIT)
    if len(open_slots) >= max_connections:
        per_source = Counter(s.source for s in open_slots)
        struck = {src: strikes.count(src, now) for src in per_source} if strikes else {}
        victim = min(
            (s for s in open_slots if s.evictable),
            key=lambda s: (s.frames_seen > 0, -struck.get(s.source, 0), -per_source[s.source], s.idle_since),
            default=None,
        )
        victim = victim or _stale_frame(open_slots, now)
        return Admission(victim is not None, victim, MAX_CONNECTIONS)
    return Admission(True, None, "")
