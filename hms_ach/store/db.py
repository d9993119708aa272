"""Database engines for the store: SQLite (embedded default) and PostgreSQL.

SQLite is opened in WAL mode with ``synchronous=FULL`` so that a committed transaction survives a
power loss: an ACK sent after commit then really means durable. Write transactions start with
``BEGIN IMMEDIATE`` so that writers queue on the lock instead of failing half-way, and a
``busy_timeout`` lets readers and a second process wait rather than error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import SQLModel, create_engine

from hms_ach.store import (
    models,  # noqa: F401  (registers the tables on SQLModel.metadata)
    txcache,
)

DEFAULT_DATABASE_URL = "sqlite:///hms_ach.db"


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
    return engine


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

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()
