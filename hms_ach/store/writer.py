"""Group commit: one writer thread, many messages per transaction, each answered after the commit.

Jobs (functions of a SQLAlchemy connection) are queued from the event loop. The writer thread takes
every job waiting (up to ``max_batch``), runs them one after the other inside one transaction, and
commits once: one fsync for the whole batch. No job gets a SAVEPOINT of its own unless one fails:
then the transaction is rolled back and the batch runs again with a SAVEPOINT per job, so only the
failed job's work is undone (a batch of one needs none: its failure rolls the transaction back).
The batch runs in optimistic mode (store/savepoint.py): a part of a job that would roll back to a
SAVEPOINT of its own (a message's records) raises ``SavepointNeeded`` instead, and the batch, or
the job alone, runs again the same way, with SAVEPOINTs. Only after that commit are the jobs' futures resolved,
so an ACK built from a result always describes committed data. If the commit itself fails, every
job of the batch fails and no ACK is sent for any of them: the senders resend.

With one connection per sender this gives SQLite throughput without giving up ``synchronous=FULL``;
on PostgreSQL it also cuts round trips.

The writer cannot die silently:

* every failure of the store itself (connect, BEGIN, a statement that loses the connection,
  COMMIT, ROLLBACK, close) is caught; the waiters of the batch get
  :class:`~hms_ach.store.errors.StoreUnavailable`, the pool is emptied of its dead connections,
  and the next batch waits a backoff (0.1 s doubling up to 5 s) before it connects again;
* every wait has a deadline (``run(job, timeout=...)``, default ``commit_timeout``): past it the
  caller gets ``StoreUnavailable``. A job that had not started is then never run; one that was
  running may still commit, and the same message sent again is answered from the duplicate store;
* if the thread exits anyway, the next ``run``/``run_sync`` (or :meth:`StoreWriter.check`) starts
  a new one (``health.restarts`` counts them);
* :class:`WriterHealth` says when the last commit succeeded, the last error (its stage and class,
  never field values) and how many attempts failed in a row, for ``/health/ready``.

Fairness between channels: every job is queued in a *lane* (``run(job, lane=...)``; the default
lane is ``"default"``), and a batch is formed round-robin over the lanes that have work: one job of
each lane in turn until ``max_batch``, the lane served last going to the back. A job submitted with
``heavy=True`` (a slice of a Bundle, a transaction Bundle) runs in a batch of its own, and heavy and
light batches alternate while both kinds wait: one lane's backlog can never fill a batch, and a
light job (an HL7 message) waits for at most the one heavy job running when it came. See
docs/reliability.md, "Fairness between channels".

On PostgreSQL a heavy job submitted with ``apart=True`` (a transaction Bundle) does not hold up
the others at all: it runs on a second thread with a connection of its own, one such job at a
time, in its own transaction, while the writer thread goes on committing batches. It is still one
transaction, so a transaction Bundle stays all-or-nothing; the two transactions meet only at the
locks they share (the rows both write, and the audit chain's advisory lock, which the bulk path of
a transaction takes only for its tail: the audit and outbox rows and the commit), and PostgreSQL
orders them. A job that takes the audit lock early (one that writes entry by entry) gains nothing
apart: it would hold the writer thread's jobs for as long as it runs. SQLite has one write lock
for the file, so there ``apart`` is ignored and the job alternates with light batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from hms_ach.core import fairness, metrics
from hms_ach.store import audit, conflicts
from hms_ach.store.db import PING_AFTER_IDLE_SECONDS, Store, unpinged
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import SavepointNeeded, optimistic

log = logging.getLogger("hms_ach.store.writer")
T = TypeVar("T")

_STOP = object()

#: The lane of jobs submitted without one.
DEFAULT_LANE = "default"


@dataclass(eq=False)
class _Job:
    """A queued job: its work, its caller's future, its lane, and whether it is heavy."""

    work: Callable[[Tx], Any]
    fut: Future[Any]
    lane: str = DEFAULT_LANE
    heavy: bool = False


class _Lanes:
    """The writer thread's own view of the queue: the waiting jobs by lane, served round-robin."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[_Job]] = {}  # insertion order is the round-robin order
        self._heavy_last = False  # the last batch was a heavy job

    def __bool__(self) -> bool:
        return bool(self._lanes)

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def add(self, job: _Job) -> None:
        self._lanes.setdefault(job.lane, deque()).append(job)

    def batch(self, max_jobs: int) -> list[_Job]:
        """The next batch: a heavy job alone, or up to ``max_jobs`` light jobs taken one lane at a
        time in turn. Heavy and light batches alternate while both kinds wait, so a light job
        waits for at most the one heavy job running when it came."""
        self._drop_cancelled()
        heavy_lane = next((lane for lane, q in self._lanes.items() if q[0].heavy), None)
        light_waiting = any(not q[0].heavy for q in self._lanes.values())
        if heavy_lane is not None and not (light_waiting and self._heavy_last):
            self._heavy_last = True
            return [self._take(heavy_lane)]
        self._heavy_last = False
        taken: list[_Job] = []
        while len(taken) < max_jobs:
            lanes = [lane for lane, q in self._lanes.items() if not q[0].heavy]
            if not lanes:
                break
            for lane in lanes[: max_jobs - len(taken)]:
                taken.append(self._take(lane))
        return taken

    def _take(self, lane: str) -> _Job:
        """The lane's first job; the lane goes to the back (the next batch starts with the others)."""
        q = self._lanes.pop(lane)
        job = q.popleft()
        if q:
            self._lanes[lane] = q
        return job

    def _drop_cancelled(self) -> None:
        """Jobs whose callers gave up before they started are dropped, never run."""
        for lane in list(self._lanes):
            q = self._lanes[lane]
            while q and q[0].fut.cancelled():
                q.popleft()
            if not q:
                del self._lanes[lane]

    def drop_all(self) -> list[_Job]:
        jobs = [job for q in self._lanes.values() for job in q]
        self._lanes.clear()
        return jobs


#: Reconnect backoff after a failure of the store: first wait, ceiling.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


@dataclass
class WriterHealth:
    """What ``/health/ready`` reads: the writer's last success and its failures since."""

    last_commit_at: str | None = None  # ISO time of the last committed transaction
    last_error: str | None = None  # "<stage>: <error class>" of the last failure, no field values
    last_error_at: str | None = None
    consecutive_failures: int = 0  # store failures since the last commit
    restarts: int = 0  # writer threads started again after one exited
    busy_since: float | None = None  # time.monotonic() when the current batch started, None when idle
    failing_since: float | None = None  # time.monotonic() of the first failure since the last commit

    def as_dict(self) -> dict[str, Any]:
        return {
            "last_commit_at": self.last_commit_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "consecutive_failures": self.consecutive_failures,
            "restarts": self.restarts,
        }


class _StoreFailure(Exception):
    """The store (not a job) failed at ``stage``; ``cause`` is the driver's error."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage}: {type(cause).__name__}")


def _begin(conn: Any) -> Any:
    """Begin the writer's transaction. On PostgreSQL its audit rows are linked to the chain only
    at its end (:func:`_finish`, :func:`hms_ach.store.audit.defer`): the chain's lock, which every
    writer of every engine on the database takes, is held only for those last statements and the
    COMMIT. Taken with a message's first change, it was held through the rest of the batch: other
    engines waited for it, and one holding a record this one wanted deadlocked with it."""
    txn = _stage("begin", conn.begin)
    if conn.dialect.name == "postgresql":
        audit.defer(conn)
    return txn


def _finish(conn: Any, txn: Any) -> None:
    """Link the transaction's kept audit rows to the chain, then COMMIT (:func:`_begin`)."""
    _stage("audit", lambda: audit.append_deferred(conn))
    _stage("commit", txn.commit)


def _is_store_failure(exc: BaseException) -> bool:
    """A lost connection, a lock timeout, a database that is not there: not the job's fault. A
    program limit the job's own data hit (SQLSTATE class 54 on PostgreSQL, e.g. an index row too
    large) is the job's fault: it is stored as that message's error, never taken for an outage."""
    if isinstance(exc, OperationalError | InterfaceError):
        return not str(getattr(exc.orig, "sqlstate", "") or "").startswith("54")
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


@dataclass
class _Held:
    """A writer connection kept between batches by the thread that committed with it, and since when."""

    conn: Any
    since: float


class StoreWriter:
    def __init__(
        self, store: Store, max_batch: int = 128, commit_timeout: float = 30.0, apart: bool | None = None
    ):
        """``apart``: run the jobs submitted with ``apart=True`` on a thread and connection of their
        own (default: on PostgreSQL, where two transactions can write at once)."""
        self.store = store
        self.apart = store.dialect == "postgresql" if apart is None else apart
        self._apart_queue: queue.Queue[Any] = queue.Queue()
        self._apart_thread: threading.Thread | None = None
        self.max_batch = max_batch
        self.commit_timeout = commit_timeout
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._backoff = 0.0
        self._lanes: _Lanes | None = None  # the writer thread's own, read only on that thread
        self.health = WriterHealth()
        # SQLite in a file: WAL checkpoints on a thread of their own, not inside the batches' commits
        self._checkpointer = store.checkpointer()
        self.batches = 0
        self.jobs = 0
        self.replays = 0  # batches run again with a SAVEPOINT per job after a job failed
        # the connection each committing thread keeps between its batches (see _connection)
        self._held: dict[int, _Held] = {}

    # ------------------------------------------------------------------ thread supervision
    def start(self) -> None:
        """Start the writer thread, or start it again if it exited (the supervisor check)."""
        with self._lock:
            self._thread = self._revive(self._thread, self._loop, "hms-ach-writer")
            if self._checkpointer is not None:
                self._checkpointer.start()  # or again, if it exited

    def _start_apart(self) -> None:
        """Start the thread of the jobs run apart, or start it again if it exited."""
        with self._lock:
            self._apart_thread = self._revive(self._apart_thread, self._apart_loop, "hms-ach-writer-apart")

    def _revive(
        self, thread: threading.Thread | None, target: Callable[[], None], name: str
    ) -> threading.Thread:
        """``thread`` while it runs; else a new one (a restart, counted, if one had run before)."""
        if thread is not None and thread.is_alive():
            return thread
        if thread is not None:
            self.health.restarts += 1
            log.error(
                "store.writer_restarted", extra={"restarts": self.health.restarts, "writer_thread": name}
            )
        self._stopping.clear()
        fresh = threading.Thread(target=target, name=name, daemon=True)
        fresh.start()
        return fresh

    def check(self) -> None:
        """The supervisor check: start again whichever writer thread exited."""
        self.start()
        if self._apart_thread is not None:
            self._start_apart()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Jobs waiting: those not yet taken by the thread and those in its lanes (a gauge's view,
        read from another thread without a lock)."""
        lanes = getattr(self, "_lanes", None)
        return self._queue.qsize() + (len(lanes) if lanes is not None else 0) + self._apart_queue.qsize()

    def stop(self, timeout: float = 10) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            apart, self._apart_thread = self._apart_thread, None
        if thread is not None or apart is not None:
            self._stopping.set()
        if apart is not None:
            self._apart_queue.put(_STOP)
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)
        if apart is not None:
            apart.join(timeout)
        self._release_held()
        if self._checkpointer is not None and (thread is not None or apart is not None):
            self._checkpointer.stop(timeout)
            # the pooled connections have the automatic checkpoint off: new ones have it on again
            _quiet(self.store.writer.dispose)

    # ------------------------------------------------------------------ callers
    async def run(
        self,
        job: Callable[[Tx], T],
        timeout: float | None = None,
        lane: str = DEFAULT_LANE,
        heavy: bool = False,
        apart: bool = False,
    ) -> T:
        """Run ``job`` in the next group transaction; returns after that transaction committed.

        ``lane`` names whose work it is (a channel, a request): batches are formed round-robin
        over the lanes. ``heavy`` marks a long job (a Bundle or a slice of one): it is committed in
        a batch of its own, alternating with batches of light jobs. ``apart`` (with ``heavy``): a
        long job that takes the shared locks only at its end; on PostgreSQL it is committed on a
        connection of its own, concurrently with the other jobs.

        Raises :class:`StoreUnavailable` when the store fails or ``timeout`` seconds (default
        ``commit_timeout``) pass first. After a timeout the job either never runs (it was still
        queued) or may still commit later: a resend of the same message is then answered from the
        duplicate store. The job's own errors are raised as they are."""
        fut = self._submit(job, lane, heavy, apart)
        wait = self.commit_timeout if timeout is None else timeout
        try:
            # on timeout or cancellation wait_for cancels the wrapper, which cancels ``fut``:
            # a job that has not started never runs
            return await asyncio.wait_for(asyncio.wrap_future(fut), wait)
        except TimeoutError:
            fut.cancel()
            raise StoreUnavailable(f"no commit within {wait:g} s") from None

    def run_sync(
        self,
        job: Callable[[Tx], T],
        timeout: float | None = None,
        lane: str = DEFAULT_LANE,
        heavy: bool = False,
        apart: bool = False,
    ) -> T:
        """The same, from a thread that is not an event loop (CLI, tests)."""
        fut = self._submit(job, lane, heavy, apart)
        wait = self.commit_timeout if timeout is None else timeout
        try:
            return fut.result(wait)
        except FutureTimeout:
            fut.cancel()
            raise StoreUnavailable(f"no commit within {wait:g} s") from None

    def _submit(
        self, job: Callable[[Tx], T], lane: str = DEFAULT_LANE, heavy: bool = False, apart: bool = False
    ) -> Future[T]:
        fut: Future[T] = Future()
        if heavy and apart and self.apart:
            self._start_apart()
            self._apart_queue.put(_Job(job, fut, lane, heavy))
            return fut
        self.start()
        self._queue.put(_Job(job, fut, lane, heavy))
        return fut

    async def probe(self, timeout: float = 2.0) -> str | None:
        """Commit a trivial transaction through the writer; None when it did, else why not."""
        try:
            await self.run(lambda tx: tx.execute(text("SELECT 1")).scalar_one(), timeout=timeout)
        except StoreUnavailable as exc:
            return exc.reason
        return None

    # ------------------------------------------------------------------ the thread
    def others_waiting(self) -> bool:
        """Whether jobs wait behind the running one. For a job on the writer thread that can stop
        early (a slice of a batch Bundle), so that they get their commit sooner."""
        return not self._queue.empty() or bool(self._lanes)

    def _apart_loop(self) -> None:
        """The thread of the jobs run apart: one job, one transaction, one at a time."""
        unpinged.on = True  # a batch found on a dead connection runs again (_commit)
        job: _Job | None = None
        try:
            while True:
                item = self._apart_queue.get()
                if item is _STOP:
                    return
                job = item
                assert isinstance(job, _Job)
                if job.fut.set_running_or_notify_cancel():  # else its caller gave up: never run
                    self._pause()
                    self._commit([(job.work, job.fut)], track=False)
                job = None
        except BaseException as exc:  # noqa: BLE001 - logged; the next heavy job starts a new thread
            log.critical("store.writer_died", extra={"error_type": type(exc).__name__})
            left = [job] if job is not None else []
            while True:
                try:
                    item = self._apart_queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Job):
                    left.append(item)
            for j in left:
                self._settle(j.fut, None, StoreUnavailable("the writer thread stopped"))
        finally:
            self._drop_held()

    def _loop(self) -> None:
        unpinged.on = True  # a batch found on a dead connection runs again (_commit)
        lanes = self._lanes = _Lanes()
        batch: list[_Job] = []
        try:
            stop = False
            while True:
                if not lanes:
                    if stop:
                        return
                    stop = self._intake(lanes, self._queue.get())
                # everything queued meanwhile joins its lane before the batch is formed
                while not stop:
                    try:
                        stop = self._intake(lanes, self._queue.get_nowait())
                    except queue.Empty:
                        break
                batch = lanes.batch(self.max_batch)
                # a caller that gave up before its job started: the job is dropped, never half-run
                batch = [job for job in batch if job.fut.set_running_or_notify_cancel()]
                if batch:
                    self._pause()
                    self._commit([(job.work, job.fut) for job in batch])
                batch = []
        except BaseException as exc:  # noqa: BLE001 - logged; the supervisor starts a new thread
            log.critical("store.writer_died", extra={"error_type": type(exc).__name__})
            for job in batch + lanes.drop_all():
                self._settle(job.fut, None, StoreUnavailable("the writer thread stopped"))
        finally:
            self._drop_held()

    @staticmethod
    def _intake(lanes: _Lanes, item: Any) -> bool:
        """Queue ``item`` in its lane; True for the stop mark (the jobs queued before it still run)."""
        if item is _STOP:
            return True
        if isinstance(item, _Job):
            lanes.add(item)
        else:  # a bare (job, future) pair
            job, fut = item
            lanes.add(_Job(job, fut))
        return False

    def _pause(self) -> None:
        """Wait out the reconnect backoff after a failure of the store (stop cuts it short)."""
        if self._backoff > 0:
            self._stopping.wait(self._backoff)

    def _commit(self, batch: list[tuple[Callable[[Tx], Any], Future[Any]]], track: bool = True) -> None:
        """Commit ``batch`` and settle its futures. ``track``: the batch is the writer thread's, whose
        start ``health.busy_since`` shows (a heavy job apart does not hold up the others)."""
        started = time.monotonic()
        if track:
            self.health.busy_since = started
        try:
            # --- cluster (task J, docs/scale-out.md): a deadlock or serialization failure against
            # another instance's transaction rolled the batch back whole; run it again, bounded.
            with fairness.writer_running():  # a large request's preparation waits meanwhile
                try:
                    outcomes = conflicts.retrying(lambda: self._commit_batch(batch), _conflicted)
                except _StoreFailure as failure:
                    if not _stale(failure):
                        raise
                    # a pooled connection had died (PostgreSQL: a restart, a kill) before the
                    # COMMIT was sent: nothing of the batch is committed, and SQLAlchemy has marked
                    # the pool stale. Once more, on a new connection (store/db.py, pinging only
                    # after idle, leaves this case to here).
                    log.info("writer.reconnected", extra={"stage": failure.stage})
                    _quiet(self.store.writer.dispose)  # the pool's other connections died with it
                    outcomes = conflicts.retrying(lambda: self._commit_batch(batch), _conflicted)
            # --- end cluster
        except _StoreFailure as failure:
            self._failed(failure, len(batch))
            unavailable = StoreUnavailable(f"{failure.stage} failed")
            for _work, fut in batch:
                self._settle(fut, None, unavailable)
            return
        except Exception as exc:  # noqa: BLE001 - anything else: still the batch's failure, never the thread's
            self._failed(_StoreFailure("batch", exc), len(batch))
            for _work, fut in batch:
                self._settle(fut, None, StoreUnavailable("batch failed"))
            return
        finally:
            busy = time.monotonic() - started
            if track:
                self.health.busy_since = None
        metrics.WRITER_BATCH_SECONDS.observe(busy)
        metrics.WRITER_BATCH_JOBS.observe(len(batch))
        self._committed(len(batch))
        for fut, result, error in outcomes:
            self._settle(fut, result, error)

    def _commit_batch(
        self, batch: list[tuple[Callable[[Tx], Any], Future[Any]]]
    ) -> list[tuple[Future[Any], Any, BaseException | None]]:
        if len(batch) == 1:
            return self._commit_one(*batch[0])
        return self._commit_many(batch)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The committing thread's writer connection for one batch (:meth:`_connect`). It is kept
        for the thread's next batch when the batch leaves it outside a transaction, and closed
        (given back to the pool, or discarded when invalidated) when the batch raised: checking a
        connection out of the pool and back for every batch cost about a tenth of the writer's
        time with one sender (engine.connect, the checkout and checkin events, the reset)."""
        conn = self._connect()
        try:
            yield conn
        except BaseException:
            _quiet(conn.close)
            raise
        if conn.closed or conn.invalidated or conn.in_transaction():
            _quiet(conn.close)
            return
        self._held[threading.get_ident()] = _Held(conn, time.monotonic())

    def _connect(self) -> Any:
        """A writer connection; on SQLite in a file, with the automatic WAL checkpoint off (the
        checkpointer thread runs it, see :class:`~hms_ach.store.db.Checkpointer`), and the WAL
        started over first when the checkpointer asks for it.

        The connection this thread kept from its last batch is used again while it was idle less
        than :data:`~hms_ach.store.db.PING_AFTER_IDLE_SECONDS`; an older one goes back to the pool
        and a new one is checked out, so that PostgreSQL's pool pings it as it did every idle one
        (store/db.py): under load the writer never checks a connection out or in."""
        held = self._held.pop(threading.get_ident(), None)
        conn = None
        if held is not None:
            if time.monotonic() - held.since < PING_AFTER_IDLE_SECONDS and not held.conn.invalidated:
                conn = held.conn
            else:
                _quiet(held.conn.close)
        if conn is None:
            conn = _stage("connect", self.store.writer.connect)
        if self._checkpointer is not None:
            try:
                self._checkpointer.disable_auto(conn)
            except Exception as exc:  # noqa: BLE001 - the store failed, not a job
                _quiet(conn.close)
                raise _StoreFailure("connect", exc) from exc
            self._checkpointer.restart_before_write(conn)  # a long WAL starts over (never raises)
        return conn

    def _drop_held(self, ident: int | None = None) -> None:
        """Close the connection thread ``ident`` kept (default: this thread's, as its loop ends)."""
        held = self._held.pop(threading.get_ident() if ident is None else ident, None)
        if held is not None:
            _quiet(held.conn.close)

    def _release_held(self) -> None:
        """Close the connections kept by threads that no longer commit (stopped, or the caller's
        own): before the pool is emptied, or a stopped engine would leave them checked out."""
        me = threading.get_ident()
        alive = {t.ident for t in threading.enumerate()}
        for ident in list(self._held):
            if ident == me or ident not in alive:
                self._drop_held(ident)

    def _did_commit(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    def _commit_many(
        self, batch: list[tuple[Callable[[Tx], Any], Future[Any]]]
    ) -> list[tuple[Future[Any], Any, BaseException | None]]:
        """The batch's jobs one after the other in one transaction, without a SAVEPOINT each (two
        statements per job saved); if any job raises, the transaction is rolled back whole and the
        batch runs again with a SAVEPOINT per job (:meth:`_commit_saved`), so that only the failed
        job's work is undone. A job may run twice that way, as after a conflict (store/conflicts.py):
        jobs are functions of the connection only."""
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        with self._connection() as conn:
            txn = _begin(conn)
            try:
                with optimistic(conn):
                    for job, fut in batch:
                        try:
                            result = job(conn)
                        except Exception as exc:  # noqa: BLE001 - this job's fault: replayed below
                            if _is_store_failure(exc):
                                raise _StoreFailure("statement", exc) from exc
                            break
                        outcomes.append((fut, result, None))
                    else:
                        _finish(conn, txn)
                        self._did_commit()
                        return outcomes
                _stage("rollback", txn.rollback)
            except BaseException:
                _quiet(txn.rollback)
                raise
        self.replays += 1
        return self._commit_saved(batch)

    def _commit_saved(
        self, batch: list[tuple[Callable[[Tx], Any], Future[Any]]]
    ) -> list[tuple[Future[Any], Any, BaseException | None]]:
        """The batch in one transaction, each job in a SAVEPOINT of its own: a job that raises
        has its work rolled back and its error reported; the others commit."""
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        with self._connection() as conn:
            txn = _begin(conn)
            try:
                for job, fut in batch:
                    savepoint = _stage("savepoint", conn.begin_nested)
                    try:
                        result = job(conn)
                    except Exception as exc:  # noqa: BLE001 - reported to the job's caller
                        if _is_store_failure(exc):
                            raise _StoreFailure("statement", exc) from exc
                        _stage("rollback to savepoint", savepoint.rollback)
                        outcomes.append((fut, None, exc))
                        continue
                    _stage("release savepoint", savepoint.commit)
                    outcomes.append((fut, result, None))
                _finish(conn, txn)
                self._did_commit()
            except BaseException:
                _quiet(txn.rollback)
                raise
        return outcomes

    def _commit_one(
        self, job: Callable[[Tx], Any], fut: Future[Any]
    ) -> list[tuple[Future[Any], Any, BaseException | None]]:
        """A batch of one job needs no SAVEPOINT: if the job fails, the whole transaction rolls back.
        It runs optimistically too: a part of it that needs its own SAVEPOINT to undo a failure
        (:class:`~hms_ach.store.savepoint.SavepointNeeded`) has the job run again with them."""
        with self._connection() as conn:
            txn = _begin(conn)
            try:
                with optimistic(conn):
                    result = job(conn)
            except Exception as exc:  # noqa: BLE001 - reported to the job's caller
                if _is_store_failure(exc):
                    _quiet(txn.rollback)
                    raise _StoreFailure("statement", exc) from exc
                _stage("rollback", txn.rollback)
                if isinstance(exc, SavepointNeeded):
                    replay = True
                else:
                    return [(fut, None, exc)]
            else:
                replay = False
            if not replay:
                try:
                    _finish(conn, txn)
                    self._did_commit()
                except BaseException:
                    _quiet(txn.rollback)
                    raise
        if replay:  # a part of the job needs its SAVEPOINT: run it again with them
            self.replays += 1
            return self._commit_saved([(job, fut)])
        return [(fut, result, None)]

    def _committed(self, jobs: int) -> None:
        self.batches += 1
        self.jobs += jobs
        self._backoff = 0.0
        self.health.consecutive_failures = 0
        self.health.failing_since = None
        self.health.last_commit_at = datetime.now(UTC).isoformat()

    def _failed(self, failure: _StoreFailure, jobs: int) -> None:
        h = self.health
        metrics.WRITER_FAILURES.labels(failure.stage).inc()
        h.consecutive_failures += 1
        if h.failing_since is None:
            h.failing_since = time.monotonic()
        h.last_error = f"{failure.stage}: {type(failure.cause).__name__}"
        h.last_error_at = datetime.now(UTC).isoformat()
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        log.error(
            "store.commit_failed",
            extra={
                "batch": jobs,
                "stage": failure.stage,
                "error_type": type(failure.cause).__name__,
                "consecutive_failures": h.consecutive_failures,
                "retry_in_seconds": self._backoff,
            },
        )
        # drop the pool's connections: a dead one must not be handed out again
        _quiet(self.store.writer.dispose)

    @staticmethod
    def _settle(fut: Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():  # the caller gave up waiting; the work is committed all the same
            return
        try:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
        except Exception:  # noqa: BLE001 - settled concurrently (InvalidStateError): nothing to do
            pass


def _conflicted(exc: BaseException) -> bool:
    """Cluster (task J): the batch failed on a conflict with a concurrent transaction, not an outage."""
    return isinstance(exc, _StoreFailure) and conflicts.is_retryable(exc.cause)


def _stale(failure: _StoreFailure) -> bool:
    """The batch failed on a connection found dead before its COMMIT was sent (the server ended it):
    the transaction cannot have committed, so the batch may run again. At the COMMIT the outcome is
    unknown: that failure is answered negatively, and the sender's resend finds what was stored."""
    return failure.stage not in ("connect", "commit") and bool(
        getattr(failure.cause, "connection_invalidated", False)
    )


def _stage(stage: str, call: Callable[[], T]) -> T:
    """``call()``, with any failure reported as a failure of the store at ``stage``."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the store failed, not the job
        raise _StoreFailure(stage, exc) from exc


def _quiet(call: Callable[[], Any]) -> None:
    """Clean-up after a failure (rollback, close): its own failure changes nothing."""
    try:
        call()
    except Exception:  # noqa: BLE001 - the connection is already broken; the batch already failed
        pass
