"""The write hot path (hms_ach.store.fastexec) stores exactly what SQLAlchemy would have stored.

Rows written on the DBAPI cursor must read back the same as rows written through SQLAlchemy, in
the database itself (a search compares stored text on SQLite) and through SQLAlchemy, on both
databases.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Table, bindparam, event, insert, select
from sqlalchemy.exc import IntegrityError

from hms_ach.store import fastexec
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, AuditEntry, ResourceHistory, SearchDate, SearchToken

Patient = RECORD_TABLES["Patient"]


WHEN = datetime(2026, 2, 28, 23, 59, 58, 123456, tzinfo=UTC)

ROWS: list[tuple[Any, dict[str, Any]]] = [
    (
        SearchDate,
        {
            "resource_type": "Patient",
            "resource_id": "p1",
            "param": "birthdate",
            "start": datetime(1980, 2, 29, tzinfo=UTC),
            "end": datetime(1980, 3, 1, tzinfo=UTC),
        },
    ),
    (
        SearchToken,
        {
            "resource_type": "Patient",
            "resource_id": "p1",
            "param": "identifier",
            "system": None,
            "value": "MRN-1",
        },
    ),
    (
        ResourceHistory,
        {
            "resource_type": "Patient",
            "id": "p1",
            "version_id": 2,
            "last_updated": WHEN,
            "deleted": True,
            "message_id": None,
            "resource": '{"resourceType":"Patient"}',
        },
    ),
    (
        AuditEntry,
        {
            "recorded": "2026-02-28T23:59:58.123456Z",
            "agent": "adt",
            "action": "update",
            "entity_type": "Patient",
            "entity_id": "p1",
            "version_id": 2,
            "message_id": 7,
            "diff": "[]",
            "prev_hash": "0" * 64,
            "hash": "f" * 64,
        },
    ),
]


def _raw(conn: Any, table: Table, keys: list[str]) -> list[tuple[Any, ...]]:
    cols = ", ".join(f'"{k}"' for k in keys)
    return [tuple(r) for r in conn.exec_driver_sql(f"SELECT {cols} FROM {table.name} ORDER BY 1").all()]


@pytest.mark.parametrize(("model", "row"), ROWS, ids=[m.__tablename__ for m, _ in ROWS])
def test_a_row_is_stored_as_sqlalchemy_stores_it(store: Store, model: Any, row: dict[str, Any]) -> None:
    table: Table = model.__table__
    keys = list(row)
    with store.writer.begin() as conn:
        conn.execute(insert(table), row)
        by_sqlalchemy = _raw(conn, table, keys)
        conn.execute(table.delete())
        fastexec.insert_rows(conn, table, [row])
        by_cursor = _raw(conn, table, keys)
        read_back = conn.execute(select(*(table.c[k] for k in keys))).all()
    assert by_cursor == by_sqlalchemy  # the same text, numbers and flags in the database
    assert [tuple(r) for r in read_back] == [tuple(row.values())]  # and read back as written


def test_many_rows_and_a_returning_insert(store: Store) -> None:
    table: Table = SearchToken.__table__  # type: ignore[attr-defined]
    rows = [
        {
            "resource_type": "Patient",
            "resource_id": f"p{i}",
            "param": "identifier",
            "system": "urn:mrn",
            "value": str(i),
        }
        for i in range(5)
    ]
    stmt = insert(table).returning(table.c.row_id)
    with store.writer.begin() as conn:
        fastexec.insert_rows(conn, table, rows)
        returned = fastexec.first_row(conn, "test.token_returning", stmt, {**rows[0], "value": "x"}, table)
        values = conn.execute(select(table.c.value).order_by(table.c.row_id)).scalars().all()
    assert values == ["0", "1", "2", "3", "4", "x"]
    assert returned is not None and isinstance(returned[0], int)


def test_a_column_default_it_cannot_compute_is_refused(store: Store) -> None:
    table: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    row = {"resource_type": "Patient", "id": "p1", "version_id": 1, "message_id": None, "resource": "{}"}
    with store.writer.begin() as conn, pytest.raises(ValueError, match="last_updated"):
        fastexec.insert_rows(conn, table, [row])  # last_updated and deleted have sqlmodel defaults


def test_engine_cursor_listeners_see_its_statements(store: Store) -> None:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.split()[0].upper())

    event.listen(store.writer, "before_cursor_execute", count)
    try:
        with store.writer.begin() as conn:
            fastexec.insert_rows(conn, SearchToken.__table__, [ROWS[1][1]])  # type: ignore[attr-defined]
    finally:
        event.remove(store.writer, "before_cursor_execute", count)
    assert "INSERT" in seen


def test_a_refused_row_raises_sqlalchemys_integrity_error(store: Store) -> None:
    """Callers catch sqlalchemy.exc.IntegrityError (a FHIR write answers 409); this path raises it too."""
    table: Table = Patient.__table__  # type: ignore[attr-defined]
    row = {
        "id": "p1",
        "key_system": "urn:mrn",
        "key_value": "1",
        "version_id": 1,
        "last_updated": WHEN,
        "deleted": False,
        "resource": "{}",
    }
    with store.writer.begin() as conn:
        fastexec.insert_rows(conn, table, [row])
        nested = conn.begin_nested()
        with pytest.raises(IntegrityError) as err:
            fastexec.insert_rows(conn, table, [{**row, "id": "p2"}])  # the same business key
        nested.rollback()
        assert err.value.orig is not None
        assert conn.execute(select(table.c.id)).scalars().all() == ["p1"]


def test_rows_given_as_tuples_in_any_column_order_are_stored_as_sqlalchemy_stores_them(store: Store) -> None:
    table: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    row = dict(ROWS[2][1])
    columns = tuple(reversed(row))  # not the table's order
    later = {**row, "version_id": 3, "deleted": False}
    with store.writer.begin() as conn:
        conn.execute(insert(table), [row, later])
        by_sqlalchemy = _raw(conn, table, list(row))
        conn.execute(table.delete())
        fastexec.insert_values(conn, table, columns, [tuple(r[c] for c in columns) for r in (row, later)])
        by_cursor = _raw(conn, table, list(row))
        read_back = conn.execute(select(*(table.c[k] for k in row)).order_by(table.c.version_id)).all()
    assert by_cursor == by_sqlalchemy
    assert [tuple(r) for r in read_back] == [tuple(row.values()), tuple(later.values())]


def test_all_rows_of_a_select_and_a_datetime_read_back_as_sqlalchemy_reads_it(store: Store) -> None:
    table: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    rows = [{**ROWS[2][1], "version_id": v} for v in (1, 2, 3)]
    stmt = select(table.c.version_id, table.c.last_updated).where(
        table.c.id == bindparam("rid"), table.c.version_id.in_([bindparam("a"), bindparam("b")])
    )
    with store.writer.begin() as conn:
        fastexec.insert_rows(conn, table, rows)
        found = fastexec.all_rows(conn, "test.history_versions", stmt, {"rid": "p1", "a": 1, "b": 3})
        none = fastexec.all_rows(conn, "test.history_versions", stmt, {"rid": "p2", "a": 1, "b": 3})
        when = fastexec.result_processor(conn, table.c.last_updated)
    assert sorted((v, when(t)) for v, t in found) == [(1, WHEN), (3, WHEN)]
    assert none == []


def test_a_prepared_select_binds_by_type_keeps_its_own_limit_and_finds_what_sqlalchemy_finds(
    store: Store,
) -> None:
    """A search page runs on the cursor (``fastexec.prepare``): a datetime compared with a column is
    converted by the column's type (SQLite stores it as text), the LIMIT the statement carries is
    kept, and a statement SQLAlchemy completes per execution (an expanding IN) is refused."""
    table: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    rows = [
        {**ROWS[2][1], "version_id": v, "last_updated": WHEN.replace(day=d)}
        for v, d in ((1, 1), (2, 2), (3, 3))
    ]
    stmt = (
        select(table.c.version_id, table.c.resource)
        .where(table.c.id == bindparam("rid"), table.c.last_updated >= bindparam("since"))
        .order_by(table.c.version_id)
        .limit(1)
    )
    values = {"rid": "p1", "since": WHEN.replace(day=2)}
    with store.writer.begin() as conn:
        fastexec.insert_rows(conn, table, rows)
        prepared = fastexec.prepare(conn, stmt)
        assert prepared is not None
        found = prepared.rows(conn, values)
        assert found == [tuple(r) for r in conn.execute(stmt, values).all()] == [(2, rows[0]["resource"])]
        assert prepared.rows(conn, {**values, "since": WHEN.replace(day=4)}) == []
        expanding = select(table.c.version_id).where(table.c.version_id.in_(bindparam("v", expanding=True)))
        assert fastexec.prepare(conn, expanding) is None
