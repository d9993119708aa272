"""The FHIR interactions on the record tables: read, vread, history, search, create, update,
conditional create and update, delete, and the request lines kept for replay.

Reads take the :class:`~hms_ach.store.db.Store` and run in one short read transaction on its reader
pool (on PostgreSQL one snapshot for all their statements). Writes take the writer's transaction
(:data:`~hms_ach.store.port.Tx`) and never commit: the FHIR write job runs them inside it, each
request or Bundle entry in a :func:`~hms_ach.store.savepoint.savepoint`.

A write is described by a :class:`ResourceWrite`: the mapped record, its content with references
resolved, the further records the mapping produced, the version the client expects (If-Match) and a
content check run once the target record is known. The interactions refuse with the domain errors
of :mod:`hms_ach.store.errors`; the HTTP layer turns them into statuses.

Business keys are claimed with ``INSERT .. ON CONFLICT DO NOTHING`` (a placeholder row at version
0), so that concurrent conditional creates make one record: the unique constraint decides.
A delete writes a tombstone version: reads then see the record as deleted, history keeps every
version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import orjson
from sqlalchemy import Select, Table, and_, bindparam, insert, select
from sqlalchemy import update as sql_update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row

from hms_ach.core.records import RECORD_MATCHERS, RecordWrite, merge_record
from hms_ach.store import search as fhir_search
from hms_ach.store.db import Store
from hms_ach.store.errors import (
    AlreadyExists,
    Conflict,
    MultipleMatches,
    NotFound,
    VersionConflict,
)
from hms_ach.store.ids import new_id
from hms_ach.store.models import RECORD_TABLES, FhirRequestLine, ResourceHistory, SearchToken
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository

#: A record-table row as :func:`_row` selects it.
_RecordRow: TypeAlias = Row[*tuple[Any, ...]]

_HISTORY = ResourceHistory.__table__  # type: ignore[attr-defined]
_REQUEST_LINES = FhirRequestLine.__table__  # type: ignore[attr-defined]
_TOKENS = SearchToken.__table__  # type: ignore[attr-defined]

#: Checks the content of a write once its record id is known (``rid``, ``content``); raises a
#: :class:`~hms_ach.store.errors.DomainError` to refuse it.
ContentCheck = Callable[[str, dict[str, Any]], None]
#: The version the client expects (If-Match), read when the store checks it; may raise
#: :class:`~hms_ach.store.errors.Invalid` when the precondition cannot be read.
ExpectedVersion = Callable[[], int | None]


def _table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def _content(text: str) -> dict[str, Any]:
    """A stored resource without ``id`` and ``meta``: what the mappings wrote."""
    return {k: v for k, v in orjson.loads(text).items() if k not in ("id", "meta")}


# ---------------------------------------------------------------------------- reads
@dataclass(frozen=True)
class StoredVersion:
    """One version of a record as stored: ``text`` is the resource JSON rendered at write time."""

    resource_type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    text: str


@dataclass(frozen=True)
class HistoryPage:
    """The newest version number of a record and a page of its versions, newest first."""

    newest: int
    versions: list[StoredVersion]
    more: bool  # older versions follow the page


@contextmanager
def reading(store: Store) -> Iterator[Tx]:
    """A short read transaction on the reader pool; on PostgreSQL one snapshot for all its statements."""
    with store.read() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


_READS: dict[str, Select[*tuple[Any, ...]]] = {}


def _read_statement(resource_type: str) -> Select[*tuple[Any, ...]]:
    """The read by id of ``resource_type``, built once per type (the id is a bound parameter): a
    read by id is the busiest request of the FHIR API, and building the statement cost as much as
    running it."""
    stmt = _READS.get(resource_type)
    if stmt is None:
        t = _table(resource_type)
        stmt = select(t.c.version_id, t.c.last_updated, t.c.deleted, t.c.resource).where(
            t.c.id == bindparam("rid")
        )
        _READS[resource_type] = stmt
    return stmt


def read(store: Store, resource_type: str, rid: str) -> StoredVersion | None:
    """The current version of ``resource_type/rid`` (possibly a deletion); None when it is not known."""
    stmt = _read_statement(resource_type)
    with reading(store) as conn:
        row = conn.execute(stmt, {"rid": rid}).first()
    if row is None or row.version_id == 0:  # version 0: a key claimed by a create still running
        return None
    return StoredVersion(
        resource_type, rid, int(row.version_id), row.last_updated, bool(row.deleted), row.resource
    )


def vread(store: Store, resource_type: str, rid: str, version: int) -> StoredVersion | None:
    """Version ``version`` of ``resource_type/rid``; None when there is no such version."""
    h = _HISTORY
    with reading(store) as conn:
        row = conn.execute(
            select(h.c.version_id, h.c.last_updated, h.c.deleted, h.c.resource).where(
                h.c.resource_type == resource_type, h.c.id == rid, h.c.version_id == version
            )
        ).first()
    if row is None:
        return None
    return StoredVersion(
        resource_type, rid, int(row.version_id), row.last_updated, bool(row.deleted), row.resource
    )


def history(store: Store, resource_type: str, rid: str, count: int, before: int | None) -> HistoryPage | None:
    """Up to ``count`` versions of ``resource_type/rid`` older than ``before`` (all when None), newest
    first; None when the record has no version."""
    h = _HISTORY
    mine = (h.c.resource_type == resource_type, h.c.id == rid)
    stmt = select(h.c.version_id, h.c.last_updated, h.c.deleted, h.c.resource).where(*mine)
    if before is not None:
        stmt = stmt.where(h.c.version_id < before)
    with reading(store) as conn:
        newest = conn.execute(
            select(h.c.version_id).where(*mine).order_by(h.c.version_id.desc()).limit(1)
        ).first()
        rows = conn.execute(stmt.order_by(h.c.version_id.desc()).limit(count + 1)).all() if count else []
    if newest is None:
        return None
    versions = [
        StoredVersion(resource_type, rid, int(r.version_id), r.last_updated, bool(r.deleted), r.resource)
        for r in rows[:count]
    ]
    return HistoryPage(int(newest.version_id), versions, len(rows) > count)


def search(store: Store, query: fhir_search.SearchQuery) -> fhir_search.SearchPage:
    """One page of a parsed search (see :mod:`hms_ach.store.search`), in one read transaction."""
    with reading(store) as conn:
        return fhir_search.execute(conn, query)


# ---------------------------------------------------------------------------- writes
@dataclass
class ResourceWrite:
    """A create or update of one record, as the interactions below take it."""

    record: RecordWrite
    content: dict[str, Any]  # the record's content, references resolved
    extra: list[tuple[RecordWrite, dict[str, Any]]] = field(default_factory=list)  # further records
    expected_version: ExpectedVersion | None = None  # If-Match
    check: ContentCheck | None = None

    @property
    def resource_type(self) -> str:
        return self.record.resource_type


@dataclass(frozen=True)
class Written:
    """The outcome of a write interaction: the record's current version after it."""

    resource_type: str
    id: str
    version: int
    text: str | None  # the stored resource JSON (None for a deletion)
    last_updated: datetime | None
    created: bool = False  # this interaction made the record
    changed: bool = False  # this interaction wrote a new version

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


def _row_columns(t: Table) -> tuple[Any, ...]:
    """The columns of a record row that a write reads (by :func:`_row`, or returned by its insert)."""
    return (
        t.c.id,
        t.c.version_id,
        t.c.deleted,
        t.c.resource,
        t.c.key_system,
        t.c.key_value,
        t.c.last_updated,
    )


def _row(tx: Tx, resource_type: str, rid: str) -> _RecordRow | None:
    t = _table(resource_type)
    q = select(*_row_columns(t)).where(t.c.id == rid)
    if tx.dialect.name == "postgresql":
        q = q.with_for_update()
    return tx.execute(q).first()


def _live_row(tx: Tx, resource_type: str, rid: str) -> _RecordRow:
    row = _row(tx, resource_type, rid)
    if row is None:
        raise RuntimeError(f"{resource_type}/{rid} vanished inside its own write transaction")
    return row


def _id_by_key(tx: Tx, resource_type: str, system: str | None, value: str) -> str | None:
    t = _table(resource_type)
    cond = t.c.key_system.is_(None) if system is None else t.c.key_system == system
    found = tx.execute(select(t.c.id).where(and_(cond, t.c.key_value == value))).scalar()
    return None if found is None else str(found)


def ids_by_identifier(tx: Tx, resource_type: str, system: str | None, value: str) -> list[str]:
    """The live records of ``resource_type`` with the identifier ``[system|]value`` (by the index)."""
    t, ix = _table(resource_type), _TOKENS
    cond = [ix.c.resource_type == resource_type, ix.c.param == "identifier", ix.c.value == value]
    if system is not None:
        cond.append(ix.c.system == system)
    sub = select(ix.c.resource_id).where(*cond)
    return [
        str(i) for i in tx.execute(select(t.c.id).where(t.c.id.in_(sub), t.c.deleted.is_(False))).scalars()
    ]


def is_live(tx: Tx, resource_type: str, rid: str) -> bool:
    """``resource_type/rid`` exists and is not deleted."""
    t = _table(resource_type)
    row = tx.execute(select(t.c.version_id, t.c.deleted).where(t.c.id == rid)).first()
    return row is not None and row.version_id != 0 and not row.deleted


def _placeholder(resource_type: str, rid: str, system: str | None, value: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "key_system": system,
        "key_value": value,
        "version_id": 0,
        "last_updated": datetime.now(UTC),
        "deleted": False,
        "resource": "{}",
    }


def _claim(tx: Tx, rec: RecordWrite) -> tuple[str, bool, _RecordRow | None]:
    """Insert a placeholder under the record's business key (ON CONFLICT DO NOTHING): (id, created,
    the placeholder row when this insert made it). ``created`` is also true when an earlier
    placeholder was never written (version 0)."""
    t = _table(rec.resource_type)
    dialect_insert = pg_insert if tx.dialect.name == "postgresql" else sqlite_insert
    stmt = (
        dialect_insert(t)
        .values(**_placeholder(rec.resource_type, new_id(), rec.key_system, rec.key_value))
        .on_conflict_do_nothing(index_elements=["key_system", "key_value"])
        .returning(*_row_columns(t))
    )
    fresh = tx.execute(stmt).first()
    if fresh is not None:  # made here: its id and row are known without reading them again
        return str(fresh.id), True, fresh
    rid = _id_by_key(tx, rec.resource_type, rec.key_system, rec.key_value or "")
    if rid is None:
        raise RuntimeError(
            f"{rec.resource_type} {rec.key_system}|{rec.key_value} was neither claimed nor found"
        )
    return rid, _live_row(tx, rec.resource_type, rid).version_id == 0, None


def _current(tx: Tx, resource_type: str, rid: str, created: bool = False, changed: bool = False) -> Written:
    row = _live_row(tx, resource_type, rid)
    return Written(resource_type, rid, int(row.version_id), row.resource, row.last_updated, created, changed)


def _write(
    tx: Tx, w: ResourceWrite, rid: str, created: bool, message_id: int, row: _RecordRow | None = None
) -> Written:
    """Write ``w`` as the next version of ``rid`` (the expected version is checked first); ``row``:
    the record row when the caller has just inserted it (else it is read, locked on PostgreSQL)."""
    rec, rtype = w.record, w.resource_type
    row = row if row is not None else _live_row(tx, rtype, rid)
    expected = w.expected_version() if w.expected_version is not None else None
    if expected is not None and (created or expected != row.version_id):
        raise VersionConflict(f"{rtype}/{rid}", expected, 0 if created else int(row.version_id))
    if w.check is not None:
        w.check(rid, w.content)
    old = {} if created else _content(row.resource)
    if rec.key_value and (row.key_system, row.key_value) != (rec.key_system, rec.key_value):
        other = _id_by_key(tx, rtype, rec.key_system, rec.key_value)
        if other is not None and other != rid:
            raise Conflict(f"{rtype}/{other} already has the identifier {rec.key_system}|{rec.key_value}")
        t = _table(rtype)
        tx.execute(
            sql_update(t).where(t.c.id == rid).values(key_system=rec.key_system, key_value=rec.key_value)
        )
    repo = Repository(tx)
    merged = merge_record(rtype, rec.mode, old, w.content, repo.source_of(rtype, message_id))
    merged["resourceType"] = rtype
    if not created and not row.deleted and merged == old:
        return _current(tx, rtype, rid)
    repo.write_version(
        rtype, rid, int(row.version_id) + 1, merged, message_id, created, before=None if created else old
    )
    for extra, content in w.extra:
        repo.upsert(extra, content, message_id)
    return _current(tx, rtype, rid, created=created, changed=True)


def create(tx: Tx, w: ResourceWrite, message_id: int) -> Written:
    """Create a record. A record whose business key another record has is refused (AlreadyExists)."""
    rec = w.record
    if not rec.key_value:
        rid = new_id()
        t = _table(rec.resource_type)
        made = tx.execute(
            insert(t).values(**_placeholder(rec.resource_type, rid, None, None)).returning(*_row_columns(t))
        ).one()
        return _write(tx, w, rid, True, message_id, made)
    rid, created, fresh = _claim(tx, rec)
    if not created:
        raise AlreadyExists(f"{rec.resource_type}/{rid}", f"{rec.key_system}|{rec.key_value}")
    return _write(tx, w, rid, True, message_id, fresh)


def create_unless_exists(
    tx: Tx, w: ResourceWrite, system: str | None, value: str, message_id: int
) -> Written:
    """Conditional create: when a live record has the identifier ``[system|]value``, that record
    (nothing written); more than one is refused (MultipleMatches); else :func:`create`."""
    rec, rtype = w.record, w.resource_type
    if rec.key_value and (system, value) == (rec.key_system, rec.key_value):
        rid, created, fresh = _claim(tx, rec)
        if not created:
            return _current(tx, rtype, rid)
        return _write(tx, w, rid, True, message_id, fresh)
    found = ids_by_identifier(tx, rtype, system, value)
    if len(found) > 1:
        raise MultipleMatches(rtype, len(found))
    if found:
        return _current(tx, rtype, found[0])
    return create(tx, w, message_id)


def update(tx: Tx, rid: str, w: ResourceWrite, message_id: int) -> Written:
    """Update the known record ``rid`` (a deleted one comes back); an unknown id is NotFound
    (updates never create)."""
    row = _row(tx, w.resource_type, rid)
    if row is None or row.version_id == 0:
        raise NotFound(f"{w.resource_type}/{rid}")
    return _write(tx, w, rid, False, message_id)


def update_by_identifier(
    tx: Tx, system: str | None, value: str, w: ResourceWrite, message_id: int
) -> Written:
    """Conditional update: the one live record with the identifier ``[system|]value`` is updated;
    more than one is refused (MultipleMatches); none: the record is created."""
    rec, rtype = w.record, w.resource_type
    matched = _matched(tx, w)
    if rec.key_value and (system, value) == (rec.key_system, rec.key_value):
        if matched is not None:
            return _write(tx, w, matched, False, message_id)
        rid, created, fresh = _claim(tx, rec)
        return _write(tx, w, rid, created, message_id, fresh)
    found = ids_by_identifier(tx, rtype, system, value)
    if len(found) > 1:
        raise MultipleMatches(rtype, len(found))
    if found:
        return _write(tx, w, found[0], False, message_id)
    if matched is not None:  # the same staff member under another identifier (the match policy)
        return _write(tx, w, matched, False, message_id)
    return create(tx, w, message_id)


def _matched(tx: Tx, w: ResourceWrite) -> str | None:
    """For a type with a match policy (:data:`hms_ach.core.records.RECORD_MATCHERS`), whose business
    key names no record yet: the one record the policy finds for the write's identifiers."""
    rec = w.record
    if rec.resource_type not in RECORD_MATCHERS:
        return None
    if rec.key_value and _id_by_key(tx, rec.resource_type, rec.key_system, rec.key_value) is not None:
        return None
    return Repository(tx).matched_id(rec.resource_type, w.content)


def delete(
    tx: Tx,
    resource_type: str,
    rid: str,
    message_id: int | None,
    expected_version: ExpectedVersion | None = None,
) -> Written:
    """Write a tombstone version of ``resource_type/rid``; deleting a deleted record writes nothing."""
    row = _row(tx, resource_type, rid)
    if row is None or row.version_id == 0:
        raise NotFound(f"{resource_type}/{rid}")
    expected = expected_version() if expected_version is not None else None
    if expected is not None and expected != row.version_id:
        raise VersionConflict(f"{resource_type}/{rid}", expected, int(row.version_id))
    if row.deleted:
        return Written(resource_type, rid, int(row.version_id), None, row.last_updated)
    old = _content(row.resource)
    Repository(tx).write_version(
        resource_type, rid, int(row.version_id) + 1, old, message_id, False, deleted=True, before=old
    )
    return Written(resource_type, rid, int(row.version_id) + 1, None, datetime.now(UTC), changed=True)


# ---------------------------------------------------------------------------- request lines
@dataclass
class RequestLine:
    """The method, the URL under /fhir and the conditional headers of a write: stored beside its body
    (table ``message_fhir_request``) so that ``hms-ach replay`` can run the same request again."""

    method: str
    target: str = ""  # Practitioner, Practitioner/123, Practitioner?identifier=s|v; "" for a Bundle
    if_match: str | None = None
    if_none_exist: str | None = None


def store_request_line(tx: Tx, message_id: int, line: RequestLine | None) -> None:
    """Keep ``line`` beside the stored request ``message_id`` (nothing when None)."""
    if line is not None:
        tx.execute(
            insert(_REQUEST_LINES).values(
                message_id=message_id,
                method=line.method[:10],
                target=line.target,
                if_match=line.if_match[:255] if line.if_match else None,
                if_none_exist=line.if_none_exist,
            )
        )


def stored_request_line(tx: Tx, message_id: int) -> RequestLine | None:
    """The request line kept for ``message_id``; None when none was kept (older stores)."""
    row = tx.execute(select(_REQUEST_LINES).where(_REQUEST_LINES.c.message_id == message_id)).first()
    if row is None:
        return None
    return RequestLine(str(row.method), str(row.target or ""), row.if_match, row.if_none_exist)


__all__ = [
    "ContentCheck",
    "ExpectedVersion",
    "HistoryPage",
    "RequestLine",
    "ResourceWrite",
    "StoredVersion",
    "Written",
    "create",
    "create_unless_exists",
    "delete",
    "history",
    "ids_by_identifier",
    "is_live",
    "read",
    "reading",
    "search",
    "store_request_line",
    "stored_request_line",
    "update",
    "update_by_identifier",
    "vread",
]
