"""PostgreSQL: the store's transaction locks are per schema. Two deployments (or two test runs) in
one database under different schemas never wait for each other's audit chain, access chain or
event writers, and a fan-out never waits for another schema's open event writer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from hms_ach.store import audit, pglocks
from hms_ach.store import outbox as outbox_rows
from hms_ach.store.access_log import ACCESS_LOCK_CLASS
from hms_ach.store.db import Store
from tests.conftest import PG_URL, empty_store

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: HMS_ACH_TEST_POSTGRES_URL")


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    with empty_store("postgres", tmp_path) as a, empty_store("postgres", tmp_path) as b:
        yield a, b


def test_the_audit_and_access_locks_of_one_schema_do_not_block_another(two: tuple[Store, Store]) -> None:
    a, b = two
    with a.writer.begin() as held:
        audit.lock_chain(held)
        held.execute(text(f"SELECT {pglocks.xact_lock(ACCESS_LOCK_CLASS)}"))
        with b.writer.begin() as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            started = time.monotonic()
            audit.lock_chain(other)  # would wait (and fail at 2 s) if the key were per database
            other.execute(text(f"SELECT {pglocks.xact_lock(ACCESS_LOCK_CLASS)}"))
            assert time.monotonic() - started < 1.0
        with a.writer.begin() as same:  # the same schema still waits: the lock still serialises
            same.execute(text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(Exception, match="lock timeout"):
                audit.lock_chain(same)


def test_a_fan_out_does_not_wait_for_another_schemas_event_writer(two: tuple[Store, Store]) -> None:
    a, b = two
    slow = a.writer.connect()
    slow_tx = slow.begin()
    try:
        outbox_rows.enqueue(slow, "encounter.admitted", {"resource": "Encounter/1"})
        with b.writer.begin() as conn:
            high = outbox_rows.enqueue(conn, "encounter.admitted", {"resource": "Encounter/2"})
        with b.writer.begin() as conn:
            assert outbox_rows.settled_event_id(conn, wait_seconds=0.05) == high
        with a.writer.begin() as conn:  # its own schema's open writer still holds it back
            assert outbox_rows.settled_event_id(conn, wait_seconds=0.05) is None
        slow_tx.rollback()
    finally:
        slow.close()


def test_a_lock_class_must_fit_four_bytes() -> None:
    with pytest.raises(ValueError, match="4-byte"):
        pglocks.xact_lock(2**31)
