"""The outbox tables: outbound events, each sink's cursor and lease, and each sink's delivery rows.

* ``outbox_event``: one row per event, written by :func:`enqueue` in the transaction of the change
  that caused it, so an event exists exactly when its cause committed.
* ``outbox_cursor``: per sink (``destination``), the last event fanned out to it and who holds its
  lease. The lease row is taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` so that several instances
  share the sinks on PostgreSQL.

Events are fanned out in id order and a sink's cursor is the last id fanned out to it, so the
cursor must never pass an id that a transaction still running will commit. SQLite has one writer
at a time, so ids commit in their order there. On PostgreSQL several transactions write events at
once (group commits of several instances, a transaction Bundle apart) and an id can commit after a
higher one; no lock orders them. Instead the fan-out waits (:func:`settled_event_id`): it reads the
highest id it sees and, in the same snapshot, the transactions still running, and fans out up to
that id only once those of them that write events have ended. Every transaction takes its
transaction id and the event writers' shared lock before its first event takes an id
(:func:`_take_xid`), so any transaction holding a lower id than one already committed was running
when the snapshot was taken, holds that lock, and is among those waited for. This relies on
the id sequence handing out values in the order they are asked for, across sessions: PostgreSQL's
``CACHE 1``, as the engine creates it (a sequence that caches values per session breaks it).
* ``outbox``: per sink and event, the delivery row (pending, delivered, dead), its attempts and next
  attempt time.

The policy (which sink wants which event, backoff, when a row is dead) is the dispatcher's
(:mod:`hms_ach.outbound.outbox`); here are only the statements it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.store import fastexec, pglocks, txcache
from hms_ach.store.models import OutboxCursor, OutboxEvent, OutboxRow
from hms_ach.store.port import Tx

EVENTS = OutboxEvent.__table__  # type: ignore[attr-defined]
ROWS = OutboxRow.__table__  # type: ignore[attr-defined]
CURSORS = OutboxCursor.__table__  # type: ignore[attr-defined]


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A stored time as UTC-aware (SQLite hands times back naive)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_ENQUEUE = insert(EVENTS).returning(
    EVENTS.c.id
)  # built once: enqueue runs on the write path of every record change


#: Class of the shared advisory lock that a transaction holds from its first event to its end
#: ("hmso", keyed per schema by :mod:`hms_ach.store.pglocks`): it marks the transactions that write
#: events in this schema, the only ones the fan-out waits for.
EVENT_WRITER_LOCK_CLASS = 0x686D736F
# run on the DBAPI cursor (hms_ach.store.fastexec): once per write transaction that writes events
_XID = text(f"SELECT pg_current_xact_id(), {pglocks.xact_lock(EVENT_WRITER_LOCK_CLASS, shared=True)}")
# the transaction ids (32-bit) of the sessions that hold the event writers' lock of this schema
_WRITERS = text(
    "SELECT t.transactionid::text FROM pg_locks a JOIN pg_locks t ON t.pid = a.pid"
    f" WHERE a.granted AND {pglocks.held_where(EVENT_WRITER_LOCK_CLASS)}"
    " AND t.locktype = 'transactionid' AND t.granted"
)
_HORIZON = text(
    "SELECT coalesce(max(id), 0), pg_current_snapshot()::text, pg_current_xact_id_if_assigned()::text"
    " FROM outbox_event"
)
_SNAPSHOT = text("SELECT pg_current_snapshot()::text")
#: How long one fan-out waits for the transactions running at its snapshot to end; when they have
#: not ended by then, the cursor stays where it is and the next round tries again.
SETTLE_WAIT_SECONDS = 1.0


def _take_xid(tx: Tx) -> None:
    """PostgreSQL: give the transaction its id now, before its first event takes a sequence value
    (see the module's docstring), and take the event writers' shared lock (it never waits: nobody
    takes it exclusively); once per transaction."""
    if tx.dialect.name != "postgresql":
        return
    cache = txcache.cache(tx)
    if not cache.get("outbox.xid"):
        fastexec.execute(tx, "outbox.event_writer", _XID, {})
        cache["outbox.xid"] = True


def _running(snapshot: str) -> set[int]:
    """The transaction ids a ``pg_snapshot`` text (``xmin:xmax:xip,...``) lists as running."""
    xip = snapshot.split(":")[2]
    return {int(x) for x in xip.split(",") if x}


def settled_event_id(conn: Connection, wait_seconds: float | None = None) -> int | None:
    """The highest event id below which every event that will ever commit has committed and is
    visible now; None when the transactions that could still commit a lower one did not end
    within ``wait_seconds`` (default :data:`SETTLE_WAIT_SECONDS`). PostgreSQL only (SQLite: every
    committed id is settled).

    One statement reads the highest visible id and the running transactions of its own
    snapshot. An event with a lower id was given its id before that one; its transaction had its
    transaction id and the event writers' lock before that (:func:`_take_xid`), so it had
    committed, rolled back, or is in the snapshot's running list and holds the lock until it
    ends. Of that list, only the transactions that hold the lock when the next statement looks
    can still commit such an event. Once they (but this one) have ended, each event up to the id
    is committed and visible to the next statement, or never will be. A long transaction that
    writes no event (a reindex, a transaction Bundle until it writes its events) is not waited for."""
    row = conn.execute(_HORIZON).one()
    upper, running = int(row[0]), _running(row[1])
    if row[2] is not None:  # this transaction's own events are visible to it
        running.discard(int(row[2]))
    if running:
        writers = {int(x) for (x,) in conn.execute(_WRITERS).all()}
        running = {x for x in running if x & 0xFFFFFFFF in writers}  # xid8 to the 32-bit xid
    deadline = time.monotonic() + (SETTLE_WAIT_SECONDS if wait_seconds is None else wait_seconds)
    pause = 0.002
    while running:
        if time.monotonic() > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
        running &= _running(str(conn.execute(_SNAPSHOT).scalar_one()))
    return upper


def enqueue(tx: Tx, event: str, payload: dict[str, Any]) -> int:
    """Write one event in the caller's transaction; returns its id. ``payload`` gets ``version: 1``."""
    _take_xid(tx)  # before the id: see settled_event_id
    row = fastexec.first_row(
        tx,
        "outbox.enqueue",
        _ENQUEUE,
        {"event": event, "payload": payload_text(payload), "created_at": now()},
        EVENTS,
    )
    assert row is not None  # an INSERT .. RETURNING always has one
    return int(row[0])


def payload_text(payload: dict[str, Any]) -> str:
    """The stored text of an event's ``payload`` (with ``version: 1``), as :func:`enqueue` writes it."""
    return orjson.dumps({"version": 1, **payload}).decode()


def enqueue_many(tx: Tx, events: list[tuple[str, dict[str, Any] | str]]) -> None:
    """:func:`enqueue` for each ``(event, payload)`` in turn, with one INSERT for all of them (the
    ids are given in this order, as one by one). A payload may be given as its
    :func:`payload_text` already (made before the writer)."""
    created_at = now()
    _take_xid(tx)  # before the ids: see settled_event_id
    fastexec.insert_rows(
        tx,
        EVENTS,
        [
            {
                "event": event,
                "payload": payload if isinstance(payload, str) else payload_text(payload),
                "created_at": created_at,
            }
            for event, payload in events
        ],
    )


def _insert_fn(tx: Tx) -> Any:
    return pg_insert if tx.dialect.name == "postgresql" else sqlite_insert


def ensure_cursor(tx: Tx, destination: str, from_beginning: bool) -> None:
    """Create the sink's cursor if it is new: at the newest event, or before the first with ``from_beginning``."""
    if (
        tx.execute(select(CURSORS.c.destination).where(CURSORS.c.destination == destination)).first()
        is not None
    ):
        return
    start = 0
    if not from_beginning:
        start = int(tx.execute(select(func.coalesce(func.max(EVENTS.c.id), 0))).scalar_one())
    tx.execute(
        _insert_fn(tx)(CURSORS)
        .values(destination=destination, last_event_id=start)
        .on_conflict_do_nothing(index_elements=["destination"])
    )


def take_lease(
    tx: Tx,
    destination: str,
    owner: str,
    seconds: float,
    *,
    wants: Callable[[str], bool],
    from_beginning: bool = False,
) -> bool:
    """Take or renew the lease of ``destination`` for ``owner`` and fan the events after its cursor
    out to it (a pending row for each event ``wants`` accepts). False: another owner holds it."""
    # PostgreSQL: how far the events are settled, found before this transaction writes anything,
    # so that two fan-outs never wait for each other (see settled_event_id)
    settled = settled_event_id(tx) if tx.dialect.name == "postgresql" else None
    ensure_cursor(tx, destination, from_beginning)
    row = tx.execute(
        select(CURSORS).where(CURSORS.c.destination == destination).with_for_update(skip_locked=True)
    ).first()
    if row is None:  # another instance holds the row lock right now
        return False
    t = now()
    if row.lease_owner not in (None, owner) and row.lease_until is not None and aware(row.lease_until) > t:
        return False
    last = row.last_event_id
    query = select(EVENTS.c.id, EVENTS.c.event, EVENTS.c.created_at).where(EVENTS.c.id > last)
    if tx.dialect.name == "postgresql":
        query = query.where(EVENTS.c.id <= (last if settled is None else settled))
    events = tx.execute(query.order_by(EVENTS.c.id).limit(1000)).all()
    wanted = [e for e in events if wants(e.event)]
    if wanted:
        tx.execute(
            insert(ROWS),
            [
                {
                    "destination": destination,
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
    tx.execute(
        update(CURSORS)
        .where(CURSORS.c.destination == destination)
        .values(last_event_id=last, lease_owner=owner, lease_until=t + timedelta(seconds=seconds))
    )
    return True


def release_lease(tx: Tx, destination: str, owner: str) -> None:
    tx.execute(
        update(CURSORS)
        .where(and_(CURSORS.c.destination == destination, CURSORS.c.lease_owner == owner))
        .values(lease_owner=None, lease_until=None)
    )


def release_leases(tx: Tx, owner: str) -> int:
    """Release every sink lease ``owner`` still holds (a stopping process); how many it held."""
    result = tx.execute(
        update(CURSORS).where(CURSORS.c.lease_owner == owner).values(lease_owner=None, lease_until=None)
    )
    return int(result.rowcount)


@dataclass(frozen=True)
class PendingRow:
    """A pending delivery row and its event."""

    row_id: int
    event_id: int
    event: str
    attempts: int
    next_attempt_at: datetime  # UTC-aware
    payload: str  # the event's JSON, as stored
    created_at: datetime  # UTC-aware: when the event was written


def pending_rows(tx: Tx, destination: str, limit: int = 50) -> list[PendingRow]:
    """The next pending rows of ``destination`` in id order, up to and including the first one not
    yet due (the rows after it wait for it: per-destination order)."""
    rows = tx.execute(
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
    out: list[PendingRow] = []
    t = now()
    for r in rows:
        due = aware(r.next_attempt_at)
        out.append(PendingRow(r.id, r.event_id, r.event, r.attempts, due, r.payload, aware(r.created_at)))
        if due > t:
            break
    return out


def mark_delivered(tx: Tx, row_id: int, response: str | None) -> None:
    tx.execute(
        update(ROWS)
        .where(ROWS.c.id == row_id)
        .values(
            status="delivered",
            delivered_at=now(),
            attempts=ROWS.c.attempts + 1,
            last_error=None,
            response=response,
        )
    )


def retry_state(tx: Tx, row_id: int) -> tuple[int, datetime]:
    """(attempts so far, start of the row's retry window, UTC-aware) of one row."""
    row = tx.execute(select(ROWS.c.attempts, ROWS.c.retry_from).where(ROWS.c.id == row_id)).one()
    return int(row.attempts), aware(row.retry_from)


def mark_failed(
    tx: Tx,
    row_id: int,
    *,
    status: str,
    attempts: int,
    next_attempt_at: datetime,
    last_error: str,
    response: str | None,
) -> None:
    """Record a failed attempt: the row's new status (pending or dead) and when to try again."""
    tx.execute(
        update(ROWS)
        .where(ROWS.c.id == row_id)
        .values(
            status=status,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            last_error=last_error,
            response=response,
        )
    )


def retry(tx: Tx, row_id: int | None = None, *, dead: bool = False) -> int:
    """Put one row (or every dead row) back to pending, with a fresh retry window. Returns the count."""
    cond = ROWS.c.id == row_id if row_id is not None else ROWS.c.status == "dead"
    if row_id is None and not dead:
        return 0
    t = now()
    result = tx.execute(
        update(ROWS)
        .where(and_(cond, ROWS.c.status != "pending"))
        .values(status="pending", attempts=0, next_attempt_at=t, retry_from=t)
    )
    return int(result.rowcount)


def summary(tx: Tx) -> list[dict[str, Any]]:
    """Row counts per destination and status."""
    rows = tx.execute(
        select(ROWS.c.destination, ROWS.c.status, func.count())
        .group_by(ROWS.c.destination, ROWS.c.status)
        .order_by(ROWS.c.destination, ROWS.c.status)
    ).all()
    return [{"destination": d, "status": s, "count": n} for d, s, n in rows]


def open_counts(tx: Tx) -> list[tuple[str, str, int]]:
    """(destination, status, count) of the rows still waiting (``pending``) or dead-lettered: the
    delivered rows, most of the table, are not counted."""
    rows = tx.execute(
        select(ROWS.c.destination, ROWS.c.status, func.count())
        .where(ROWS.c.status.in_(("pending", "dead")))
        .group_by(ROWS.c.destination, ROWS.c.status)
    ).all()
    return [(str(d), str(s), int(n)) for d, s, n in rows]


def list_rows(
    tx: Tx, status: str | None = None, destination: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Delivery rows, newest first."""
    q = select(ROWS).order_by(ROWS.c.id.desc()).limit(limit)
    if status:
        q = q.where(ROWS.c.status == status)
    if destination:
        q = q.where(ROWS.c.destination == destination)
    return [dict(r._mapping) for r in tx.execute(q).all()]


def get_row(tx: Tx, row_id: int) -> dict[str, Any] | None:
    """One delivery row with its event's payload (``hms-ach outbox show``); None when unknown."""
    row = tx.execute(
        select(ROWS, EVENTS.c.payload).join(EVENTS, EVENTS.c.id == ROWS.c.event_id).where(ROWS.c.id == row_id)
    ).first()
    return dict(row._mapping) if row is not None else None
