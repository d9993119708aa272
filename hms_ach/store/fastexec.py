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

Only INSERTs, single-row key look-ups, the many-row UPDATEs and DELETEs of a transaction Bundle,
and the FHIR search pages whose rows need no conversion (an id and the stored text: :func:`all_rows`,
:func:`prepare`) go here; everything else stays on SQLAlchemy.
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
        out = self.row(values)
        return out if self.positional else dict(zip(self.names, out, strict=True))

    def row(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The converted values of ``values`` in the order of :attr:`names` (a missing one: None)."""
        return tuple(
            values.get(name) if proc is None else proc(values.get(name))
            for name, proc in zip(self.names, self.processors, strict=True)
        )

    def params_many(self, rows: Sequence[Mapping[str, Any]], as_tuples: bool = False) -> list[Any]:
        """:meth:`params` of each row, the values picked by one C-level getter, and each distinct
        value of a column converted once (:meth:`converted`)."""
        pick = _getter(self.names)
        try:
            picked = [pick(row) for row in rows]
        except KeyError:  # a row without some bind name: that value is None
            picked = [self.row(row) for row in rows]
            return picked if self.positional or as_tuples else [self.params(row) for row in rows]
        picked = self.converted(picked)
        if self.positional or as_tuples:
            return picked
        return [dict(zip(self.names, p, strict=True)) for p in picked]

    def converted(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``rows`` (values in the order of :attr:`names`) with each value its column's type converts
        converted, once per distinct value of a column; ``rows`` itself when no column converts."""
        converting = [(i, proc) for i, proc in enumerate(self.processors) if proc is not None]
        if not converting:
            return rows
        out = [list(p) for p in rows]
        for i, proc in converting:
            # values repeat: the write time of a transaction's rows, the dates of index rows (whose
            # ranges search_params caches). Keyed with the type and offset too: True == 1, and two
            # datetimes of one instant at different offsets are equal but may convert differently
            done: dict[Any, Any] = {}
            for p in out:
                value = p[i]
                try:
                    key = (type(value), value, getattr(value, "tzinfo", None))
                    p[i] = done[key]
                except KeyError:
                    p[i] = done[key] = proc(value)
                except TypeError:  # unhashable: converted each time
                    p[i] = proc(value)
        return [tuple(p) for p in out]


def _getter(names: tuple[Any, ...]) -> Callable[[Any], tuple[Any, ...]]:
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
        raise _driver_error(conn, cursor, sql, params, exc, many) from exc
    for after in dispatch.after_cursor_execute:
        after(conn, cursor, sql, params, None, many)


def _driver_error(conn: Connection, cursor: Any, sql: str, params: Any, exc: Any, many: bool) -> Exception:
    """``exc`` as SQLAlchemy raises it; a lost connection (the server ended it) is invalidated first,
    as SQLAlchemy's own execution does, and the error says so (``connection_invalidated``): the
    pool never hands it out again, and the group-commit writer knows its batch can run again."""
    dialect = conn.dialect
    try:
        gone = bool(dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor))
    except Exception:  # noqa: BLE001 - undecidable: taken for an error of the statement
        gone = False
    if gone:
        try:
            conn.invalidate(exc)
        except Exception:  # noqa: BLE001 - already closed: nothing more to undo
            pass
    error: Exception = DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        dialect=dialect,
        ismulti=many,
        connection_invalidated=gone,
    )
    return error


def insert_rows(conn: Connection, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys, in the same order) into ``table`` on ``conn``'s
    DBAPI cursor: one ``executemany`` for many rows, one ``execute`` for one, and on PostgreSQL one
    COPY from ``COPY_MIN_ROWS`` rows on."""
    batch = list(rows)
    if not batch:
        return
    compiled = _insert_statement(conn, table, tuple(batch[0]))
    if len(batch) == 1:
        _insert(conn, table, compiled, [compiled.row(batch[0])])
    else:
        _insert(conn, table, compiled, compiled.params_many(batch, as_tuples=True))


def insert_values(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """:func:`insert_rows` for rows given as tuples of the values of ``columns`` (in that order):
    the many-row writes of a transaction Bundle make them so, and no dict is made per row."""
    if not rows:
        return
    compiled = _insert_statement(conn, table, columns)
    if compiled.names != columns:  # the statement's order (the table's) differs from the caller's
        pick = _getter(tuple(columns.index(name) for name in compiled.names))
        rows = [pick(row) for row in rows]
    _insert(conn, table, compiled, compiled.converted(rows))


def _insert_statement(conn: Connection, table: Table, keys: tuple[str, ...]) -> Compiled:
    cache_key = ("insert", table.name, keys, conn.dialect.name, conn.dialect.paramstyle)
    compiled = _cache.get(cache_key)
    if compiled is None:
        compiled = _compile(insert(table), conn, cache_key, keys, {c.key: c.type for c in table.c})
    return compiled


def _insert(conn: Connection, table: Table, compiled: Compiled, values: list[Any]) -> None:
    """Run an INSERT of ``compiled`` with ``values`` (its parameters, converted, one item a row)."""
    params = values if compiled.positional else [dict(zip(compiled.names, v, strict=True)) for v in values]
    cursor = _cursor(conn)
    try:
        if len(values) == 1:
            _run(conn, cursor, compiled.sql, params[0], False)
        elif len(values) >= COPY_MIN_ROWS and conn.dialect.name == "postgresql":
            _insert_values(conn, cursor, table, compiled, values)
        else:
            _run(conn, cursor, compiled.sql, params, True)
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
    values: list[tuple[Any, ...]],
) -> None:
    """INSERT many rows on PostgreSQL with one ``COPY .. FROM STDIN``: psycopg's ``executemany``
    sends (and the server runs) one statement a row, and a multi-row ``VALUES`` costs psycopg more
    to parse than the rows cost to send. COPY runs the table's constraints as an INSERT does."""
    quote = conn.dialect.identifier_preparer
    columns = ", ".join(quote.quote(table.c[name].name) for name in compiled.names)  # the INSERT's order
    sql = f"COPY {quote.format_table(table)} ({columns}) FROM STDIN"
    dispatch = conn.dispatch
    for before in dispatch.before_cursor_execute:
        before(conn, cursor, sql, values, None, True)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        with cursor.copy(sql) as copy:
            for row in values:
                copy.write_row(row)
    except dbapi_error as exc:
        raise _driver_error(conn, cursor, sql, values, exc, True) from exc
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
    found = _execute(conn, name, stmt, values, table, 1 if fetch else 0)
    return found[0] if found else None


def all_rows(conn: Connection, name: str, stmt: Any, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Every row of ``stmt`` (a SELECT) run with ``values``, as plain tuples in the order of its
    columns, as the driver returns them (the caller converts what it needs, e.g. a SQLite DATETIME,
    which is text, with :func:`result_processor`); ``name`` as for :func:`execute`."""
    return _execute(conn, name, stmt, values, None, -1)


@dataclass(frozen=True)
class Prepared:
    """A SELECT built with SQLAlchemy's constructs, compiled once for one dialect to run on the
    driver's cursor (:func:`prepare`): its bind parameters are converted by their own types, and
    the values the statement carries itself (a LIMIT's) are kept as defaults."""

    compiled: Compiled
    defaults: Mapping[str, Any]

    def rows(self, conn: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row of the statement run with ``values`` (plain tuples, the driver's values)."""
        params = self.compiled.params({**self.defaults, **values})
        cursor = _cursor(conn)
        try:
            _run(conn, cursor, self.compiled.sql, params, False)
            return [tuple(r) for r in cursor.fetchall()]
        finally:
            cursor.close()


def prepare(conn: Connection, stmt: Any) -> Prepared | None:
    """``stmt`` (a SELECT whose result columns need no conversion: ids, text) ready for
    :meth:`Prepared.rows` on ``conn``'s dialect; None when its SQL is completed per execution
    (an expanding ``IN``), which only SQLAlchemy's own execution does. The caller keeps it (per
    statement and dialect): nothing here caches it."""
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect)
    if "POSTCOMPILE" in compiled.string:
        return None
    positional = bool(compiled.positional)
    names = tuple(compiled.positiontup) if positional else tuple(compiled.bind_names.values())
    processors = tuple(
        compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    binds = {name: compiled.binds[name] for name in set(names)}
    defaults = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
    return Prepared(Compiled(compiled.string, names, positional, processors), defaults)


def result_processor(conn: Connection, column: Any) -> Callable[[Any], Any]:
    """How SQLAlchemy turns the driver's value of ``column`` into the column type's Python value."""
    dialect = conn.dialect
    found = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return found if found is not None else _same


def _same(value: Any) -> Any:
    return value


def _execute(
    conn: Connection, name: str, stmt: Any, values: Mapping[str, Any], table: Table | None, fetch: int
) -> list[tuple[Any, ...]]:
    keys = tuple(values) if table is not None else None
    cache_key = ("stmt", name, keys, conn.dialect.name, conn.dialect.paramstyle)
    compiled = _cache.get(cache_key)
    if compiled is None:
        types = {c.key: c.type for c in table.c} if table is not None else {}
        compiled = _compile(stmt, conn, cache_key, keys, types)
    cursor = _cursor(conn)
    try:
        _run(conn, cursor, compiled.sql, compiled.params(values), False)
        if fetch == 1:
            row = cursor.fetchone()
            return [tuple(row)] if row is not None else []
        return [tuple(r) for r in cursor.fetchall()] if fetch else []
    finally:
        cursor.close()


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
