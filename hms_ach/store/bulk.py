"""Many record versions in a few statements: the writer-side half of a FHIR transaction Bundle.

A transaction Bundle is all-or-nothing, so it is one writer job and one commit. Written entry by
entry (:mod:`hms_ach.store.resources`), each entry costs about ten statements (claim, update,
history, index rows, audit, outbox, read back), and a 1,000-entry Bundle holds the writer for
seconds. This module writes a group of entries with a few statements for all of them:

* :func:`find_by_keys`: the records that already have the entries' business keys, one SELECT per
  resource type (``FOR UPDATE`` on PostgreSQL, as the per-entry claim locks them);
* :func:`live_ids`: which of the records the entries refer to exist and are not deleted;
* :func:`write_versions`: the new versions, with one ``executemany`` per table: record rows
  (INSERT for new records, UPDATE for existing ones), history rows, search-index rows, then the
  change listeners for all of them (:func:`hms_ach.store.changes.notify_many`: the audit chain in
  order, the outbox events).

The caller (:mod:`hms_ach.fhir.transaction`) decides everything a per-entry write decides (which
record an entry targets, If-Match, merge, no-op) from the rows read here, and runs the group in a
SAVEPOINT. Whatever this path does not cover raises :class:`Fallback`; the caller then rolls the
group back and writes it entry by entry, so the outcome (and every refusal) is the per-entry one.
New records are inserted with a plain INSERT after the key look-up: should another writer insert
the same key meanwhile (another instance on PostgreSQL), the unique constraint refuses the INSERT,
and the per-entry path then runs with its race-free claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, select

from hms_ach.store import fastexec, search_params
from hms_ach.store.audit import MadeDiff
from hms_ach.store.changes import Ahead, Change, notify_many, prepare, prepare_audit
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.port import Tx
from hms_ach.store.repository import HISTORY_TABLE, index_statements, record_statements, render

#: Values per SELECT of :func:`find_by_keys` and :func:`live_ids`.
CHUNK = 500


class Fallback(Exception):
    """The bulk path does not cover this group: roll it back and write it entry by entry."""


@dataclass(frozen=True)
class Existing:
    """A record row as the bulk path reads it."""

    id: str
    version: int
    deleted: bool
    resource: str
    last_updated: datetime


@dataclass
class NewVersion:
    """One version to write: ``content`` is the merged resource (``resourceType`` set); ``before``
    the content of the version it follows (None for a new record)."""

    resource_type: str
    id: str
    version: int
    content: dict[str, Any]
    created: bool
    before: dict[str, Any] | None = None
    rendered: Rendered | None = None  # rendered before the writer (a new record's version 1)


@dataclass
class Rendered:
    """A version rendered before the writer (:func:`render_ahead`): its body and text carry
    ``stamp`` where the time of the write goes, and its search-index rows are made."""

    body: dict[str, Any]
    text: str
    stamp: str
    index: IndexRows  # its search-index rows, as inserted
    ahead: Ahead  # the change listeners' rows for the new record (changes.prepare), stamped too
    audit: MadeDiff | None = None  # its audit diff (changes.prepare_audit; meta is not in it)
    stamped: bool = True  # whether a row of ``ahead`` holds the stamp (most events do not)


def render_ahead(resource_type: str, rid: str, content: dict[str, Any]) -> Rendered:
    """Render version 1 of a new record and make its index rows and the change listeners' rows
    now, to be written by :func:`write_versions` (which puts the time of the write in place of the
    stamp): the index rows do not depend on ``meta`` (``_lastUpdated`` reads the record's column)."""
    stamp = f"hms-ach-last-updated-{uuid.uuid4().hex}"
    body, text = render(resource_type, rid, 1, _STAMP_TIME, content)
    body["meta"]["lastUpdated"] = stamp
    text = text.replace(_STAMP_TEXT, stamp, 1)
    change = Change(resource_type, rid, 1, "create", None, body, None)
    ahead, made = prepare(change), prepare_audit(change)
    index: IndexRows = {}
    _add_index_rows(index, resource_type, rid, body)
    stamped = any(stamp in row for rows in ahead.values() for _name, row in rows)
    return Rendered(body, text, stamp, index, ahead, made, stamped)


#: Search-index rows by (kind, the columns they set): each row the values of those columns.
IndexRows = dict[tuple[str, tuple[str, ...]], list[tuple[Any, ...]]]


def _add_index_rows(index: IndexRows, resource_type: str, rid: str, body: dict[str, Any]) -> None:
    """Add the search-index rows of ``body`` (the version of record ``rid``) to ``index``."""
    for kind, rows in search_params.index_rows(resource_type, body).items():
        for r in rows:
            index.setdefault((kind, ("resource_type", "resource_id", *r)), []).append(
                (resource_type, rid, *r.values())
            )


def _restamp(ahead: Ahead, stamp: str, when: str) -> Ahead:
    return {
        listener: [(name, text.replace(stamp, when)) for name, text in rows]
        for listener, rows in ahead.items()
    }


_STAMP_TIME = datetime(1, 1, 1, tzinfo=UTC)
_STAMP_TEXT = _STAMP_TIME.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Stored:
    """What :func:`write_versions` stored for one :class:`NewVersion`."""

    text: str
    last_updated: datetime


def _table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def find_by_keys(tx: Tx, resource_type: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Existing]:
    """The rows of ``resource_type`` with the business keys ``(system, value)`` (locked on
    PostgreSQL), by key: one SELECT per system (and per ``CHUNK`` values), on the key's unique index."""
    stmt = _by_keys(resource_type, tx.dialect.name)
    name = f"bulk.by_keys:{resource_type}"
    t = _table(resource_type)
    when = fastexec.result_processor(tx, t.c.last_updated)
    by_system: dict[str, set[str]] = {}
    for system, value in keys:
        by_system.setdefault(system, set()).add(value)
    found: dict[tuple[str, str], Existing] = {}
    for system, values in by_system.items():
        for chunk in _chunks(sorted(values)):
            params = {"system": system, **{f"v{i}": v for i, v in enumerate(_padded(chunk))}}
            for key_value, rid, version, deleted, resource, last_updated in fastexec.all_rows(
                tx, name, stmt, params
            ):
                found[(system, key_value)] = Existing(
                    str(rid), int(version), bool(deleted), resource, when(last_updated)
                )
    return found


_by_keys_cache: dict[tuple[str, str], Any] = {}


def _by_keys(resource_type: str, dialect: str) -> Any:
    """The SELECT of :func:`find_by_keys`: the key system, and ``CHUNK`` values (built once: its
    ``CHUNK`` parameters cost SQLAlchemy more to build than the SELECT costs to run)."""
    stmt = _by_keys_cache.get((resource_type, dialect))
    if stmt is None:
        t = _table(resource_type)
        stmt = select(
            t.c.key_value, t.c.id, t.c.version_id, t.c.deleted, t.c.resource, t.c.last_updated
        ).where(
            t.c.key_system == bindparam("system"),
            t.c.key_value.in_([bindparam(f"v{i}") for i in range(CHUNK)]),
        )
        if dialect == "postgresql":
            stmt = stmt.with_for_update()
        _by_keys_cache[(resource_type, dialect)] = stmt
    return stmt


def _padded(values: list[str]) -> list[str]:
    """``values`` (1 to ``CHUNK``) made ``CHUNK`` long by repeating the last (the same IN list)."""
    return values + [values[-1]] * (CHUNK - len(values))


def live_ids(tx: Tx, resource_type: str, ids: Iterable[str]) -> set[str]:
    """Those of ``ids`` that are records of ``resource_type`` that exist and are not deleted."""
    t = _table(resource_type)
    live: set[str] = set()
    for chunk in _chunks(sorted(set(ids))):
        q = select(t.c.id).where(t.c.id.in_(chunk), t.c.version_id != 0, t.c.deleted.is_(False))
        live.update(str(i) for i in tx.execute(q).scalars())
    return live


#: The columns of a record row and a history row as :func:`write_versions` inserts them.
_RECORD_COLUMNS = ("id", "key_system", "key_value", "version_id", "last_updated", "deleted", "resource")
_HISTORY_COLUMNS = ("resource_type", "id", "version_id", "last_updated", "deleted", "message_id", "resource")


def write_versions(
    tx: Tx,
    versions: list[NewVersion],
    keys: Mapping[str, tuple[str | None, str | None]],
    message_id: int | None,
) -> list[Stored]:
    """Write ``versions`` (record rows, history, search index, change listeners) with a few
    statements per table; ``keys``: the business key of each new record, by id."""
    now = datetime.now(UTC)
    stored: list[Stored] = []
    inserts: dict[str, list[tuple[Any, ...]]] = {}
    updates: dict[str, list[dict[str, Any]]] = {}
    history: list[tuple[Any, ...]] = []
    index: IndexRows = {}
    wipes: list[dict[str, Any]] = []
    changes: list[Change] = []
    prepared: list[Ahead | None] = []
    diffs: list[MadeDiff | None] = []
    when = now.isoformat().replace("+00:00", "Z")  # as render() writes it
    for v in versions:
        ahead = v.rendered
        if ahead is not None:
            body, text = ahead.body, ahead.text.replace(ahead.stamp, when, 1)
            body["meta"]["lastUpdated"] = when
            prepared.append(_restamp(ahead.ahead, ahead.stamp, when) if ahead.stamped else ahead.ahead)
            diffs.append(ahead.audit)
            for group, made in ahead.index.items():
                found = index.get(group)
                if found is None:
                    index[group] = list(made)
                else:
                    found.extend(made)
        else:
            prepared.append(None)
            diffs.append(None)
            body, text = render(v.resource_type, v.id, v.version, now, v.content)
            _add_index_rows(index, v.resource_type, v.id, body)
        stored.append(Stored(text, now))
        if v.created and v.version == 1:
            system, value = keys.get(v.id, (None, None))
            inserts.setdefault(v.resource_type, []).append(
                (v.id, system if value else None, value or None, 1, now, False, text)
            )
        else:
            updates.setdefault(v.resource_type, []).append(
                {"rid": v.id, "v": v.version, "t": now, "r": text, "d": False}
            )
            wipes.append({"rt": v.resource_type, "rid": v.id})
        history.append((v.resource_type, v.id, v.version, now, False, message_id, text))
        action = "create" if v.created else "update"
        changes.append(Change(v.resource_type, v.id, v.version, action, v.before, body, message_id))
    dialect = tx.dialect.name
    for rtype, values in inserts.items():
        fastexec.insert_values(tx, _table(rtype), _RECORD_COLUMNS, values)
    for rtype, rows in updates.items():
        st = record_statements(rtype, dialect)
        fastexec.execute_many(tx, f"update:{st.name}", st.update, rows)
    fastexec.insert_values(tx, HISTORY_TABLE, _HISTORY_COLUMNS, history)
    for kind in INDEX_TABLES:
        wipe, table = index_statements(kind)
        fastexec.execute_many(tx, f"wipe_index:{kind}", wipe, wipes)
        for (of_kind, columns), values in index.items():
            if of_kind == kind:
                fastexec.insert_values(tx, table, columns, values)
    notify_many(tx, changes, prepared, diffs)
    return stored
