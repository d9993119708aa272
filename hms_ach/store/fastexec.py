"""The write hot path's statements, run on the DBAPI cursor of a SQLAlchemy connection.

Running a compiled SQLAlchemy statement costs about 15-20 µs of Python per call before the
database sees it (execution context, result set-up, events); a plain ``cursor.execute`` of the
same SQL costs about 1 µs. A message writes a dozen such rows (record, history, search index,
audit, outbox), so the hot path compiles each statement ONCE per dialect with SQLAlchemy and then
runs it on the cursor of the very same DBAPI connection: the statements run inside the caller's
transaction and SAVEPOINTs like any other, because SQLAlchemy's transaction is that connection's.

Values are converted exactly as SQLAlchemy would convert them, through the public ``bind_processor`` of
each column type's dialect implementation (on SQLite a ``datetime`` becomes SQLAlchemy's text format), so
rows written here read back through SQLAlchemy unchanged. What this path skips is SQLAlchemy's
per-statement machinery (execution context, result objects); driver errors are still raised as
SQLAlchemy's exceptions. Its ``before_cursor_execute`` and
``after_cursor_execute`` listeners are still called, with ``context=None``, so that statement
counters, tracing and logging hooks on the engine see these statements too.

Only INSERTs, single-row key look-ups and the many-row UPDATEs and DELETEs of a transaction Bundle
go here; everything else stays on SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.exc import DBAPIError


@dataclass(frozen=True)
class Compiled:
    """One statement compiled for one dialect: its SQL, and how to turn values into its parameters."""

    sql: str
    names: tuple[str, ...]  # bind names, in the order of the SQL's placeholders when positional
    positional: bool
    processors: tuple[Callable[[Any], Any] | None, ...]

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        out = [
            values.get(name) if proc is None else proc(values.get(name))
            for name, proc in zip(self.names, self.processors, strict=True)
        ]
        return tuple(out) if self.positional else dict(zip(self.names, out, strict=True))

    def params_many(self, rows: Sequence[Mapping[str, Any]], as_tuples: bool = False) -> list[Any]:
        """:meth:`params` of each row, the values picked by one C-level getter, and each converted
        value reused while the same object repeats (the one write time of a transaction's rows)."""
        pick = _getter(self.names)
        try:
            picked = [pick(row) for row in rows]
        except KeyError:  # a row without some bind name: that value is None
            return [self.params(row) for row in rows]
        converting = [(i, proc) for i, proc in enumerate(self.processors) if proc is not None]
        if converting:
            out = [list(p) for p in picked]
            for i, proc in converting:
                last: Any = object()
                done: Any = None
                for p in out:
                    if p[i] is not last:
                        last, done = p[i], proc(p[i])
                    p[i] = done
            picked = [tuple(p) for p in out]
        if self.positional or as_tuples:
            return picked
        return [dict(zip(self.names, p, strict=True)) for p in picked]


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    if not names:
        return lambda row: ()
    get = itemgetter(*names)
    if len(names) == 1:
        return lambda row: (get(row),)
    return get


_cache: dict[tuple[Any, ...], Compiled] = {}


def _compile(
    stmt: Any,
    conn: Connection,
    key: tuple[Any, ...],
    column_keys: Sequence[str] | None,
    types: Mapping[str, Any],
    bind_types: bool = False,
) -> Compiled:
    dialect = conn.dialect
    compiled = stmt.compile(
        dialect=dialect, column_keys=list(column_keys) if column_keys is not None else None
    )
    positional = bool(compiled.positional)
    names = tuple(compiled.positiontup) if positional else tuple(compiled.bind_names.values())
    if column_keys is not None:
        # A column default SQLAlchemy would compute (sqlmodel declares many) has no value here.
        missing = [n for n in names if n not in column_keys]
        if missing:
            raise ValueError(
                f"fastexec: {key[1]!r} needs values for {missing} (no column defaults on this path)"
            )
    processors = []
    for name in names:
        type_ = types.get(name)
        if type_ is None and bind_types:  # a bindparam() compared with or assigned to a column has its type
            type_ = compiled.binds[name].type
        # dialect_impl: the dialect's own type (SQLite's DATETIME formats datetimes as text)
        processors.append(type_.dialect_impl(dialect).bind_processor(dialect) if type_ is not None else None)
    found = Compiled(compiled.string, names, positional, tuple(processors))
    _cache[key] = found
    return found


def _cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _run(conn: Connection, cursor: Any, sql: str, params: Any, many: bool) -> None:
    """Execute on the cursor. A driver error is raised as SQLAlchemy would raise it (``IntegrityError``
    and the rest of ``sqlalchemy.exc``, the driver's exception as ``.orig``), so that callers that
    catch those (a FHIR write answering 409 to a unique-constraint refusal) see the same thing."""
    dispatch = conn.dispatch
    for before in dispatch.before_cursor_execute:
        before(conn, cursor, sql, params, None, many)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
    except dbapi_error as exc:
        raise DBAPIError.instance(sql, params, exc, dbapi_error, dialect=conn.dialect, ismulti=many) from exc
    for after in dispatch.after_cursor_execute:
        after(conn, cursor, sql, params, None, many)


def insert_rows(conn: Connection, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys, in the same order) into ``table`` on ``conn``'s
    DBAPI cursor: one ``executemany`` for many rows, one ``execute`` for one, and on PostgreSQL one
    COPY from ``COPY_MIN_ROWS`` rows on."""
    batch = list(rows)
    if not batch:
        return
    keys = tuple(batch[0])
    cache_key = ("insert", table.name, keys, conn.dialect.name, conn.dialect.paramstyle)
    compiled = _cache.get(cache_key)
    if compiled is None:
        compiled = _compile(insert(table), conn, cache_key, keys, {c.key: c.type for c in table.c})
    cursor = _cursor(conn)
    try:
        if len(batch) == 1:
            _run(conn, cursor, compiled.sql, compiled.params(batch[0]), False)
        elif len(batch) >= COPY_MIN_ROWS and conn.dialect.name == "postgresql":
            _insert_values(conn, cursor, table, compiled, batch)
        else:
            _run(conn, cursor, compiled.sql, compiled.params_many(batch), True)
    finally:
        cursor.close()


#: From this many rows an INSERT on PostgreSQL is a COPY (a few round trips of its own, so not for
#: the few index rows of one record).
COPY_MIN_ROWS = 64


def _insert_values(
    conn: Connection,
    cursor: Any,
    table: Table,
    compiled: Compiled,
    rows: list[Mapping[str, Any]],
) -> None:
    """INSERT many rows on PostgreSQL with one ``COPY .. FROM STDIN``: psycopg's ``executemany``
    sends (and the server runs) one statement a row, and a multi-row ``VALUES`` costs psycopg more
    to parse than the rows cost to send. COPY runs the table's constraints as an INSERT does."""
    quote = conn.dialect.identifier_preparer
    columns = ", ".join(quote.quote(table.c[name].name) for name in compiled.names)  # the INSERT's order
    sql = f"COPY {quote.format_table(table)} ({columns}) FROM STDIN"
    values = compiled.params_many(rows, as_tuples=True)  # in the order of compiled.names
    dispatch = conn.dispatch
    for before in dispatch.before_cursor_execute:
        before(conn, cursor, sql, values, None, True)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        with cursor.copy(sql) as copy:
            for row in values:
                copy.write_row(row)
    except dbapi_error as exc:
        raise DBAPIError.instance(sql, values, exc, dbapi_error, dialect=conn.dialect, ismulti=True) from exc
    for after in dispatch.after_cursor_execute:
        after(conn, cursor, sql, values, None, True)


def first_row(
    conn: Connection, name: str, stmt: Any, values: Mapping[str, Any], table: Table | None = None
) -> tuple[Any, ...] | None:
    """The first row of ``stmt`` (a SELECT, or an INSERT .. RETURNING) as a plain tuple in the order
    of its columns, or None. See :func:`execute` for ``name``, ``values`` and ``table``."""
    return execute(conn, name, stmt, values, table, fetch=True)


def execute(
    conn: Connection,
    name: str,
    stmt: Any,
    values: Mapping[str, Any],
    table: Table | None = None,
    fetch: bool = False,
) -> tuple[Any, ...] | None:
    """Run ``stmt`` once with ``values`` (its bind parameters by name) on ``conn``'s DBAPI cursor.

    ``name`` identifies the statement in the compiled-statement cache (statements are built once,
    e.g. ``"by_key:patient"``), so one name must always mean one statement. ``table``: the table an
    INSERT or UPDATE writes, whose columns named in ``values`` it sets (their types convert the
    values). ``fetch``: return the first row, or None.
    """
    keys = tuple(values) if table is not None else None
    cache_key = ("stmt", name, keys, conn.dialect.name, conn.dialect.paramstyle)
    compiled = _cache.get(cache_key)
    if compiled is None:
        types = {c.key: c.type for c in table.c} if table is not None else {}
        compiled = _compile(stmt, conn, cache_key, keys, types)
    cursor = _cursor(conn)
    try:
        _run(conn, cursor, compiled.sql, compiled.params(values), False)
        row = cursor.fetchone() if fetch else None
    finally:
        cursor.close()
    return tuple(row) if row is not None else None


def execute_many(
    conn: Connection, name: str, stmt: Any, rows: Sequence[Mapping[str, Any]], table: Table | None = None
) -> None:
    """Run ``stmt`` (an UPDATE or DELETE) once per item of ``rows`` (dicts with the same keys) with
    one ``executemany``; ``name`` and ``table`` as for :func:`execute`. A bind parameter that is not
    a column of ``table`` is converted by its own type (``bindparam("t")`` set into a DateTime column
    is a DateTime)."""
    if not rows:
        return
    keys = tuple(rows[0]) if table is not None else None
    cache_key = ("stmt", name, keys, conn.dialect.name, conn.dialect.paramstyle)
    compiled = _cache.get(cache_key)
    if compiled is None:
        types = {c.key: c.type for c in table.c} if table is not None else {}
        compiled = _compile(stmt, conn, cache_key, keys, types, bind_types=True)
    cursor = _cursor(conn)
    try:
        _run(conn, cursor, compiled.sql, compiled.params_many(rows), True)
    finally:
        cursor.close()
