"""The outbox dispatcher: the delivery policy over the outbox tables (:mod:`hms_ach.store.outbox`).

* An event is written by :func:`hms_ach.store.outbox.enqueue` on the caller's transaction, so it
  exists exactly when the change that caused it committed (the change listener in
  :mod:`hms_ach.outbound.events` calls it; other code, e.g. the credential scan, may too).
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
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Concatenate, ParamSpec, TypeVar

import orjson

from hms_ach.core import metrics
from hms_ach.core.redact import error_kind
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, OutboxSink, SinkSettings
from hms_ach.store import outbox as rows
from hms_ach.store.db import Store
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.outbound.outbox")
T = TypeVar("T")
P = ParamSpec("P")


_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def _http_status(text: str) -> int | None:
    """The HTTP status a sink's error names ("HTTP 503"), for the log line; None if it names none."""
    found = _HTTP_STATUS.search(text)
    return int(found.group(1)) if found else None


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with full jitter: uniform in (0, min(maximum, initial * 2**(attempts-1))]."""
    ceiling = min(maximum, initial * (2 ** max(0, min(attempts - 1, 40))))
    return max(0.05, random.uniform(0, ceiling))


# ---------------------------------------------------------------------------- the policy per step
def take_lease(tx: Tx, sink: SinkSettings, owner: str, seconds: float) -> bool:
    """Take or renew the lease of ``sink`` for ``owner``; fan new events out to it. False: another has it."""
    return rows.take_lease(
        tx, sink.name, owner, seconds, wants=sink.wants, from_beginning=sink.from_beginning
    )


def pending_rows(tx: Tx, destination: str, limit: int = 50) -> list[Delivery | datetime]:
    """The next pending rows of a destination in id order; a not-yet-due head row is returned as its due time."""
    out: list[Delivery | datetime] = []
    t = rows.now()
    for r in rows.pending_rows(tx, destination, limit):
        if r.next_attempt_at > t:
            out.append(r.next_attempt_at)
            break
        out.append(
            Delivery(
                r.row_id,
                r.event_id,
                r.event,
                orjson.loads(r.payload),
                r.created_at.isoformat().replace("+00:00", "Z"),
                r.attempts,
            )
        )
    return out


def mark_delivered(tx: Tx, row_id: int, result: DeliveryResult) -> None:
    """The row is delivered; the sink's follow-up events are written in the same transaction."""
    rows.mark_delivered(tx, row_id, result.response[:4000] or None)
    for event, payload in result.followups:
        rows.enqueue(tx, event, payload)


def mark_failed(tx: Tx, row_id: int, sink: SinkSettings, error: DeliveryError) -> str:
    """Schedule the next attempt, or dead-letter the row; returns the new status."""
    attempts, retry_from = rows.retry_state(tx, row_id)
    attempts += 1
    t = rows.now()
    delay = backoff_seconds(attempts, sink.retry_initial_seconds, sink.retry_max_seconds)
    if error.retry_after is not None:
        delay = max(delay, min(error.retry_after, sink.retry_max_seconds))
    too_old = t + timedelta(seconds=delay) - retry_from > timedelta(hours=sink.max_age_hours)
    status = "dead" if error.permanent or too_old else "pending"
    rows.mark_failed(
        tx,
        row_id,
        status=status,
        attempts=attempts,
        next_attempt_at=t + timedelta(seconds=delay),
        last_error=str(error)[:4000],
        response=(error.response or "")[:4000] or None,
    )
    return status


# ---------------------------------------------------------------------------- the dispatcher
#: How long stop() lets a delivery in flight finish before it cancels the sink's task.
STOP_DRAIN_SECONDS = 10.0


class Dispatcher:
    """Delivers the outbox rows of every enabled sink; one asyncio task per sink."""

    def __init__(
        self,
        store: Store,
        sinks: Sequence[OutboxSink],
        *,
        poll_seconds: float = 0.25,
        lease_seconds: float = 30.0,
        owner: str | None = None,
    ):
        self.store = store
        self.sinks = sinks
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._wake = asyncio.Event()  # set by stop(): a task waiting between rounds ends at once

    async def start(self) -> None:
        """Register every sink's cursor (so a new sink starts at this point), then start delivering."""
        for sink in self.sinks:
            await asyncio.to_thread(
                self._tx, rows.ensure_cursor, sink.settings.name, sink.settings.from_beginning
            )
        for sink in self.sinks:
            if sink.settings.enabled:
                self._tasks.append(asyncio.create_task(self._run(sink), name=f"outbox:{sink.settings.name}"))

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11 asyncio.wait_for can swallow a cancellation
        # that arrives just as its inner await completes, and the loop must end all the same.
        self._stopping = True
        self._wake.set()
        if self._tasks:
            # A delivery in flight finishes and is marked (else its receiver gets it twice after a
            # restart); then the round ends, since no further row is taken once stopping.
            _done, busy = await asyncio.wait(self._tasks, timeout=STOP_DRAIN_SECONDS)
            for task in busy:
                task.cancel()
            _done, stuck = await asyncio.wait(busy, timeout=30) if busy else (set(), set())
            for task in stuck:
                log.error("outbox.stop_timeout", extra={"task": task.get_name()})
        self._tasks.clear()
        for sink in self.sinks:
            try:
                await asyncio.to_thread(self._tx, rows.release_lease, sink.settings.name, self.owner)
            except Exception:  # noqa: BLE001 - the lease expires anyway
                pass
            try:
                await sink.close()
            except Exception:  # noqa: BLE001
                log.warning("outbox.sink_close_failed", extra={"sink": sink.settings.name})

    def _tx(self, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(tx, ...)`` in a write transaction of its own (from a worker thread)."""
        with self.store.transaction() as tx:
            return fn(tx, *args, **kwargs)

    async def _run(self, sink: OutboxSink) -> None:
        settings = sink.settings
        while not self._stopping:
            try:
                wait = await self._round(sink, settings)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again shortly
                log.error("outbox.dispatch_error", extra={"sink": settings.name, "error": error_kind(exc)})
                wait = max(self.poll_seconds, 1.0)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, wait))

    async def _round(self, sink: OutboxSink, settings: SinkSettings) -> float:
        """Deliver what is due; returns how long to wait before the next round."""
        has_lease = await asyncio.to_thread(self._tx, take_lease, settings, self.owner, self.lease_seconds)
        if not has_lease:
            return self.poll_seconds * 4
        batch = await asyncio.to_thread(self._tx, pending_rows, settings.name)
        for item in batch:
            if self._stopping:
                return 0.0  # the rows not taken wait for the next start (the lease is released)
            if isinstance(item, datetime):
                return min(self.poll_seconds * 4, max(0.0, (item - rows.now()).total_seconds()))
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
                metrics.OUTBOX_DELIVERIES.labels(settings.name, "dead" if status == "dead" else "retry").inc()
                log.warning(  # the error's text (URLs with identifiers, the peer's answer) is in the row
                    "outbox.delivery_failed",
                    extra={
                        "sink": settings.name,
                        "row": item.row_id,
                        "outbox_event": item.event,
                        "status": status,
                        "error": error_kind(error.__cause__ or exc),
                        "http_status": _http_status(str(error)),
                        "permanent": error.permanent,
                    },
                )
                if status == "pending":
                    return self.poll_seconds  # the head row waits for its backoff: nothing after it goes
                continue
            await asyncio.to_thread(self._tx, mark_delivered, item.row_id, result)
            metrics.OUTBOX_DELIVERIES.labels(settings.name, "delivered").inc()
            written = datetime.fromisoformat(item.occurred_at.replace("Z", "+00:00"))
            metrics.OUTBOX_LAG.labels(settings.name).observe(max(0.0, (rows.now() - written).total_seconds()))
            log.info(
                "outbox.delivered",
                extra={"sink": settings.name, "row": item.row_id, "outbox_event": item.event},
            )
        return 0.0 if len(batch) >= 50 else self.poll_seconds
