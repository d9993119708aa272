"""Database engines for the store: SQLite (embedded default) and PostgreSQL.

SQLite is opened in WAL mode with ``synchronous=FULL`` so that a committed transaction survives a
power loss: an ACK sent after commit then really means durable. Write transactions start with
``BEGIN IMMEDIATE`` so that writers queue on the lock instead of failing half-way, and a
``busy_timeout`` lets readers and a second process wait rather than error.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel, create_engine

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


def make_engine(url: str, *, create: bool = True, writer: bool = True) -> Engine:
    """An engine for ``url``; ``writer=False`` gives SQLite readers plain deferred transactions."""
    url = normalise_url(url)
    txcache.install()
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"hide_parameters": True}  # no field values in SQL error text or logs
    if is_sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 10
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        _configure_sqlite(engine, immediate=writer)
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


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


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

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection of the reader pool, for reads that are not part of a write."""
        with self.reader.connect() as conn:
            yield conn

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
            out.append((name, int(in_use), int(idle)))
        return out

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
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
        """A :class:`Checkpointer` for this store (SQLite in a file), None where there is none to run
        (PostgreSQL, an in-memory database)."""
        if not is_sqlite(self.writer):
            return None
        path = self.writer.url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        return Checkpointer(path)

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


class Checkpointer:
    """SQLite WAL checkpoints on a thread and connection of their own, off the commit path.

    With SQLite's default (``wal_autocheckpoint=1000``) the commit that grows the WAL past 1,000
    pages runs the checkpoint itself: it copies the WAL into the database file and fsyncs it before
    that commit returns, so every few dozen commits one of them (and the ACKs waiting on it) takes
    several times longer. The group-commit writer turns the automatic checkpoint off on its own
    connections (:meth:`disable_auto`) and starts this thread instead: every
    :data:`CHECKPOINT_INTERVAL` seconds after a commit it runs ``PRAGMA wal_checkpoint(PASSIVE)``,
    which never waits for a lock and never blocks the writer. A completed checkpoint lets the next
    write start the WAL again from its beginning, so the WAL stays about as large as a quarter of a
    second of commits (as today, a reader holding an old snapshot can keep it growing until it is
    done). A stopping engine still truncates the WAL (:meth:`Store.checkpoint`).
    """

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL):
        self.path = path
        self.interval = interval
        self.runs = 0
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

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="hms-ach-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A commit added to the WAL: the next round checkpoints it."""
        self._dirty.set()

    def stop(self, timeout: float = 10) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._dirty.set()
        thread.join(timeout)

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stopping.is_set():
                self._dirty.wait()
                if self._stopping.wait(self.interval):
                    break
                self._dirty.clear()
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                        conn.execute("PRAGMA busy_timeout=0")  # PASSIVE never waits for a lock
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                except sqlite3.Error as exc:  # busy, a full disk: the next round tries again
                    log.warning("store.checkpoint_failed", extra={"error_type": type(exc).__name__})
                    self._dirty.set()
            # the last commits before the stop: checkpointed too, so the WAL is short for the TRUNCATE
            if conn is not None:
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    pass
        except Exception as exc:  # noqa: BLE001 - the thread must not die silently
            log.error("store.checkpointer_died", extra={"error_type": type(exc).__name__})
        finally:
            if conn is not None:
                conn.close()
