"""The write path's shortcuts keep its promises: the audit chain stays linked when part of a
transaction is rolled back, index rows are rewritten only when they change (and always when a
deleted record comes back), and a duplicate is answered from the stored ACK."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event, text

from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import audit, resources, search
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter


def _nurse(n: str, family: str, **extra: Any) -> RecordWrite:
    return RecordWrite("p", "Practitioner", "urn:staff", n, {"name": [{"family": family}], **extra})


def _write(conn: Connection, rec: RecordWrite) -> Any:
    return Repository(conn).upsert(rec, rec.content, None)


def _family(store: Store, family: str) -> list[str]:
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query("Practitioner", [("family", family)]))
    return [rid for rid, _ in page.matches]


def test_audit_chain_holds_after_a_rolled_back_savepoint(store: Store) -> None:
    with store.writer.begin() as conn:
        _write(conn, _nurse("A1", "Osei"))
        savepoint = conn.begin_nested()
        _write(conn, _nurse("A2", "Mensah"))  # its audit entry is undone with the savepoint
        savepoint.rollback()
        _write(conn, _nurse("A3", "Abebe"))
        _write(conn, _nurse("A1", "Osei-Mensah"))
    with store.reader.connect() as conn:
        result = audit.verify(conn)
        assert audit.count(conn) == 3
    assert result.ok and result.checked == 3, result


def test_audit_chain_holds_across_a_failed_job_in_a_group_commit(store: Store) -> None:
    writer = StoreWriter(store)

    def failing(conn: Connection) -> None:
        _write(conn, _nurse("B2", "Haddad"))
        raise ValueError("a content error after a write")

    try:
        writer._commit(
            [
                (lambda c: _write(c, _nurse("B1", "Kim")), _future()),
                (failing, _future()),
                (lambda c: _write(c, _nurse("B3", "Park")), _future()),
            ]
        )
    finally:
        writer.stop()
    with store.reader.connect() as conn:
        result = audit.verify(conn)
        assert audit.count(conn) == 2
    assert result.ok, result
    assert _family(store, "haddad") == []


def _future() -> Any:
    from concurrent.futures import Future

    return Future()


class _Statements:
    """The statements run on ``store``'s writer while the block runs."""

    def __init__(self, store: Store):
        self.store = store
        self.seen: list[str] = []

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(" ".join(statement.split()[:3]).upper())

    def __enter__(self) -> _Statements:
        event.listen(self.store.writer, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc: Any) -> None:
        event.remove(self.store.writer, "before_cursor_execute", self._count)

    def touching(self, table: str) -> list[str]:
        return [s for s in self.seen if s.split()[-1] == table.upper() and not s.startswith("SELECT")]


def test_index_rows_are_rewritten_only_when_they_change(store: Store) -> None:
    with store.writer.begin() as conn:
        rid = _write(conn, _nurse("C1", "Novak", gender="female")).id
    with _Statements(store) as seen, store.writer.begin() as conn:  # a change no search parameter reads
        out = _write(conn, _nurse("C1", "Novak", gender="female", birthDate="1980-01-02"))
    assert out.version_id == 2
    assert seen.touching("search_token") == seen.touching("search_string") == []
    with _Statements(store) as seen, store.writer.begin() as conn:  # only the string rows change
        _write(conn, _nurse("C1", "Nowak", gender="female", birthDate="1980-01-02"))
    assert seen.touching("search_token") == []
    assert seen.touching("search_string") == ["DELETE FROM SEARCH_STRING", "INSERT INTO SEARCH_STRING"]
    assert _family(store, "nowak") == [rid] and _family(store, "novak") == []


def test_a_deleted_record_written_again_is_indexed_again(store: Store) -> None:
    with store.writer.begin() as conn:
        out = _write(conn, _nurse("D1", "Silva"))
        resources.delete(conn, "Practitioner", out.id, None)
    assert _family(store, "silva") == []
    with store.writer.begin() as conn:
        again = _write(conn, _nurse("D1", "Silva", active=True))
    assert again.version_id == 3
    assert _family(store, "silva") == [out.id]


def test_statements_per_record_stay_few(store: Store) -> None:
    """Creating a record is one SELECT by key and one INSERT (plus history, index, listeners);
    writing the same content again is one SELECT and nothing else."""
    result = MappingResult(records=[_nurse("E1", "Costa")])
    with _Statements(store) as first, store.writer.begin() as conn:
        Repository(conn).apply(result)
    assert first.touching("practitioner") == ["INSERT INTO PRACTITIONER"]
    # by key and the audit chain's end, plus on PostgreSQL the audit lock and the outbox's
    # transaction marker (once per transaction, docs/scale-out.md)
    selects = len([s for s in first.seen if s.startswith("SELECT")])
    assert selects <= (4 if store.dialect == "postgresql" else 3), first.seen
    with _Statements(store) as again, store.writer.begin() as conn:
        Repository(conn).apply(result)
    assert [s.split()[0] for s in again.seen if s not in ("BEGIN", "BEGIN IMMEDIATE", "COMMIT")] == ["SELECT"]
    with store.reader.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM resource_history")).scalar_one() == 1
