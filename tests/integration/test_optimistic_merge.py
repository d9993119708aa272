"""PostgreSQL, several engines on one database: a message's records are read without a lock and
merged; a record the merge leaves unchanged is never locked, and a changed one is written only
while it is still the version read. A version another engine wrote in between is read again
(locked) and the message's content merged into it: both writes are kept, in order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from hms_ach.core.records import RecordWrite
from hms_ach.store import audit, resources
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository
from tests.conftest import PG_URL, empty_store

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: HMS_ACH_TEST_POSTGRES_URL")


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Store]:
    with empty_store("postgres", tmp_path) as store:
        yield store


def _ward(**content: Any) -> RecordWrite:
    return RecordWrite("w", "Location", "urn:test:ward", "W1", {"name": "Ward 1", **content})


def _write(store: Store, rec: RecordWrite) -> Any:
    with store.writer.begin() as conn:
        return Repository(conn).upsert(rec, rec.content, None)


def test_a_record_the_merge_leaves_unchanged_is_not_locked(pg: Store) -> None:
    first = _write(pg, _ward(status="active"))
    with pg.writer.begin() as conn:
        same = Repository(conn).upsert(_ward(status="active"), _ward(status="active").content, None)
        assert same is not None and not same.changed
        with pg.writer.begin() as other:  # another engine's transaction, while the first is open
            other.execute(text("SET LOCAL lock_timeout = '500ms'"))
            row = other.execute(
                text("SELECT id FROM location WHERE id = :rid FOR UPDATE"), {"rid": first.id}
            ).first()
            assert row is not None  # it would time out if the unchanged record had been locked


def test_a_version_written_between_the_read_and_the_write_is_merged_into(
    pg: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _write(pg, _ward(status="active"))
    original = Repository._lock_if
    raced: list[bool] = []

    def another_engine_first(self: Repository, st: Any, rid: str, version: int) -> bool:
        if not raced:  # another engine's message changes the ward after this one read it
            raced.append(True)
            _write(pg, _ward(description="east wing"))
        return original(self, st, rid, version)

    monkeypatch.setattr(Repository, "_lock_if", another_engine_first)
    outcome = _write(pg, _ward(operationalStatus={"code": "O"}))
    assert raced and outcome is not None and outcome.changed
    assert outcome.version_id == 3  # 1 created, 2 the other engine's, 3 this message's, merged into 2
    stored = resources.read(pg, "Location", first.id)
    assert stored is not None and stored.version == 3
    body = orjson.loads(stored.text)
    assert body["description"] == "east wing" and body["operationalStatus"] == {"code": "O"}
    with pg.reader.connect() as conn:
        assert audit.count(conn) == 3 and audit.verify(conn).ok
