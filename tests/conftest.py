"""Shared fixtures: ``store``, a fresh empty store per test.

It runs on SQLite (a file under ``tmp_path``) and, when ``HMS_ACH_TEST_POSTGRES_URL`` is set, also
on PostgreSQL, where each test gets its own schema (dropped afterwards), so tests never see each
other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from hms_ach.app.wiring import wire_listeners
from hms_ach.store.db import Store, normalise_url

PG_URL = os.environ.get("HMS_ACH_TEST_POSTGRES_URL")
STORE_BACKENDS = ["sqlite"] + (["postgres"] if PG_URL else [])


def _admin(op: str, schema: str) -> None:
    assert PG_URL
    engine = create_engine(normalise_url(PG_URL))
    try:
        with engine.begin() as conn:
            conn.execute(text(f'{op} SCHEMA "{schema}"' + (" CASCADE" if op == "DROP" else "")))
    finally:
        engine.dispose()


@pytest.fixture(autouse=True, scope="session")
def _change_listeners() -> None:
    """Record changes write their outbox events and a discharge its Claim, as in the engine: the
    same one call the composition root makes (:func:`hms_ach.app.wiring.wire_listeners`)."""
    wire_listeners()


@contextmanager
def empty_store(backend: str, tmp_path: Path, name: str = "store") -> Iterator[Store]:
    """An empty store with all tables created, disposed of (its schema dropped) when the block ends:
    SQLite in ``tmp_path``/``name``.db, or PostgreSQL (``backend`` "postgres") in a schema of its own."""
    if backend == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/{name}.db")
        try:
            yield s
        finally:
            s.dispose()
        return
    assert PG_URL
    schema = f"test_{uuid.uuid4().hex[:12]}"
    _admin("CREATE", schema)
    sep = "&" if "?" in PG_URL else "?"
    s = Store(f"{PG_URL}{sep}options=-csearch_path%3D{schema}")
    try:
        yield s
    finally:
        s.dispose()
        _admin("DROP", schema)


@pytest.fixture(params=STORE_BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store with all tables created: SQLite, or PostgreSQL in a schema of its own."""
    with empty_store(request.param, tmp_path) as s:
        yield s
