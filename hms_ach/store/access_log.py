"""Access records: who read, searched or was refused which patient or staff data, written in batches.

Every read, vread, search, history and export of ``/fhir`` and the ``/api/v1`` workforce reads, and
every refusal (401, 403, 404 outside a compartment), becomes one :class:`Access`. The request path
hands it to :meth:`AccessLog.record`, which only appends it to a bounded in-memory queue; a background
thread drains the queue and inserts the rows in batches, in one transaction per batch, through the
group-commit writer (:class:`~hms_ach.store.writer.StoreWriter`). A search never waits for a commit.

Overflow policy: when the queue is full (``max_queue_entries``), :meth:`AccessLog.record` waits up to
``overflow_wait_seconds`` for room (the reader slows down to the rate the store can take); after that
the record is dropped, counted in :attr:`AccessLog.dropped` and logged (``access_audit.dropped``, at
most once a second); :meth:`AccessLog.problem` then fails the engine's readiness until
``overflow_window_seconds`` pass without a drop. :meth:`AccessLog.stop` flushes what is queued.

The rows go to their own table (``access_record``), not the change chain of :mod:`hms_ach.store.audit`:
reads would otherwise serialise on the change chain's lock and make the change trail grow with every
search. The access records form a chain of their own: each row carries the hash of the row before it
(``prev_hash``) and an HMAC-SHA256 over its content and that link under the audit entry key. A batch
appends under a lock of its own (a PostgreSQL advisory lock; SQLite has one writer), so the chain has
one order across engines. :func:`verify_chain` walks it: an edited row, rows deleted from the middle
and, against the signed checkpoints (:mod:`hms_ach.store.audit_checkpoints`), a deleted tail are each
found and named. Rows written before the chain existed (``prev_hash`` NULL) keep their own HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, func, select, text

from hms_ach.auth.caller import Caller
from hms_ach.store import fastexec, pglocks
from hms_ach.store.audit import GENESIS, instant, iter_rows
from hms_ach.store.audit_keys import hmac_sha256, seal_for
from hms_ach.store.db import Store
from hms_ach.store.models import AccessRecord

if TYPE_CHECKING:  # audit_checkpoints reads the access chain's head: it imports this module
    from hms_ach.store.audit_checkpoints import Checkpoint

log = logging.getLogger("hms_ach.store.access_log")

T = AccessRecord.__table__  # type: ignore[attr-defined]

#: At most this many references are kept per record (a search page is at most 1000 anyway).
MAX_ENTITIES = 1000
MAX_QUERY_CHARS = 4000
#: Class of the PostgreSQL advisory lock that serialises appends to the access chain ("hmsc", keyed
#: per schema by :mod:`hms_ach.store.pglocks`).
ACCESS_LOCK_CLASS = 0x686D7363
_LOCK = text(f"SELECT {pglocks.xact_lock(ACCESS_LOCK_CLASS)}")
_HASHED = (
    "recorded",
    "subtype",
    "resource_type",
    "outcome",
    "sub",
    "actor",
    "entities",
    "result_count",
    "query",
)


@dataclass
class Access:
    """One access to record. ``entities``: the references returned (``Patient/1``) or asked for."""

    subtype: str  # read | vread | search-type | history | export
    resource_type: str
    outcome: int  # the HTTP status
    sub: str
    actor: str  # JSON, see http_actor
    entities: Sequence[str] = ()
    result_count: int | None = None
    query: str = ""
    recorded: str = field(default_factory=instant)

    def row(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "subtype": self.subtype[:32],
            "resource_type": self.resource_type[:64],
            "outcome": int(self.outcome),
            "sub": self.sub[:255],
            "actor": self.actor,
            "entities": " ".join(dict.fromkeys(self.entities[:MAX_ENTITIES])),
            "result_count": self.result_count,
            "query": self.query[:MAX_QUERY_CHARS],
        }


def http_actor(caller: Caller | None, source_address: str | None) -> tuple[str, str]:
    """(sub, actor JSON) of an HTTP request: the caller's sub, client_id, roles and source address;
    ``sub`` is '' for a request refused before a caller was known."""
    fields: dict[str, Any] = {"kind": "http", "source_address": source_address}
    sub = ""
    if caller is not None:
        sub = caller.sub
        fields.update(
            sub=caller.sub,
            client_id=caller.client_id,
            roles=sorted(caller.roles),
            source_address=caller.source_address or source_address,
            authenticated=caller.authenticated,
        )
    return sub, orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()


def request_actor(request: Any) -> str:
    """The actor JSON of a Starlette/FastAPI request (its ``state.caller`` and client address), for
    the ``actor`` of the audit entries its writes make."""
    client = getattr(request, "client", None)
    return http_actor(getattr(request.state, "caller", None), client.host if client else None)[1]


def record_request(
    request: Any,
    subtype: str,
    resource_type: str,
    outcome: int,
    entities: Sequence[str] = (),
    result_count: int | None = None,
) -> None:
    """Queue one access record for a Starlette/FastAPI ``request`` (its caller, path and query) on
    the engine's :class:`AccessLog` (``request.app.state.access_audit``); never waits for a commit.
    Does nothing when the app has none (a bare app in a test)."""
    recorder: AccessLog | None = getattr(request.app.state, "access_audit", None)
    if recorder is None:
        return
    client = request.client
    sub, actor = http_actor(getattr(request.state, "caller", None), client.host if client else None)
    scope = request.scope  # the raw path and query: cheaper than building request.url
    raw_query: bytes = scope.get("query_string", b"")
    query = str(scope.get("path", "")) + ("?" + raw_query.decode("latin-1") if raw_query else "")
    recorder.record(Access(subtype, resource_type, outcome, sub, actor, list(entities), result_count, query))


_METHOD_SUBTYPES = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def interaction_of(method: str, path: str) -> tuple[str, str]:
    """(subtype, resource type) of a request refused before routing, from its method and path:
    ``GET /fhir/T`` search-type, ``/fhir/T/id`` read, ``.../_history`` history, ``.../_history/v``
    vread; under ``/api/v1`` the first path segment is the type (``shifts``)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["fhir"]:
        parts = parts[1:]
    elif parts[:2] == ["api", "v1"]:
        parts = parts[2:]
    rtype = parts[0][:64] if parts else ""
    if method not in ("GET", "HEAD"):
        if len(parts) >= 2 and parts[1] == "_search":
            return "search-type", rtype
        return _METHOD_SUBTYPES.get(method, method.lower()[:16]), rtype
    if len(parts) <= 1:
        return "search-type", rtype
    if len(parts) >= 3 and parts[2] == "_history":
        return ("vread" if len(parts) >= 4 else "history"), rtype
    return "read", rtype


def _payload(row: dict[str, Any]) -> bytes:
    """The hashed fields; the link (``prev_hash``) only when set, so rows written before the chain
    verify unchanged."""
    fields = {k: row[k] for k in _HASHED}
    if row.get("prev_hash") is not None:
        fields["prev_hash"] = row["prev_hash"]
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def row_hash(row: dict[str, Any], entry_key: bytes | None) -> str:
    """HMAC-SHA256 of the row (and its link) under the audit entry key; plain SHA-256 without a key."""
    if entry_key is None:
        return hashlib.sha256(_payload(row)).hexdigest()
    return hmac_sha256(entry_key, _payload(row)).hex()


_LAST = select(T.c.hash).order_by(T.c.seq.desc()).limit(1)


def insert(conn: Connection, accesses: Iterable[Access]) -> int:
    """Append ``accesses`` to the access chain in ``conn``'s transaction; returns how many."""
    batch = list(accesses)
    if not batch:
        return 0
    key = seal_for(conn).entry_key
    if conn.dialect.name == "postgresql":  # one order across engines; held until the commit
        conn.execute(_LOCK)
    prev = conn.execute(_LAST).scalar() or GENESIS
    rows = []
    for access in batch:
        row = access.row()
        row["prev_hash"] = prev
        row["hash"] = prev = row_hash(row, key)
        rows.append(row)
    fastexec.insert_rows(conn, T, rows)
    return len(rows)


def access_head(conn: Connection, since: Checkpoint | None = None) -> tuple[int, int, str]:
    """(records, number of the last record, its hash) of the access chain; (0, 0, "") when empty.
    With ``since`` (the last checkpoint) only the records after its access head are counted."""
    last = conn.execute(select(T.c.seq, T.c.hash).order_by(T.c.seq.desc()).limit(1)).first()
    if last is None:
        return 0, 0, ""
    counted = select(func.count()).select_from(T).where(T.c.seq <= last.seq)
    base = 0
    if since is not None and 0 < since.access_head_seq <= last.seq:
        counted, base = counted.where(T.c.seq > since.access_head_seq), since.access_count
    return base + int(conn.execute(counted).scalar_one()), int(last.seq), str(last.hash)


@dataclass
class ChainResult:
    """What :func:`verify_chain` found: ``problem`` is "" when the chain holds, else one of
    ``edited-access-record``, ``deleted-access-records``, ``truncated-access-records``,
    ``access-checkpoint-mismatch``; ``reason`` says where."""

    checked: int
    problem: str = ""
    reason: str = ""
    legacy: int = 0  # rows written before the chain (no link)

    @property
    def ok(self) -> bool:
        return not self.problem


def verify_chain(conn: Connection, checkpoints: Sequence[Checkpoint] = ()) -> ChainResult:
    """Walk the access chain from its first row; stop at the first thing that does not hold and name it.

    ``checkpoints`` (read and their signatures checked): each records how many access records there
    were up to which one, so a deleted tail, or rows deleted and the chain relinked before a
    checkpoint's head, are found too."""
    key = seal_for(conn).entry_key
    pending = [cp for cp in checkpoints if cp.access_head_seq]
    next_cp = 0
    prev, prev_seq, checked, legacy = GENESIS, 0, 0, 0
    for row in iter_rows(conn, T, 2000):
        seq = int(row["seq"])
        if not hmac.compare_digest(row_hash(row, key), row["hash"]):
            return ChainResult(
                checked, "edited-access-record",
                f"access record {seq} does not match its hash: it was edited after it was written",
                legacy,
            )  # fmt: skip
        if row["prev_hash"] is None:
            if checked > legacy:  # an unlinked row after linked ones: its link was removed
                return ChainResult(
                    checked, "edited-access-record",
                    f"access record {seq} has lost its link to the record before it", legacy,
                )  # fmt: skip
            legacy += 1
        elif row["prev_hash"] != prev:
            where = f"after access record {prev_seq}" if prev_seq else "at the start of the access records"
            return ChainResult(
                checked, "deleted-access-records",
                f"access records were deleted {where}: record {seq} does not link to the one before it",
                legacy,
            )  # fmt: skip
        checked += 1
        while next_cp < len(pending) and pending[next_cp].access_head_seq <= seq:
            cp = pending[next_cp]
            next_cp += 1
            if cp.access_head_seq < seq:
                return ChainResult(
                    checked - 1, "deleted-access-records",
                    f"access record {cp.access_head_seq}, the head of the checkpoint of {cp.at}, was deleted",
                    legacy,
                )  # fmt: skip
            if cp.access_head != row["hash"] or cp.access_count != checked:
                return ChainResult(
                    checked - 1, "access-checkpoint-mismatch",
                    f"access record {seq} is not what the checkpoint of {cp.at} recorded "
                    f"({cp.access_count} records up to it; there are now {checked}): "
                    "records before it were deleted or replaced",
                    legacy,
                )  # fmt: skip
        prev, prev_seq = row["hash"], seq
    last = pending[-1] if pending else None
    if last is not None and last.access_head_seq > prev_seq:
        return ChainResult(
            checked, "truncated-access-records",
            f"the access records end at {prev_seq} ({checked} records) but the checkpoint of {last.at} "
            f"recorded {last.access_count} up to record {last.access_head_seq}: the tail was deleted",
            legacy,
        )  # fmt: skip
    return ChainResult(checked, legacy=legacy)


# ---------------------------------------------------------------------------- the batcher
class AccessLog:
    """The bounded queue and its flushing thread (see the module docstring for the overflow policy).

    ``commit(rows_job)`` runs a ``job(conn)`` in a write transaction and returns when it committed
    (``StoreWriter.run_sync``, or ``Store.transaction`` in tools without a writer)."""

    def __init__(
        self,
        commit: Callable[[Callable[[Connection], int]], int],
        *,
        max_queue_entries: int = 10000,
        max_batch_entries: int = 500,
        flush_interval_seconds: float = 0.2,
        overflow_wait_seconds: float = 0.05,
        overflow_window_seconds: float = 60.0,
    ):
        self._commit = commit
        self.max_queue_entries = max_queue_entries
        self.max_batch_entries = max_batch_entries
        self.flush_interval_seconds = flush_interval_seconds
        self.overflow_wait_seconds = overflow_wait_seconds
        self.overflow_window_seconds = overflow_window_seconds
        self._queue: deque[Access] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.written = 0
        self.dropped = 0
        self.failed_batches = 0
        self._last_drop = 0.0
        self._last_drop_log = 0.0

    # ------------------------------------------------------------------ callers
    def record(self, access: Access) -> bool:
        """Queue ``access``; False when it was dropped (the queue stayed full; counted and logged)."""
        with self._cond:
            if len(self._queue) >= self.max_queue_entries:
                deadline = time.monotonic() + self.overflow_wait_seconds
                while len(self._queue) >= self.max_queue_entries:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopping:
                        self._drop()
                        return False
                    self._cond.wait(left)
            self._queue.append(access)
            if len(self._queue) >= self.max_batch_entries:
                self._cond.notify_all()
        return True

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        self._last_drop = now
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            log.error(
                "access_audit.dropped", extra={"dropped_total": self.dropped, "queued": len(self._queue)}
            )

    @property
    def queued(self) -> int:
        return len(self._queue)

    def problem(self) -> str | None:
        """Why readiness should fail: records dropped within ``overflow_window_seconds``, or the
        flushing thread is not running; None when fine."""
        if self._last_drop and time.monotonic() - self._last_drop < self.overflow_window_seconds:
            return f"access audit records were dropped ({self.dropped} in total): the store cannot keep up"
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the access audit thread is not running"
        return None

    def health(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "written": self.written,
            "dropped": self.dropped,
            "failed_batches": self.failed_batches,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="hms-ach-access-audit", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> int:
        """Flush what is queued (within ``timeout``) and end the thread; returns how many records
        were still queued and not written (0 when all were)."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
        self.flush(deadline=time.monotonic() + timeout)  # a thread that never started, or did not finish
        left = self.queued
        if left:
            log.error("access_audit.unflushed", extra={"queued": left})
        return left

    def flush(self, deadline: float | None = None) -> None:
        """Write every queued record now, batch by batch (until ``deadline``, a monotonic time)."""
        while self._queue and (deadline is None or time.monotonic() < deadline):
            if not self._write_batch():
                return

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and len(self._queue) < self.max_batch_entries:
                    self._cond.wait(self.flush_interval_seconds)
                stopping = self._stopping
            while self._queue:
                if not self._write_batch():
                    if stopping:
                        return
                    time.sleep(min(1.0, self.flush_interval_seconds * 5))  # the store is failing: back off
                    break
            if stopping and not self._queue:
                return

    def _write_batch(self) -> bool:
        """Take up to a batch off the queue and commit it; on failure put it back (front)."""
        with self._cond:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_entries, len(self._queue)))]
            self._cond.notify_all()  # room for writers waiting on a full queue
        if not batch:
            return True
        try:
            self._commit(lambda conn: insert(conn, batch))
        except Exception as exc:  # noqa: BLE001 - this thread must survive the store's failures
            self.failed_batches += 1
            log.warning(
                "access_audit.batch_failed", extra={"entries": len(batch), "error": type(exc).__name__}
            )
            with self._cond:
                self._queue.extendleft(reversed(batch))
            return False
        self.written += len(batch)
        return True


# ---------------------------------------------------------------------------- reads
@dataclass
class AccessQuery:
    entity: str | None = None  # "Patient/1" (a reference returned) or a type ("Patient")
    agent: str | None = None  # the caller's sub
    subtype: str | None = None
    since: str | None = None
    until: str | None = None
    after_seq: int = 0
    upto_seq: int | None = None  # inclusive: a paging snapshot (rows added later are not served)
    limit: int = 50


def search(conn: Connection, q: AccessQuery) -> tuple[list[dict[str, Any]], int | None]:
    """The access records matching ``q`` in order, and the ``seq`` to continue after (None: no more)."""
    stmt = select(T).where(T.c.seq > q.after_seq)
    if q.upto_seq is not None:
        stmt = stmt.where(T.c.seq <= q.upto_seq)
    if q.entity:
        rtype, _, rid = q.entity.partition("/")
        if rid:
            ref = q.entity.replace("%", "").replace("_", "")
            e = T.c.entities
            stmt = stmt.where(
                (e == ref) | e.like(ref + " %") | e.like("% " + ref) | e.like("% " + ref + " %")
            )
        else:
            stmt = stmt.where(T.c.resource_type == rtype)
    if q.agent:
        stmt = stmt.where(T.c.sub == q.agent)
    if q.subtype:
        stmt = stmt.where(T.c.subtype == q.subtype)
    if q.since:
        stmt = stmt.where(T.c.recorded >= q.since)
    if q.until:
        stmt = stmt.where(T.c.recorded < q.until)
    rows = conn.execute(stmt.order_by(T.c.seq).limit(q.limit + 1)).all()
    out = [dict(r._mapping) for r in rows[: q.limit]]
    return out, (out[-1]["seq"] if len(rows) > q.limit and out else None)


def last_seq(store: Store) -> int:
    """The ``seq`` of the newest access record (0: none): the upper bound of a paging snapshot."""
    with store.read() as conn:
        return int(conn.execute(select(func.max(T.c.seq))).scalar_one() or 0)


def search_records(store: Store, q: AccessQuery) -> tuple[list[dict[str, Any]], int | None]:
    with store.read() as conn:
        return search(conn, q)
