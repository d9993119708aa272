"""Database engines for the store: SQLite (embedded default) and PostgreSQL.

SQLite is opened in WAL mode with ``synchronous=FULL`` so that a committed transaction survives a
power loss: an ACK sent after commit then really means durable. Write transactions start with
``BEGIN IMMEDIATE`` so that writers queue on the lock instead of failing half-way, and a
``busy_timeout`` lets readers and a second process wait rather than error.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import QueuePool
from sqlmodel import SQLModel, create_engine

from hms_ach.core import metrics
from hms_ach.store import (
    models,  # noqa: F401  (registers the tables on SQLModel.metadata)
    txcache,
)

log = logging.getLogger("hms_ach.store.db")

DEFAULT_DATABASE_URL = "sqlite:///hms_ach.db"
#: How long the WAL checkpoint of a stopping engine waits for another connection's lock.
CHECKPOINT_BUSY_MS = 1000


def database_url(configured: str | None = None) -> str:
    """The store URL: HMS_ACH_DATABASE_URL, else the configured one, else ./hms_ach.db."""
    return os.environ.get("HMS_ACH_DATABASE_URL") or configured or DEFAULT_DATABASE_URL


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use psycopg 3 for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


#: SQLite readers kept open (the API's threads read on them; each keeps its page cache and parsed
#: schema), and how many more may be open at once. With SQLAlchemy's default (5) eight concurrent
#: FHIR searches opened and closed a connection for most requests, each with its PRAGMAs and a
#: cold cache.
READER_POOL_SIZE = 16
READER_POOL_OVERFLOW = 24


def make_engine(url: str, *, create: bool = True, writer: bool = True) -> Engine:
    """An engine for ``url``; ``writer=False`` gives SQLite readers plain deferred transactions."""
    url = normalise_url(url)
    txcache.install()
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"hide_parameters": True}  # no field values in SQL error text or logs
    if is_sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        parsed = make_url(url)
        dialect: Any = parsed.get_dialect()  # pysqlite's: its get_pool_class is not in Dialect's typing
        # a file gets a QueuePool, an in-memory database one connection (SQLAlchemy's own choice)
        if not writer and issubclass(dialect.get_pool_class(parsed), QueuePool):
            kwargs["pool_size"] = READER_POOL_SIZE
            kwargs["max_overflow"] = READER_POOL_OVERFLOW
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 10
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        _configure_sqlite(engine, immediate=writer)
    else:
        _ping_after_idle(engine)
    if create:
        SQLModel.metadata.create_all(engine)
        _add_columns(engine)
    return engine


#: Columns added to existing tables after the first release: (table, column, SQL type). create_all
#: makes new tables only, so a store of an earlier version gains these here, once, on open.
_ADDED_COLUMNS = (("audit_entry", "actor", "TEXT"), ("access_record", "prev_hash", "VARCHAR(64)"))


#: Indexes added to existing tables after the first release: (name, table, columns). create_all makes
#: them only with new tables, so a store of an earlier version gains these on open (IF NOT EXISTS).
_ADDED_INDEXES = (("ix_history_message", "resource_history", "message_id"),)


def _add_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    for name, table, columns in _ADDED_INDEXES:
        if name not in {ix["name"] for ix in inspector.get_indexes(table)}:  # built once, on first open
            with engine.begin() as conn:
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))
    for table, column, sql_type in _ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""  # two starting at once
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {guard}{column} {sql_type}"))


#: PostgreSQL: a pooled connection is pinged before it is handed out, and replaced if the server no
#: longer answers on it (a restart, a firewall's idle cut, a DBA's kill), as SQLAlchemy's
#: ``pool_pre_ping`` does; but on the group-commit writer's thread only after it sat unused this
#: long. Under load a ping before every batch was a round trip in each (5.9% of the writer's waits
#: at 8 MLLP connections); a connection that died in between fails its batch's first statement
#: instead, before any COMMIT, and the writer runs the batch again on a new one
#: (``store/writer.py``, ``_stale``), which every other user of the pool could not.
PING_AFTER_IDLE_SECONDS = 1.0

#: ``unpinged.on`` is True on a thread that runs its transactions again when their connection was
#: found dead before the COMMIT (the group-commit writer's): see :data:`PING_AFTER_IDLE_SECONDS`.
unpinged = threading.local()


def _ping_after_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None:
            return  # just connected
        if getattr(unpinged, "on", False) and time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # the writer's, in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - any failure of the ping: the pool connects again
            raise DisconnectionError("the pooled connection did not answer its ping") from exc


def _configure_sqlite(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (needed for SAVEPOINT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # the WAL file goes back to this size when it starts over (see Checkpointer)
        cursor.execute(f"PRAGMA journal_size_limit={WAL_RESTART_BYTES}")
        if immediate:
            # Writer connections (the group-commit writer's, and the few jobs and sinks that write)
            # keep up to 64 MiB of pages each (the default is 2 MiB), so the record and index pages
            # every message touches stay in memory. Readers keep the default: the API's pool may
            # hold many of them, and each connection has its own cache.
            cursor.execute("PRAGMA cache_size=-65536")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def _budgeted(conn: Connection, budget: ReadBudget) -> Iterator[None]:
    """``budget``'s deadline on the SQLite connection ``conn`` for the block (its progress handler),
    taken off before the connection is handed to anyone else."""
    raw = conn.connection.dbapi_connection
    raw.set_progress_handler(budget.check, BUDGET_STEPS)  # type: ignore[union-attr]
    try:
        yield
    finally:
        try:
            raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
        except sqlite3.Error:  # closed meanwhile: nobody gets it with the handler on
            pass


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class ReadBudget:
    """The deadline of the SQLite reads made inside :func:`read_budget`, and whether one of them ran
    past it (``spent``: it was interrupted then)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.spent = False

    def check(self) -> int:
        """SQLite's progress handler: non-zero (interrupt the statement) once the deadline passed."""
        if time.monotonic() < self.deadline:
            return 0
        self.spent = True
        return 1


_READ_BUDGET: contextvars.ContextVar[ReadBudget | None] = contextvars.ContextVar(
    "hms_ach_read_budget", default=None
)
#: SQLite virtual-machine steps between two looks at a read's deadline (a look is a Python call).
BUDGET_STEPS = 4000


@contextmanager
def read_budget(seconds: float) -> Iterator[ReadBudget]:
    """For work that must not hold its thread longer than ``seconds`` (a search on the event loop):
    the statements that :meth:`Store.read` connections run in the block (in this context, on a
    store where :attr:`Store.bounded_reads`) are interrupted once ``seconds`` have passed since the
    block began. The statement running then fails (SQLite's ``interrupted``) and so does every
    later one; ``spent`` says so, whatever the code in the block made of the error, and the caller
    does the work again without a budget. Time spent outside SQLite is not interrupted, only
    counted at its next statement."""
    budget = ReadBudget(time.monotonic() + seconds)
    token = _READ_BUDGET.set(budget)
    try:
        yield budget
    finally:
        _READ_BUDGET.reset(token)


class Store:
    """The engines of one store: ``writer`` (SQLite: BEGIN IMMEDIATE) and ``reader`` (deferred).

    Code outside ``store/`` reaches them through :meth:`read` and :meth:`transaction` (or the
    group-commit writer), and hands the connection to store functions.
    """

    def __init__(self, url: str):
        self.url = normalise_url(url)
        self.writer = make_engine(self.url, create=True, writer=True)
        self.reader = (
            self.writer if not is_sqlite(self.writer) else make_engine(self.url, create=False, writer=False)
        )
        # SQLite in a file: the reader connections :meth:`read` keeps between reads (see there)
        self._idle_readers: deque[Connection] | None = (
            deque() if self.reader is not self.writer and isinstance(self.reader.pool, QueuePool) else None
        )

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection of the reader pool, for reads that are not part of a write.

        On SQLite in a file, up to :data:`READER_POOL_SIZE` of them (with those idle in the pool)
        are kept checked out between reads, outside any transaction (so that they hold no snapshot
        of the WAL), and handed to the next read: SQLAlchemy's ``connect`` and ``close`` (the pool's
        checkout, checkin and reset) cost about a sixth of a FHIR search's own work, more than the
        page's statements."""
        idle = self._idle_readers
        if idle is None:
            with self.reader.connect() as conn:
                yield conn
            return
        try:
            conn = idle.pop()
        except IndexError:
            conn = self.reader.connect()
        budget = _READ_BUDGET.get()
        try:
            if budget is None:
                yield conn
            else:
                with _budgeted(conn, budget):
                    yield conn
            if conn.in_transaction():  # a read that let SQLAlchemy begin one: its snapshot ends
                conn.rollback()
        except BaseException:
            conn.close()
            raise
        if conn.closed or conn.invalidated:
            conn.close()
        elif len(idle) + self.reader.pool.checkedin() >= READER_POOL_SIZE:  # type: ignore[attr-defined]
            conn.detach()  # enough are open and idle: this one is closed, not pooled
            conn.close()
        else:
            idle.append(conn)

    @property
    def bounded_reads(self) -> bool:
        """Whether :func:`read_budget` bounds this store's reads (SQLite in a file)."""
        return self._idle_readers is not None

    def _close_idle_readers(self) -> None:
        """Close the readers :meth:`read` keeps (before the pool is emptied or the WAL truncated)."""
        idle = self._idle_readers
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                break
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing an idle SQLite connection: nothing to undo
                pass

    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator[Connection]:
        """A write transaction on a writer connection, outside the group-commit writer (the outbox
        dispatcher, the 837 sink, replay, CLI maintenance): committed when the block ends, rolled
        back when it raises or when ``commit`` is False (a dry run)."""
        with self.writer.connect() as conn:
            txn = conn.begin()
            try:
                yield conn
            except BaseException:
                txn.rollback()
                raise
            if commit:
                txn.commit()
            else:
                txn.rollback()

    def pool_states(self) -> list[tuple[str, int, int]]:
        """(pool, connections in use, idle connections) of the writer's and the readers' pools."""
        out = []
        pools = [("writer", self.writer)] + (
            [("reader", self.reader)] if self.reader is not self.writer else []
        )
        for name, engine in pools:
            pool = engine.pool
            in_use = getattr(pool, "checkedout", lambda: 0)()
            idle = getattr(pool, "checkedin", lambda: 0)()
            if engine is self.reader and self._idle_readers is not None:
                kept = len(self._idle_readers)  # checked out of the pool, but idle
                in_use, idle = in_use - kept, idle + kept
            out.append((name, int(in_use), int(idle)))
        return out

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self._close_idle_readers()
            self.reader.dispose()

    def checkpoint(self) -> bool | None:
        """SQLite: copy the WAL into the database file and truncate it to 0 bytes
        (``PRAGMA wal_checkpoint(TRUNCATE)``), so that a stopped engine leaves a self-contained
        database file. True when the checkpoint completed, False when a reader or writer of another
        connection kept it from completing (the WAL stays valid: the next start replays it), None on
        PostgreSQL (nothing to do)."""
        if not is_sqlite(self.writer):
            return None
        if self.reader is not self.writer:
            self._close_idle_readers()
            self.reader.dispose()  # our own idle readers must not hold the WAL open
        raw = self.writer.raw_connection()  # autocommit (isolation_level None): no BEGIN around it
        try:
            cursor = raw.cursor()
            try:
                # another process holding the write lock must not hold up a stop for busy_timeout
                cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            raw.close()
        return row is not None and int(row[0]) == 0  # (busy, log frames, checkpointed frames)

    def checkpointer(self) -> Checkpointer | None:
        """The :class:`Checkpointer` of this store (SQLite in a file; one per store, made on first
        use, so that the writer that runs it and the readiness check that watches it see the same
        one), None where there is none to run (PostgreSQL, an in-memory database)."""
        made: Checkpointer | None = getattr(self, "_checkpointer", None)
        if made is not None or not is_sqlite(self.writer):
            return made
        path = self.writer.url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        self._checkpointer = Checkpointer(path)
        return self._checkpointer

    def close(self) -> bool | None:
        """Checkpoint (SQLite) and close every pooled connection; what :meth:`checkpoint` returned
        (False also when the checkpoint failed: a full disk, a database that went away)."""
        try:
            return self.checkpoint()
        except (DBAPIError, sqlite3.Error):
            return False
        finally:
            self.dispose()


#: How often the checkpointer copies the WAL into the database file while commits happen (seconds).
CHECKPOINT_INTERVAL = 0.25
#: A checkpointer thread that exited is started again at most this many times per window...
CHECKPOINTER_MAX_RESTARTS = 5
#: ...of this many seconds; past that it stays stopped (and readiness fails) until the window passes.
CHECKPOINTER_RESTART_WINDOW = 60.0
#: A run of failed checkpoints logs its first failure, then at most one line per this many seconds.
CHECKPOINT_FAILURE_LOG_SECONDS = 60.0
#: A WAL that holds this many bytes of frames is started over from its beginning (see
#: :class:`Checkpointer`); SQLite cuts the WAL file back to this size when it starts over.
WAL_RESTART_BYTES = 128 * 1024 * 1024
#: The writer starts the WAL over only while at most this much was committed since the round that
#: asked (its own checkpoint copies that much before its transaction)...
WAL_RESTART_DELTA_BYTES = 4 * 1024 * 1024
#: ...unless the WAL is past this many times WAL_RESTART_BYTES.
WAL_RESTART_FORCE_FACTOR = 4


class Checkpointer:
    """SQLite WAL checkpoints on a thread and connection of their own, off the commit path.

    With SQLite's default (``wal_autocheckpoint=1000``) the commit that grows the WAL past 1,000
    pages runs the checkpoint itself: it copies the WAL into the database file and fsyncs it before
    that commit returns, so every few dozen commits one of them (and the ACKs waiting on it) takes
    several times longer. The group-commit writer turns the automatic checkpoint off on its own
    connections (:meth:`disable_auto`) and starts this thread instead: every
    :data:`CHECKPOINT_INTERVAL` seconds after a commit it runs ``PRAGMA wal_checkpoint(PASSIVE)``,
    which never waits for a lock and never blocks the writer. A stopping engine still truncates the
    WAL (:meth:`Store.checkpoint`).

    A PASSIVE checkpoint alone does not keep the WAL short under a steady stream of commits. SQLite
    starts the WAL over from its beginning only when a write transaction begins while every frame is
    already copied; with the writer committing every few milliseconds the next commit always came
    before this thread was done, so the WAL grew without end (7 GB in two minutes of figure B's eight
    connections; its index, mapped into the process, grew the RSS by 6-7 MB per 10,000 messages).
    So when a complete round finds :data:`WAL_RESTART_BYTES` or more of frames, it asks the writer
    to start the WAL over (:attr:`restart_wanted`): before its next transaction the writer runs a
    PASSIVE checkpoint of its own (:meth:`restart_before_write`), which copies only the frames
    committed since this round and waits for nothing, so the transaction that follows begins with
    every frame copied and starts the WAL over. The writer does it only while at most
    :data:`WAL_RESTART_DELTA_BYTES` were committed since the round (the WAL file's growth tells),
    so that its pause stays a few milliseconds; after a large transaction (a 1,000-entry Bundle) it
    waits for the next round, unless the WAL is past :data:`WAL_RESTART_FORCE_FACTOR` times the
    limit. A reader still on old frames makes SQLite skip that start-over; the next complete round
    asks again. The WAL file goes back to :data:`WAL_RESTART_BYTES` when it starts over
    (``journal_size_limit``).

    It never stops silently (docs/reliability.md, "The WAL checkpointer"):

    * a round that fails (any ``Exception``: busy, a full disk, a connection gone bad) is logged
      (``store.checkpoint_failed``, then at most once a minute while it keeps failing), its
      connection is closed and the next round opens a new one;
    * a thread that exits anyway (``store.checkpointer_died``) is started again by the next commit,
      or by the writer's supervisor check, at most :data:`CHECKPOINTER_MAX_RESTARTS` times per
      :data:`CHECKPOINTER_RESTART_WINDOW` seconds (``store.checkpointer_restarted``, counted in
      ``hms_ach_wal_checkpointer_restarts_total``); past that ``store.checkpointer_restart_refused``;
    * :meth:`problem` tells readiness when the thread is not running, or when commits have waited
      longer than a bound for a checkpoint that completes; :meth:`health` and :meth:`wal_bytes` feed
      ``/health`` and the ``hms_ach_wal_*`` gauges.
    """

    def __init__(
        self,
        path: str,
        interval: float = CHECKPOINT_INTERVAL,
        max_restarts: int = CHECKPOINTER_MAX_RESTARTS,
        restart_window: float = CHECKPOINTER_RESTART_WINDOW,
    ):
        self.path = path
        self.interval = interval
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.runs = 0  # rounds whose PRAGMA ran (complete or not)
        self.wal_restarts = 0  # the writer's checkpoints that let its next write start the WAL over
        self.restart_wanted = threading.Event()  # set by a complete round over restart_frames
        self.covered_bytes = 0  # the WAL's length in bytes when the round that asked completed
        self.frame_bytes = 4120  # set per connection from the page size
        self.restarts = 0  # threads started again after one exited
        self.last_completed_at: float | None = None  # time.time() of the last complete checkpoint
        self.last_error: str | None = None  # the error class of the last failed round, no values
        self._pending_since: float | None = None  # monotonic: first commit no complete checkpoint covers
        self._last_commit = 0.0  # monotonic time of the last commit
        self._restarted_at: deque[float] = deque()  # monotonic times of the restarts in the window
        self._refused = False  # a restart was refused (logged once until one is allowed again)
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def disable_auto(conn: Connection) -> None:
        """Turn SQLite's automatic checkpoint off on ``conn`` (once per pooled connection)."""
        info = conn.info
        if not info.get("hms_ach_manual_checkpoint"):
            # on the driver's connection: through SQLAlchemy the PRAGMA would begin a transaction
            cursor = conn.connection.cursor()
            try:
                cursor.execute("PRAGMA wal_autocheckpoint=0")
            finally:
                cursor.close()
            info["hms_ach_manual_checkpoint"] = True

    # ------------------------------------------------------------------ supervision
    def start(self) -> None:
        """Start the thread; or start it again if it exited (a restart: logged, counted, bounded)."""
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return
            if thread is not None and not self._may_restart():
                return
            self._stopping.clear()
            self._dirty.set()  # the first round checkpoints whatever the WAL holds
            fresh = threading.Thread(target=self._loop, name="hms-ach-checkpoint", daemon=True)
            fresh.start()
            self._thread = fresh

    def _may_restart(self) -> bool:
        """Whether the thread that exited may be started again now (called with the lock held)."""
        now = time.monotonic()
        while self._restarted_at and now - self._restarted_at[0] >= self.restart_window:
            self._restarted_at.popleft()
        if len(self._restarted_at) >= self.max_restarts:
            if not self._refused:
                self._refused = True
                log.critical(
                    "store.checkpointer_restart_refused",
                    extra={"restarts": len(self._restarted_at), "window_seconds": self.restart_window},
                )
            return False
        self._refused = False
        self._restarted_at.append(now)
        self.restarts += 1
        metrics.WAL_CHECKPOINTER_RESTARTS.inc()
        log.error("store.checkpointer_restarted", extra={"restarts": self.restarts})
        return True

    def revive(self) -> None:
        """Start the thread again if it exited (not if it was stopped); never raises."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            try:
                self.start()
            except Exception as exc:  # noqa: BLE001 - the caller is the writer: it must go on
                log.error("store.checkpointer_restart_failed", extra={"error_type": type(exc).__name__})

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def committed(self) -> None:
        """A commit added to the WAL: the next round checkpoints it (and a thread that exited is
        started again)."""
        now = time.monotonic()
        with self._lock:
            self._last_commit = now
            if self._pending_since is None:
                self._pending_since = now
        self._dirty.set()
        self.revive()

    def stop(self, timeout: float = 10) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._dirty.set()
        thread.join(timeout)

    # ------------------------------------------------------------------ what it shows
    def wal_bytes(self) -> int:
        """The size of the WAL file on disk (0 when there is none)."""
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    def pending_seconds(self) -> float | None:
        """How long the oldest commit no complete checkpoint has covered yet has waited, or None."""
        since = self._pending_since
        return None if since is None else time.monotonic() - since

    def problem(self, max_age_seconds: float) -> str | None:
        """Why the WAL is not being checkpointed, for readiness; None when it is. A thread that
        exited is started again first (within the restart bound). ``max_age_seconds`` (0: no
        bound): how long commits may wait for a checkpoint that completes."""
        self.revive()
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return (
                f"the WAL checkpoint thread stopped and was restarted {len(self._restarted_at)} times"
                f" within {self.restart_window:g} s; it is not restarted again before that window passes"
            )
        waited = self.pending_seconds()
        if max_age_seconds > 0 and waited is not None and waited > max_age_seconds:
            why = (
                f" (last error: {self.last_error})"
                if self.last_error
                else " (a reader holds an old snapshot?)"
            )
            return (
                f"no WAL checkpoint completed for {waited:.0f} s while commits waited, more than"
                f" {max_age_seconds:g} s; the WAL is {self.wal_bytes()} bytes{why}"
            )
        return None

    def health(self) -> dict[str, Any]:
        """The checkpointer's state for ``/health`` (no field values)."""
        waited = self.pending_seconds()
        done = self.last_completed_at
        return {
            "running": self.alive,
            "last_checkpoint_at": None if done is None else datetime.fromtimestamp(done, UTC).isoformat(),
            "pending_seconds": None if waited is None else round(waited, 3),
            "wal_bytes": self.wal_bytes(),
            "restarts": self.restarts,
            "wal_restarts": self.wal_restarts,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        failing_since: float | None = None  # monotonic time of the first failure of a run of them
        logged_at = 0.0
        try:
            while not self._stopping.is_set():
                self._dirty.wait()
                if self._stopping.wait(self.interval):
                    break
                self._dirty.clear()
                try:
                    conn = self._round(conn)
                except Exception as exc:  # noqa: BLE001 - busy, a full disk, a broken connection...
                    self.last_error = type(exc).__name__
                    self._dirty.set()  # the next round tries again, on a new connection
                    if conn is not None:
                        _close_quietly(conn)
                        conn = None
                    now = time.monotonic()
                    if failing_since is None or now - logged_at >= CHECKPOINT_FAILURE_LOG_SECONDS:
                        failing_since = failing_since or now
                        logged_at = now
                        log.warning(
                            "store.checkpoint_failed",
                            extra={
                                "error_type": self.last_error,
                                "failing_seconds": round(now - failing_since, 1),
                            },
                        )
                    continue
                if failing_since is not None:
                    log.info(
                        "store.checkpoint_recovered",
                        extra={"failing_seconds": round(time.monotonic() - failing_since, 1)},
                    )
                    failing_since = None
                    self.last_error = None
            # the last commits before the stop: checkpointed too, so the WAL is short for the TRUNCATE
            if conn is not None:
                try:
                    self._round(conn)
                except Exception:  # noqa: BLE001, S110 - the stop's TRUNCATE checkpoints anyway
                    pass
        except BaseException as exc:  # noqa: BLE001 - logged; the next commit starts a new thread
            log.error("store.checkpointer_died", extra={"error_type": type(exc).__name__})
        finally:
            if conn is not None:
                _close_quietly(conn)

    def _round(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        """One ``PRAGMA wal_checkpoint(PASSIVE)``; returns the connection for the next round. When it
        completed (every frame of the WAL copied), the commits before it are no longer pending;
        when a reader kept it from completing, the next round tries again."""
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=0")  # PASSIVE never waits for a lock
            page = conn.execute("PRAGMA page_size").fetchone()
            self.frame_bytes = int(page[0]) + 24 if page else 4120  # a WAL frame: its header and a page
        started = time.monotonic()
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.runs += 1
        busy, frames, copied = (int(v) for v in row) if row is not None else (1, 0, 0)
        if busy == 0 and frames == copied and frames >= self.restart_frames:
            self.covered_bytes = 32 + frames * self.frame_bytes  # the WAL header, then the frames
            self.restart_wanted.set()
        if busy == 0 and frames == copied:
            self.last_completed_at = time.time()
            with self._lock:
                # a commit that came while it ran may not be covered: still pending, from then on
                self._pending_since = started if self._last_commit >= started else None
        else:
            self._dirty.set()
        return conn

    @property
    def restart_frames(self) -> int:
        """The frames of :data:`WAL_RESTART_BYTES` at the database's page size."""
        return max(1, WAL_RESTART_BYTES // self.frame_bytes)

    def restart_before_write(self, conn: Connection) -> None:
        """Called by the writer on its connection before a transaction: when a round asked for it,
        a PASSIVE checkpoint of the few frames committed since, so that the transaction starts the
        WAL over (see the class's description). It waits for no lock; a failure leaves the request
        for the next transaction (and the next round asks again)."""
        if not self.restart_wanted.is_set():
            return
        wal = self.wal_bytes()  # past WAL_RESTART_BYTES the file is as long as the WAL
        if (
            wal - self.covered_bytes > WAL_RESTART_DELTA_BYTES
            and wal < WAL_RESTART_FORCE_FACTOR * WAL_RESTART_BYTES
        ):
            return  # much was committed since the round: its copy would hold this write up; the next round asks
        self.restart_wanted.clear()
        try:
            cursor = conn.connection.cursor()  # the driver's: through SQLAlchemy it would begin a transaction
            try:
                row = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                cursor.close()
        except Exception as exc:  # noqa: BLE001 - the WAL stays long a little longer; the write goes on
            self.last_error = type(exc).__name__
            log.warning("store.wal_restart_failed", extra={"error_type": self.last_error})
            return
        if row is not None and int(row[0]) == 0 and int(row[1]) == int(row[2]):
            self.wal_restarts += 1
            metrics.WAL_RESTARTS.inc()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001, S110 - closing a broken connection
        pass
