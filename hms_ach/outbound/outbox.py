"""The transactional outbox and its dispatcher.

* :func:`enqueue` writes an ``outbox_event`` row on the caller's connection, so an event exists
  exactly when the change that caused it committed (the change listener in
  :mod:`hms_ach.outbound.events` calls it; other code, e.g. the credential scheduler, may too).
* The :class:`Dispatcher` (an asyncio task per sink, started by :class:`hms_ach.app.runtime.Engine`)
  holds a lease on the sink's ``outbox_cursor`` row, fans new events out into ``outbox`` rows for
  the sinks whose filter wants them, and delivers those rows one by one in id order: a failing row
  holds back the ones after it (per-destination ordering), is retried with exponential backoff and
  full jitter, and goes to ``dead`` only once it is older than the sink's ``max_age_hours``.
* Several instances share the work on PostgreSQL: the lease is taken with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` and expires, so a killed instance's sinks are taken over and
  its unconfirmed row is delivered again (at least once; the idempotency key makes that harmless).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings
from hms_ach.store import fastexec
from hms_ach.store.db import Store
from hms_ach.store.models import OutboxCursor, OutboxEvent, OutboxRow

log = logging.getLogger("hms_ach.outbound.outbox")

EVENTS = OutboxEvent.__table__  # type: ignore[attr-defined]
ROWS = OutboxRow.__table__  # type: ignore[attr-defined]
CURSORS = OutboxCursor.__table__  # type: ignore[attr-defined]


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_ENQUEUE = insert(EVENTS).returning(
    EVENTS.c.id
)  # built once: enqueue runs on the write path of every record change


def enqueue(conn: Connection, event: str, payload: dict[str, Any]) -> int:
    """Write one event in the caller's transaction; returns its id. ``payload`` gets ``version: 1``."""
    body = {"version": 1, **payload}
    row = fastexec.first_row(
        conn,
        "outbox.enqueue",
        _ENQUEUE,
        {"event": event, "payload": orjson.dumps(body).decode(), "created_at": now()},
        EVENTS,
    )
    assert row is not None  # an INSERT .. RETURNING always has one
    return int(row[0])


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with full jitter: uniform in (0, min(maximum, initial * 2**(attempts-1))]."""
    ceiling = min(maximum, initial * (2 ** max(0, min(attempts - 1, 40))))
    return max(0.05, random.uniform(0, ceiling))


# ---------------------------------------------------------------------------- store operations
def _insert_fn(conn: Connection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


def ensure_cursor(conn: Connection, sink: SinkSettings) -> None:
    """Create the sink's cursor if it is new: at the newest event, or before the first with from_beginning."""
    if (
        conn.execute(select(CURSORS.c.destination).where(CURSORS.c.destination == sink.name)).first()
        is not None
    ):
        return
    start = 0
    if not sink.from_beginning:
        start = int(conn.execute(select(func.coalesce(func.max(EVENTS.c.id), 0))).scalar_one())
    conn.execute(
        _insert_fn(conn)(CURSORS)
        .values(destination=sink.name, last_event_id=start)
        .on_conflict_do_nothing(index_elements=["destination"])
    )


def take_lease(conn: Connection, sink: SinkSettings, owner: str, seconds: float) -> bool:
    """Take or renew the lease of ``sink`` for ``owner``; fan new events out to it. False: another has it."""
    ensure_cursor(conn, sink)
    row = conn.execute(
        select(CURSORS).where(CURSORS.c.destination == sink.name).with_for_update(skip_locked=True)
    ).first()
    if row is None:  # another instance holds the row lock right now
        return False
    t = now()
    if row.lease_owner not in (None, owner) and row.lease_until is not None and _aware(row.lease_until) > t:
        return False
    last = row.last_event_id
    events = conn.execute(
        select(EVENTS.c.id, EVENTS.c.event, EVENTS.c.created_at)
        .where(EVENTS.c.id > last)
        .order_by(EVENTS.c.id)
        .limit(1000)
    ).all()
    wanted = [e for e in events if sink.wants(e.event)]
    if wanted:
        conn.execute(
            insert(ROWS),
            [
                {
                    "destination": sink.name,
                    "event_id": e.id,
                    "event": e.event,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": t,
                    "created_at": e.created_at,
                    "retry_from": e.created_at,
                }
                for e in wanted
            ],
        )
    if events:
        last = events[-1].id
    conn.execute(
        update(CURSORS)
        .where(CURSORS.c.destination == sink.name)
        .values(last_event_id=last, lease_owner=owner, lease_until=t + timedelta(seconds=seconds))
    )
    return True


def release_lease(conn: Connection, destination: str, owner: str) -> None:
    conn.execute(
        update(CURSORS)
        .where(and_(CURSORS.c.destination == destination, CURSORS.c.lease_owner == owner))
        .values(lease_owner=None, lease_until=None)
    )


def pending_rows(conn: Connection, destination: str, limit: int = 50) -> list[Delivery | datetime]:
    """The next pending rows of a destination in id order; a not-yet-due head row is returned as its due time."""
    rows = conn.execute(
        select(
            ROWS.c.id,
            ROWS.c.event_id,
            ROWS.c.event,
            ROWS.c.attempts,
            ROWS.c.next_attempt_at,
            EVENTS.c.payload,
            EVENTS.c.created_at,
        )
        .join(EVENTS, EVENTS.c.id == ROWS.c.event_id)
        .where(and_(ROWS.c.destination == destination, ROWS.c.status == "pending"))
        .order_by(ROWS.c.id)
        .limit(limit)
    ).all()
    out: list[Delivery | datetime] = []
    t = now()
    for r in rows:
        if _aware(r.next_attempt_at) > t:
            out.append(_aware(r.next_attempt_at))
            break
        out.append(
            Delivery(
                r.id,
                r.event_id,
                r.event,
                orjson.loads(r.payload),
                _aware(r.created_at).isoformat().replace("+00:00", "Z"),
                r.attempts,
            )
        )
    return out


def mark_delivered(conn: Connection, row_id: int, result: DeliveryResult) -> None:
    conn.execute(
        update(ROWS)
        .where(ROWS.c.id == row_id)
        .values(
            status="delivered",
            delivered_at=now(),
            attempts=ROWS.c.attempts + 1,
            last_error=None,
            response=result.response[:4000] or None,
        )
    )
    for event, payload in result.followups:
        enqueue(conn, event, payload)


def mark_failed(conn: Connection, row_id: int, sink: SinkSettings, error: DeliveryError) -> str:
    """Schedule the next attempt, or dead-letter the row; returns the new status."""
    row = conn.execute(select(ROWS.c.attempts, ROWS.c.retry_from).where(ROWS.c.id == row_id)).one()
    attempts = row.attempts + 1
    t = now()
    delay = backoff_seconds(attempts, sink.retry_initial_seconds, sink.retry_max_seconds)
    if error.retry_after is not None:
        delay = max(delay, min(error.retry_after, sink.retry_max_seconds))
    too_old = t + timedelta(seconds=delay) - _aware(row.retry_from) > timedelta(hours=sink.max_age_hours)
    status = "dead" if error.permanent or too_old else "pending"
    conn.execute(
        update(ROWS)
        .where(ROWS.c.id == row_id)
        .values(
            status=status,
            attempts=attempts,
            next_attempt_at=t + timedelta(seconds=delay),
            last_error=str(error)[:4000],
            response=(error.response or "")[:4000] or None,
        )
    )
    return status


def retry(conn: Connection, row_id: int | None = None, *, dead: bool = False) -> int:
    """Put one row (or every dead row) back to pending, with a fresh retry window. Returns the count."""
    cond = ROWS.c.id == row_id if row_id is not None else ROWS.c.status == "dead"
    if row_id is None and not dead:
        return 0
    t = now()
    result = conn.execute(
        update(ROWS)
        .where(and_(cond, ROWS.c.status != "pending"))
        .values(status="pending", attempts=0, next_attempt_at=t, retry_from=t)
    )
    return int(result.rowcount)


def summary(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(ROWS.c.destination, ROWS.c.status, func.count())
        .group_by(ROWS.c.destination, ROWS.c.status)
        .order_by(ROWS.c.destination, ROWS.c.status)
    ).all()
    return [{"destination": d, "status": s, "count": n} for d, s, n in rows]


def list_rows(
    conn: Connection, status: str | None = None, destination: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    q = select(ROWS).order_by(ROWS.c.id.desc()).limit(limit)
    if status:
        q = q.where(ROWS.c.status == status)
    if destination:
        q = q.where(ROWS.c.destination == destination)
    return [dict(r._mapping) for r in conn.execute(q).all()]


def events_since(conn: Connection, after: int = 0) -> list[dict[str, Any]]:
    rows = conn.execute(select(EVENTS).where(EVENTS.c.id > after).order_by(EVENTS.c.id)).all()
    return [{"id": r.id, "event": r.event, "payload": orjson.loads(r.payload)} for r in rows]


# ---------------------------------------------------------------------------- the dispatcher
class Dispatcher:
    """Delivers the outbox rows of every enabled sink; one asyncio task per sink."""

    def __init__(
        self,
        store: Store,
        sinks: list[Any],
        *,
        poll_seconds: float = 0.25,
        lease_seconds: float = 30.0,
        owner: str | None = None,
    ):
        self.store = store
        self.sinks = sinks  # sink objects: .settings (SinkSettings), async deliver(Delivery), async close()
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self.delivered = 0

    async def start(self) -> None:
        """Register every sink's cursor (so a new sink starts at this point), then start delivering."""
        for sink in self.sinks:
            await asyncio.to_thread(self._tx, ensure_cursor, sink.settings)
        for sink in self.sinks:
            if sink.settings.enabled:
                self._tasks.append(asyncio.create_task(self._run(sink), name=f"outbox:{sink.settings.name}"))

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11 asyncio.wait_for can swallow a cancellation
        # that arrives just as its inner await completes, and the loop must end all the same.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, stuck = await asyncio.wait(self._tasks, timeout=30)
            for task in stuck:
                log.error("outbox.stop_timeout", extra={"task": task.get_name()})
        self._tasks.clear()
        for sink in self.sinks:
            try:
                await asyncio.to_thread(self._tx, release_lease, sink.settings.name, self.owner)
            except Exception:  # noqa: BLE001 - the lease expires anyway
                pass
            try:
                await sink.close()
            except Exception:  # noqa: BLE001
                log.warning("outbox.sink_close_failed", extra={"sink": sink.settings.name})

    def _tx(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.store.writer.begin() as conn:
            return fn(conn, *args, **kwargs)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(max(0.01, seconds)):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _run(self, sink: Any) -> None:
        settings: SinkSettings = sink.settings
        while not self._stopping:
            try:
                wait = await self._round(sink, settings)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again shortly
                log.error("outbox.dispatch_error", extra={"sink": settings.name, "error": str(exc)})
                wait = max(self.poll_seconds, 1.0)
            await self._sleep(wait)

    async def _round(self, sink: Any, settings: SinkSettings) -> float:
        """Deliver what is due; returns how long to wait before the next round."""
        has_lease = await asyncio.to_thread(self._tx, take_lease, settings, self.owner, self.lease_seconds)
        if not has_lease:
            return self.poll_seconds * 4
        batch = await asyncio.to_thread(self._tx, pending_rows, settings.name)
        for item in batch:
            if isinstance(item, datetime):
                return min(self.poll_seconds * 4, max(0.0, (item - now()).total_seconds()))
            try:
                async with asyncio.timeout(settings.timeout_seconds + 5):
                    result = await sink.deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is a retry unless it says otherwise
                error = (
                    exc if isinstance(exc, DeliveryError) else DeliveryError(f"{type(exc).__name__}: {exc}")
                )
                status = await asyncio.to_thread(self._tx, mark_failed, item.row_id, settings, error)
                log.warning(
                    "outbox.delivery_failed",
                    extra={
                        "sink": settings.name,
                        "row": item.row_id,
                        "event": item.event,
                        "status": status,
                        "error": str(error)[:200],
                    },
                )
                if status == "pending":
                    return self.poll_seconds  # the head row waits for its backoff: nothing after it goes
                continue
            await asyncio.to_thread(self._tx, mark_delivered, item.row_id, result)
            self.delivered += 1
            log.info(
                "outbox.delivered", extra={"sink": settings.name, "row": item.row_id, "event": item.event}
            )
        return 0.0 if len(batch) >= 50 else self.poll_seconds
