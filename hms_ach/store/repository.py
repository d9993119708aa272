"""Reads and writes of canonical records, on one SQLAlchemy connection inside the caller's transaction.

Upserts are race-free: a record with a business key is read by its key (``FOR UPDATE`` on
PostgreSQL) and merged; when it is not there, its first version is inserted whole with
``ON CONFLICT (key_system, key_value) DO NOTHING``, and a writer that lost that race reads the
winner's row and merges into it. The unique constraint, never a check-then-insert, decides who
creates it. A write that changes nothing makes no new version.

The hot path runs statements built once per table with bound parameters, rewrites only the kinds
of search-index rows that changed, and writes a new record's first version with one INSERT.

:meth:`Repository.apply` (the records of one message) writes each record row at once, but gathers
what goes with the versions it writes (history rows, search-index rows, change announcements) and
writes them at its end: one ``executemany`` per table for the whole message, and one
:func:`~hms_ach.store.changes.notify_many` (one chained audit INSERT, the listeners' ``many``
variants). A record written twice in one message (a reference cycle) gets its index rows once, from
its last version. Reads of index rows inside ``apply`` (a type's match policy, a store action) see
what was gathered (written first where it matters). Everything stays in the caller's transaction (and SAVEPOINT), so a failure
undoes the message whole as before; other callers (FHIR writes, listeners) write at once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Connection, Table, and_, bindparam, delete, distinct, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.core.errors import ContentError, Err0357
from hms_ach.core.records import (
    RECORD_MATCHERS,
    RECORD_MERGERS,
    MappingResult,
    RecordWrite,
    StoreAction,
    merge_record,
    merge_rule,
)
from hms_ach.store import fastexec, search_params
from hms_ach.store.changes import Change, notify, notify_many
from hms_ach.store.ids import new_id
from hms_ach.store.models import (
    INDEX_TABLES,
    RECORD_TABLES,
    InboundMessage,
    ResourceHistory,
    SearchReference,
    SearchToken,
)


@dataclass
class WriteOutcome:
    resource_type: str
    id: str
    version_id: int
    created: bool
    changed: bool

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _strip_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def _render(
    resource_type: str, rid: str, version: int, now: datetime, content: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The stored body of one version (``id`` and ``meta`` first) and its JSON text."""
    body: dict[str, Any] = {
        "resourceType": resource_type,
        "id": rid,
        "meta": {"versionId": str(version), "lastUpdated": now.isoformat().replace("+00:00", "Z")},
    }
    body.update({k: v for k, v in content.items() if k not in ("resourceType", "id", "meta")})
    return body, dumps(body)


def _without_nones(value: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``value`` without None anywhere in it. When its JSON text holds no ``null`` (merges
    rarely leave a None) only the top level is copied: one C-level dump instead of a walk."""
    text = _json_or_none(value)
    if text is not None and b"null" not in text:
        return dict(value)
    return _drop_nones(value)  # type: ignore[no-any-return]


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value if v is not None]
    return value


class _Statements:
    """The write statements of one record table, built once with bound parameters.

    Building a SQLAlchemy statement costs more than running it on SQLite; these are built on
    first use and reused, so the per-message cost is execution only.
    """

    def __init__(self, table: Table, insert_fn: Any, lock: bool):
        self.table = table
        self.name = table.name
        c = table.c
        cols = (c.id, c.version_id, c.resource, c.deleted)
        by_key = select(*cols).where(c.key_system == bindparam("ks"), c.key_value == bindparam("kv"))
        by_value = select(*cols).where(c.key_system.is_(None), c.key_value == bindparam("kv"))
        self.by_key = by_key.with_for_update() if lock else by_key
        self.by_value = by_value.with_for_update() if lock else by_value
        # the reads of a message's records, before they are merged: no lock (see Repository.upsert)
        self.peek_key, self.peek_value = by_key, by_value
        # RETURNING tells whether the row went in (rowcount is not reliable with every driver)
        self.insert_keyed = (
            insert_fn(table)
            .on_conflict_do_nothing(index_elements=["key_system", "key_value"])
            .returning(c.id)
        )
        self.update = (
            update(table)
            .where(c.id == bindparam("rid"))
            .values(
                version_id=bindparam("v"),
                last_updated=bindparam("t"),
                resource=bindparam("r"),
                deleted=bindparam("d"),
            )
        )
        # lock a row read without a lock, while it is still the version read (Repository.upsert)
        self.lock_if = (
            select(c.id).where(c.id == bindparam("rid"), c.version_id == bindparam("v0")).with_for_update()
        )
        # How many live records one identifier names, and the least id: what matched_id asks
        # for each identifier of the type's match policy (one row, so it runs on fastexec).
        ix = SearchToken.__table__  # type: ignore[attr-defined]
        named = select(ix.c.resource_id).where(
            ix.c.resource_type == bindparam("rt"),
            ix.c.param == bindparam("prm"),
            ix.c.system == bindparam("sys"),
            ix.c.value == bindparam("val"),
        )
        self.matched = select(func.count(distinct(c.id)), func.min(c.id)).where(
            c.id.in_(named), c.deleted.is_(False), c.version_id > bindparam("v0")
        )


class _Unchanged:
    """The writes found to change nothing, remembered so that the same write is not merged again.

    Most records of a message are stored already and change nothing (its attending doctor, its
    ward): each was read, parsed and merged (a Practitioner through its survivorship rules) only
    to find the merge equal to what is stored. The outcome is a function of the stored version's
    text (which names its id and version), the content written, its source and mode, and the
    type's merge rule and settings (:func:`hms_ach.core.records.merge_rule`). A digest of the first
    four is kept with the last two (held, so that they are compared by identity), up to
    :attr:`LIMIT` of them (then it starts over): the same write over the same stored version, under
    the same rule and settings, is known to change nothing without merging. The record is still
    read each time, so a version written since (by anyone) is a different text and is merged.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[object, object]] = {}

    @staticmethod
    def key(rec: RecordWrite, stored: str | bytes, content: dict[str, Any], source: str) -> bytes | None:
        """The digest of one write over one stored version (None when the content has no JSON form)."""
        try:
            written = orjson.dumps(content)
        except TypeError:
            return None
        h = hashlib.blake2b(digest_size=16)
        # NUL never occurs raw in a type, mode, channel name or JSON text: the parts cannot run together
        h.update(f"{rec.resource_type}\0{rec.mode}\0{source}\0".encode())
        h.update(stored.encode() if isinstance(stored, str) else stored)
        h.update(b"\0")
        h.update(written)
        return h.digest()

    def known(self, key: bytes, rule: tuple[object, object]) -> bool:
        seen = self._seen.get(key)
        return seen is not None and seen[0] is rule[0] and seen[1] is rule[1]

    def remember(self, key: bytes, rule: tuple[object, object]) -> None:
        if len(self._seen) >= self.LIMIT:
            self._seen = {}
        self._seen[key] = rule


#: One memory per process: what it holds is true of any store (see :class:`_Unchanged`).
_UNCHANGED = _Unchanged()


@cache
def _statements(resource_type: str, dialect: str) -> _Statements:
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    lock = dialect == "postgresql"
    return _Statements(table, pg_insert if lock else sqlite_insert, lock)


_HISTORY = ResourceHistory.__table__  # type: ignore[attr-defined]
_MESSAGES = InboundMessage.__table__  # type: ignore[attr-defined]
_MESSAGE_CHANNEL = select(_MESSAGES.c.channel).where(_MESSAGES.c.id == bindparam("mid"))


#: Index rows by kind (token/string/date/reference), as :func:`search_params.index_rows` makes them.
IndexRows = dict[str, list[dict[str, Any]]]


@dataclass
class _Gathered:
    """What :meth:`Repository.apply` writes at its end: history rows, the index rows of each record
    it wrote (those stored before it, None when unknown, and its last version's), and the changes."""

    history: list[dict[str, Any]] = field(default_factory=list)
    index: dict[tuple[str, str], tuple[IndexRows | None, IndexRows]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)


def _gathered_identifiers(g: _Gathered, resource_type: str, wanted: set[tuple[Any, Any]]) -> bool:
    """Whether the index rows gathered for records of ``resource_type`` (their new rows, or the
    stored rows they replace) hold an ``identifier`` (system, value) of ``wanted``, or may (rows
    not known): a search of those identifiers must then see the gathered rows written first."""
    for (rtype, _rid), (old, new) in g.index.items():
        if rtype != resource_type:
            continue
        if old is None:
            return True
        for rows in (old, new):
            for row in rows.get("token", ()):
                if row["param"] == "identifier" and (row["system"], row["value"]) in wanted:
                    return True
    return False


@cache
def _index_statements(kind: str) -> tuple[Any, Table]:
    t = INDEX_TABLES[kind].__table__  # type: ignore[attr-defined]
    wipe = delete(t).where(t.c.resource_type == bindparam("rt"), t.c.resource_id == bindparam("rid"))
    return wipe, t


class Repository:
    """Canonical record reads and writes on ``conn`` (the caller owns the transaction)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        dialect = conn.dialect.name
        self._dialect = dialect
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert
        self._lock = dialect == "postgresql"
        self._sources: dict[int, str] = {}
        self._gathered: _Gathered | None = None  # set while apply() runs

    # ------------------------------------------------------------------ reads
    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
        row = self.conn.execute(
            select(table.c.resource, table.c.deleted).where(table.c.id == resource_id)
        ).first()
        if row is None:
            return None
        return orjson.loads(row.resource)  # type: ignore[no-any-return]

    def find_by_key(
        self, resource_type: str, system: str | None, value: str
    ) -> tuple[str, dict[str, Any]] | None:
        table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
        cond = and_(table.c.key_system == system, table.c.key_value == value)
        if system is None:
            cond = and_(table.c.key_system.is_(None), table.c.key_value == value)
        row = self.conn.execute(select(table.c.id, table.c.resource).where(cond)).first()
        if row is None:
            return None
        return row.id, orjson.loads(row.resource)

    # ------------------------------------------------------------------ writes
    def apply(self, result: MappingResult, message_id: int | None = None) -> list[WriteOutcome]:
        """Write every record of ``result`` (references resolved in dependency order), then its
        actions; the history, index rows and change announcements of all of them go in together
        at the end (see the module docstring)."""
        if self._gathered is not None:  # nested (a listener's write): the outer apply writes them
            return self._apply(result, message_id)
        self._gathered = _Gathered()
        try:
            outcomes = self._apply(result, message_id)
            self.flush()
        finally:
            self._gathered = None
        return outcomes

    def flush(self) -> None:
        """Write what :meth:`apply` gathered so far: history rows, index rows, then the changes."""
        g = self._gathered
        if g is None:
            return
        self._gathered = _Gathered()
        fastexec.insert_rows(self.conn, _HISTORY, g.history)
        for kind in INDEX_TABLES:
            wipes: list[dict[str, Any]] = []
            adds: list[dict[str, Any]] = []
            for (rtype, rid), (old, new) in g.index.items():
                after = new.get(kind, [])
                if old is not None:
                    before = old.get(kind, [])
                    if before == after:
                        continue
                    if before:
                        wipes.append({"rt": rtype, "rid": rid})
                else:
                    wipes.append({"rt": rtype, "rid": rid})
                adds.extend({"resource_type": rtype, "resource_id": rid, **r} for r in after)
            wipe, add = _index_statements(kind)
            if wipes:
                fastexec.execute_many(self.conn, f"wipe_index:{kind}", wipe, wipes)
            fastexec.insert_rows(self.conn, add, adds)
        notify_many(self.conn, g.changes)

    def _apply(self, result: MappingResult, message_id: int | None) -> list[WriteOutcome]:
        outcomes: list[WriteOutcome] = []
        resolved: dict[str, str] = {}
        scans = {id(rec): _alias_scan(rec.content) for rec in result.records}  # each dumped once
        pending = [(rec, _aliases_in(rec.content, scans[id(rec)])) for rec in result.records]
        reserved: dict[str, str] = {}  # alias -> the id taken for a record of a reference cycle
        referrers: list[RecordWrite] = []  # records written with a reference to a reserved id
        while pending:
            progressed = False
            for item in list(pending):
                rec, needs = item
                if needs and not needs <= resolved.keys():
                    continue
                pending.remove(item)
                progressed = True
                content = _resolve_aliases(rec.content, resolved, scans[id(rec)]) if needs else rec.content
                taken = reserved.get(rec.alias)
                outcome = self.upsert(rec, content, message_id, taken)
                if needs & reserved.keys():
                    referrers.append(rec)
                resolved[rec.alias] = outcome.reference if outcome is not None else ""
                if outcome is not None:
                    outcomes.append(outcome)
                if taken is not None and (outcome is None or outcome.id != taken):
                    # another writer created it meanwhile (PostgreSQL): point the records that
                    # were written with the reserved id at the one it has
                    for ref in referrers:
                        again = self.upsert(ref, _resolve_aliases(ref.content, resolved), message_id)
                        if again is not None:
                            outcomes.append(again)
            if not progressed and _reserve_cycle(self, pending, resolved, reserved):
                continue
            if not progressed:
                missing = sorted(set().union(*(needs for _rec, needs in pending)) - set(resolved))
                raise ContentError(
                    f"records {[r.alias for r, _needs in pending]} refer to {missing}, which no rule of this mapping produces",
                    code=Err0357.INTERNAL_ERROR,
                )
        if result.actions:
            self.flush()  # an action reads index rows (an A40 finds the source patient's encounters)
        for action in result.actions:
            outcomes.extend(self.run_action(action, resolved, message_id))
        return outcomes

    def _by_key(
        self, st: _Statements, system: str | None, value: str, lock: bool = True
    ) -> tuple[Any, ...] | None:
        """(id, version_id, resource, deleted) of the record with this business key, or None;
        locked on PostgreSQL unless ``lock`` is False."""
        if system is None:
            stmt, name = (st.by_value, "by_value") if lock else (st.peek_value, "peek_value")
            return fastexec.first_row(self.conn, f"{name}:{st.name}", stmt, {"kv": value})
        stmt, name = (st.by_key, "by_key") if lock else (st.peek_key, "peek_key")
        return fastexec.first_row(self.conn, f"{name}:{st.name}", stmt, {"ks": system, "kv": value})

    def upsert(
        self, rec: RecordWrite, content: dict[str, Any], message_id: int | None, rid: str | None = None
    ) -> WriteOutcome | None:
        """Create or merge one record.

        A keyed record is looked up by its business key first. When it is not there and
        ``rec.create`` allows, its first version is inserted whole with
        ``ON CONFLICT (key_system, key_value) DO NOTHING``: the unique constraint decides who
        creates it, and the loser of a race reads the winner's row and merges into it.
        ``rid``: the id a new record gets (one :meth:`reserve_id` gave, or a shipped form's
        ``Questionnaire/<form id>``; default a new UUID); a stored one keeps its own.

        On PostgreSQL (several engines may share the database) a stored record is read without a
        lock and merged: most records of a message change nothing (its practitioners, its wards),
        and those are left without ever being locked, so two engines' group commits no longer wait
        on each other's rows (nor deadlock) for them. A changed record is locked (``FOR UPDATE``)
        only while it is still the version read, and then written; when another writer changed it
        meanwhile, it is read again, locked, and merged again.
        """
        st = _statements(rec.resource_type, self._dialect)
        reserved = rid
        locked = not self._lock  # SQLite has one writer: what it reads no one changes before it commits
        if rec.key_value:
            row = self._by_key(st, rec.key_system, rec.key_value, lock=locked)
            if row is None and rec.resource_type in RECORD_MATCHERS:
                matched = self.matched_id(rec.resource_type, content)
                row = None if matched is None else self._by_id(st, matched)
                locked = True  # read FOR UPDATE on PostgreSQL
            if row is None:
                if not rec.create:
                    return None
                rid = reserved or new_id()
                first = self._merge(rec, {}, content, message_id)
                if self._create(st, rec, rid, first, message_id):
                    return WriteOutcome(rec.resource_type, rid, 1, created=True, changed=True)
                row = self._by_key(st, rec.key_system, rec.key_value)  # another writer created it first
                locked = True
                if row is None:
                    raise RuntimeError(
                        f"{rec.resource_type} {rec.key_system}|{rec.key_value} was neither inserted nor found"
                    )
        else:
            rid = reserved or new_id()
            self._create(st, rec, rid, self._merge(rec, {}, content, message_id), message_id)
            return WriteOutcome(rec.resource_type, rid, 1, created=True, changed=True)
        while True:
            rid, version, stored = row[0], row[1], row[2]
            created = version == 0  # a placeholder claimed by a FHIR conditional create
            known = (
                None
                if created
                else _Unchanged.key(rec, stored, content, self.source_of(rec.resource_type, message_id))
            )
            rule = merge_rule(rec.resource_type)
            if known is not None and _UNCHANGED.known(known, rule):
                return WriteOutcome(rec.resource_type, rid, version, created=False, changed=False)
            old = _strip_meta(orjson.loads(stored))
            merged = self._merge(rec, old, content, message_id)
            if not created and merged == old:
                if known is not None:
                    _UNCHANGED.remember(known, rule)
                return WriteOutcome(rec.resource_type, rid, version, created=False, changed=False)
            if locked or self._lock_if(st, rid, version):
                return self.write_version(
                    rec.resource_type,
                    rid,
                    version + 1,
                    merged,
                    message_id,
                    created,
                    before=None if created else old,
                    live=not row[3],
                )
            # another engine wrote a version since the read: read it again, locked this time
            row = self._by_id(st, rid)
            locked = True
            if row is None:
                raise RuntimeError(f"{rec.resource_type}/{rid} is gone")

    def _lock_if(self, st: _Statements, rid: str, version: int) -> bool:
        """Lock the row ``rid`` (``FOR UPDATE``) if it is still ``version``; False when another
        writer wrote a version since it was read (then nothing is locked)."""
        values = {"rid": rid, "v0": version}
        return fastexec.first_row(self.conn, f"lock_if:{st.name}", st.lock_if, values) is not None

    def reserve_id(self, rec: RecordWrite, content: dict[str, Any]) -> str | None:
        """The id :meth:`upsert` will give ``rec``: the stored record's (found as ``upsert`` finds
        it, locked on PostgreSQL), else a new one; None when it is not stored and would not be
        created. Only a writer that creates the record first in between makes ``upsert`` differ."""
        if not rec.key_value:
            return new_id()
        st = _statements(rec.resource_type, self._dialect)
        row = self._by_key(st, rec.key_system, rec.key_value)
        if row is None and rec.resource_type in RECORD_MATCHERS:
            matched = self.matched_id(rec.resource_type, content)
            row = None if matched is None else self._by_id(st, matched)
        if row is not None:
            return str(row[0])
        return new_id() if rec.create else None

    def _by_id(self, st: _Statements, rid: str) -> tuple[Any, ...] | None:
        """(id, version_id, resource, deleted) of the record ``rid`` (locked on PostgreSQL)."""
        c = st.table.c
        q = select(c.id, c.version_id, c.resource, c.deleted).where(c.id == rid)
        row = self.conn.execute(q.with_for_update() if self._lock else q).first()
        return None if row is None else tuple(row)

    def matched_id(self, resource_type: str, content: dict[str, Any]) -> str | None:
        """The one live record the type's match policy (:data:`hms_ach.core.records.RECORD_MATCHERS`)
        finds for ``content``: its identifiers are tried in the policy's order, and the first that
        names exactly one live record decides. None: no policy, or no identifier names one record."""
        matcher = RECORD_MATCHERS.get(resource_type)
        if matcher is None:
            return None
        wanted = list(matcher(content))
        if self._gathered is not None and _gathered_identifiers(self._gathered, resource_type, set(wanted)):
            self.flush()  # the identifier rows this message wrote (or is about to replace) count
        st = _statements(resource_type, self._dialect)
        for system, value in wanted:
            values = {"rt": resource_type, "prm": "identifier", "sys": system, "val": value, "v0": 0}
            row = fastexec.first_row(self.conn, f"matched:{st.name}", st.matched, values)
            if row is not None and row[0] == 1:
                return str(row[1])
        return None

    def source_of(self, resource_type: str, message_id: int | None) -> str:
        """The inbound channel of message ``message_id``: the source a type's own merge rule
        (:data:`hms_ach.core.records.RECORD_MERGERS`) ranks; ``""`` for other types or no message."""
        if message_id is None or resource_type not in RECORD_MERGERS:
            return ""
        if message_id not in self._sources:
            row = fastexec.first_row(self.conn, "message_channel", _MESSAGE_CHANNEL, {"mid": message_id})
            self._sources[message_id] = "" if row is None or row[0] is None else str(row[0])
        return self._sources[message_id]

    def _merge(
        self, rec: RecordWrite, old: dict[str, Any], content: dict[str, Any], message_id: int | None
    ) -> dict[str, Any]:
        # Encounter.location keeps its history (core.records.merge_location_history)
        source = self.source_of(rec.resource_type, message_id)
        merged = _without_nones(merge_record(rec.resource_type, rec.mode, old, content, source, history=True))
        merged["resourceType"] = rec.resource_type
        return merged

    def _create(
        self, st: _Statements, rec: RecordWrite, rid: str, content: dict[str, Any], message_id: int | None
    ) -> bool:
        """Insert version 1 of a new record with everything that goes with it; False when the
        business key was taken meanwhile (nothing was written then)."""
        now = datetime.now(UTC)
        body, text = _render(rec.resource_type, rid, 1, now, content)
        values = {
            "id": rid,
            "key_system": rec.key_system if rec.key_value else None,
            "key_value": rec.key_value or None,
            "version_id": 1,
            "last_updated": now,
            "deleted": False,
            "resource": text,
        }
        if rec.key_value:
            if (
                fastexec.first_row(self.conn, f"insert_keyed:{st.name}", st.insert_keyed, values, st.table)
                is None
            ):
                return False
        else:
            fastexec.insert_rows(self.conn, st.table, [values])
        self._after_write(rec.resource_type, rid, 1, now, text, body, None, message_id, "create", {})
        return True

    def write_version(
        self,
        resource_type: str,
        rid: str,
        version: int,
        content: dict[str, Any],
        message_id: int | None,
        created: bool,
        deleted: bool = False,
        before: dict[str, Any] | None = None,
        live: bool = False,
    ) -> WriteOutcome:
        """Write ``content`` as version ``version`` of the existing row ``rid``.

        ``live`` says the caller read the row and it is not deleted, so ``before`` is what its
        search-index rows were made from: only the kinds of index rows that differ are rewritten.
        Otherwise every index row of the record is replaced.
        """
        st = _statements(resource_type, self._dialect)
        if before is None and not created:
            before = self.get(resource_type, rid)
        now = datetime.now(UTC)
        body, text = _render(resource_type, rid, version, now, content)
        fastexec.execute_many(
            self.conn,
            f"update:{st.name}",
            st.update,
            [{"rid": rid, "v": version, "t": now, "r": text, "d": deleted}],
        )
        action = "delete" if deleted else "create" if created else "update"
        if created and version == 1:
            old_index: dict[str, list[dict[str, Any]]] | None = {}  # a placeholder never has index rows
        elif live and before is not None and not deleted:
            old_index = search_params.index_rows(resource_type, before)
        else:
            old_index = None
        self._after_write(
            resource_type,
            rid,
            version,
            now,
            text,
            None if deleted else body,
            None if created else before,
            message_id,
            action,
            old_index,
            deleted,
        )
        return WriteOutcome(resource_type, rid, version, created=created, changed=True)

    def _after_write(
        self,
        resource_type: str,
        rid: str,
        version: int,
        now: datetime,
        text: str,
        body: dict[str, Any] | None,
        before: dict[str, Any] | None,
        message_id: int | None,
        action: str,
        old_index: dict[str, list[dict[str, Any]]] | None,
        deleted: bool = False,
    ) -> None:
        """History row, search-index rows and change listeners of one new version. ``old_index``:
        the index rows the record has now, when known (else all are replaced). Inside
        :meth:`apply` they are gathered and written at its end."""
        history = {
            "resource_type": resource_type,
            "id": rid,
            "version_id": version,
            "last_updated": now,
            "deleted": deleted,
            "message_id": message_id,
            "resource": text,
        }
        change = Change(resource_type, rid, version, action, before, body, message_id)
        g = self._gathered
        if g is not None:
            g.history.append(history)
            new = search_params.index_rows(resource_type, body) if body is not None else {}
            key = (resource_type, rid)
            stored = g.index[key][0] if key in g.index else old_index  # as stored before this apply
            g.index[key] = (stored, new)
            g.changes.append(change)
            return
        fastexec.insert_rows(self.conn, _HISTORY, [history])
        if old_index is not None:
            self._write_index(resource_type, rid, old_index, body)
        else:
            self.reindex(resource_type, rid, body)
        notify(self.conn, change)

    def _write_index(
        self,
        resource_type: str,
        rid: str,
        old: dict[str, list[dict[str, Any]]],
        resource: dict[str, Any] | None,
    ) -> None:
        """Rewrite the index rows of the kinds whose rows differ from ``old`` (those of the stored
        previous version); a kind whose rows did not change is not touched."""
        new = search_params.index_rows(resource_type, resource) if resource is not None else {}
        for kind in INDEX_TABLES:
            before, after = old.get(kind, []), new.get(kind, [])
            if before == after:
                continue
            wipe, add = _index_statements(kind)
            if before:
                self.conn.execute(wipe, {"rt": resource_type, "rid": rid})
            if after:
                fastexec.insert_rows(
                    self.conn, add, [{"resource_type": resource_type, "resource_id": rid, **r} for r in after]
                )

    def reindex(self, resource_type: str, rid: str, resource: dict[str, Any] | None) -> None:
        """Replace every search-index row of one record (none when it is deleted)."""
        rows = search_params.index_rows(resource_type, resource) if resource is not None else {}
        for kind in INDEX_TABLES:
            wipe, add = _index_statements(kind)
            self.conn.execute(wipe, {"rt": resource_type, "rid": rid})
            if rows.get(kind):
                fastexec.insert_rows(
                    self.conn,
                    add,
                    [{"resource_type": resource_type, "resource_id": rid, **r} for r in rows[kind]],
                )

    # ------------------------------------------------------------------ actions
    def run_action(
        self, action: StoreAction, resolved: dict[str, str], message_id: int | None
    ) -> list[WriteOutcome]:
        handler = ACTIONS.get(action.name)
        if handler is None:
            raise ContentError(f"unknown store action {action.name!r}; known: {sorted(ACTIONS)}")
        return handler(self, action.args, resolved, message_id)

    def _merge_patient(
        self, args: dict[str, Any], resolved: dict[str, str], message_id: int | None
    ) -> list[WriteOutcome]:
        """A40: mark the ``source`` patient replaced-by ``target`` and move its encounters over."""
        src_ref = resolved.get(str(args.get("source", "")).lstrip("@"), "")
        dst_ref = resolved.get(str(args.get("target", "")).lstrip("@"), "")
        if not src_ref or not dst_ref or src_ref == dst_ref:
            return []
        src_id, dst_id = src_ref.split("/", 1)[1], dst_ref.split("/", 1)[1]
        outcomes: list[WriteOutcome] = []
        src = self.get("Patient", src_id) or {}
        src_content = _strip_meta(src)
        src_content["active"] = False
        links = [lk for lk in src_content.get("link", []) if lk.get("other", {}).get("reference") != dst_ref]
        src_content["link"] = links + [{"other": {"reference": dst_ref}, "type": "replaced-by"}]
        outcomes.append(
            self.write_version(
                "Patient",
                src_id,
                self._version("Patient", src_id) + 1,
                src_content,
                message_id,
                created=False,
            )
        )
        dst_content = _strip_meta(self.get("Patient", dst_id) or {})
        dlinks = [lk for lk in dst_content.get("link", []) if lk.get("other", {}).get("reference") != src_ref]
        dst_content["link"] = dlinks + [{"other": {"reference": src_ref}, "type": "replaces"}]
        outcomes.append(
            self.write_version(
                "Patient",
                dst_id,
                self._version("Patient", dst_id) + 1,
                dst_content,
                message_id,
                created=False,
            )
        )
        ref = SearchReference.__table__  # type: ignore[attr-defined]
        enc_ids = (
            self.conn.execute(
                select(ref.c.resource_id)
                .distinct()
                .where(
                    and_(
                        ref.c.resource_type == "Encounter",
                        ref.c.param == "subject",
                        ref.c.target_type == "Patient",
                        ref.c.target_id == src_id,
                    )
                )
            )
            .scalars()
            .all()
        )
        for eid in enc_ids:
            enc = _strip_meta(self.get("Encounter", eid) or {})
            enc["subject"] = {"reference": dst_ref}
            outcomes.append(
                self.write_version(
                    "Encounter", eid, self._version("Encounter", eid) + 1, enc, message_id, created=False
                )
            )
        return outcomes

    def _version(self, resource_type: str, rid: str) -> int:
        table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
        q = select(table.c.version_id).where(table.c.id == rid)
        if self._lock:
            q = q.with_for_update()
        return int(self.conn.execute(q).scalar_one())


ACTIONS = {
    "merge_patient": Repository._merge_patient,
}


def _reserve_cycle(
    repo: Repository,
    pending: list[tuple[RecordWrite, set[str]]],
    resolved: dict[str, str],
    reserved: dict[str, str],
) -> bool:
    """Records that refer to each other (an Encounter's ``diagnosis`` and that Condition's
    ``encounter``): the first merge-mode record of the cycle gets its id before it is written (the
    stored record's, found by its business key or match policy, or a new one), so the records that
    refer to it are written with their references, and it is written once, after them, with its
    own. One it would not create (``create: false``, not stored) is referred to by none. False: no
    cycle."""
    waiting = {rec.alias for rec, _needs in pending}
    for rec, needs in pending:
        if rec.mode != "merge" or rec.alias in reserved or not needs - resolved.keys() <= waiting:
            continue
        rid = repo.reserve_id(rec, _without_aliases(rec.content, resolved))
        if rid is None:
            resolved[rec.alias] = ""
        else:
            reserved[rec.alias] = rid
            resolved[rec.alias] = f"{rec.resource_type}/{rid}"
        return True
    return False


def _without_aliases(value: Any, resolved: dict[str, str]) -> Any:
    """``value`` with its references resolved, leaving out (not deleting) the elements that refer
    to a record not written yet or not written at all."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            item = _without_aliases(v, resolved)
            if item is not _UNSET:
                out[k] = item
        ref = out.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            if not resolved.get(ref[1:]):
                return _UNSET
            out["reference"] = resolved[ref[1:]]
        return out if out or not value else _UNSET
    if isinstance(value, list):
        return [i for i in (_without_aliases(v, resolved) for v in value) if i is not _UNSET]
    return value


_UNSET = object()


#: A record's reference to another record of its message as orjson writes it: the key
#: ``reference`` and a string value that starts with ``@`` (group 1: the alias, when it has no
#: escaped character). :func:`_alias_refs` checks each match is a key (after ``{`` or ``,``: a
#: quote inside a string is escaped) and that no other such reference was missed.
_ALIAS_REF = re.compile(rb'"reference":"@([^"\\]*)"')
_ALIAS_PREFIX = b'"reference":"@'


def _json_or_none(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # not JSON (never from a mapping): the walks decide
        return None


def _alias_refs(text: bytes | None) -> list[re.Match[bytes]] | None:
    """The alias references of a record's JSON text, or None when the text cannot tell them
    exactly (not JSON, an escaped character in an alias, a key that only ends in ``reference``):
    the callers then walk the content, which is slower and always exact."""
    if text is None:
        return None
    found = list(_ALIAS_REF.finditer(text))
    if len(found) != text.count(_ALIAS_PREFIX):
        return None
    for m in found:
        if text[m.start() - 1 : m.start()] not in (b"{", b","):
            return None
    return found


#: A record content's JSON text and its alias references (:func:`_alias_scan`), made once for
#: :func:`_aliases_in` and :func:`_resolve_aliases` both.
_Scan = tuple[bytes | None, list[re.Match[bytes]] | None]


def _alias_scan(value: Any) -> _Scan:
    text = _json_or_none(value)
    return text, _alias_refs(text)


def _aliases_in(value: Any, scan: _Scan | None = None) -> set[str]:
    """The aliases (``@name``) the ``reference`` elements anywhere in ``value`` name, read from its
    JSON text (one C-level dump and a search: about a seventh of a walk's time)."""
    _text, found = scan or _alias_scan(value)
    if found is None:
        return _walk_aliases(value)
    return {m.group(1).decode() for m in found}


def _walk_aliases(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            found.add(ref[1:])
        for v in value.values():
            found |= _walk_aliases(v)
    elif isinstance(value, list):
        for v in value:
            found |= _walk_aliases(v)
    return found


def _resolve_aliases(value: Any, resolved: dict[str, str], scan: _Scan | None = None) -> Any:
    """``value`` (a new copy) with each ``@alias`` reference replaced by the reference of the record
    written for it; a reference to an alias whose record was not written (``create: false``) is
    dropped with the element that holds it. When every alias resolves (the usual case), the
    references are replaced in the JSON text and the copy is parsed from it: about a third of a
    walk's time. ``scan``: :func:`_alias_scan` of ``value``, when made already."""
    text, found = scan or _alias_scan(value)
    if text is None or found is None:
        return _walk_resolve(value, resolved)
    targets: dict[bytes, bytes] = {}
    for m in found:
        target = resolved.get(m.group(1).decode(), "")
        if not target:
            return _walk_resolve(value, resolved)
        targets[m.group(1)] = b'"reference":' + orjson.dumps(target)
    if not targets:
        return orjson.loads(text)
    return orjson.loads(_ALIAS_REF.sub(lambda m: targets[m.group(1)], text))


def _walk_resolve(value: Any, resolved: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _walk_resolve(v, resolved) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            target = resolved.get(ref[1:], "")
            if not target:
                return None  # the referenced record was not written (create: false): drop the reference
            out["reference"] = target
        return out
    if isinstance(value, list):
        return [v for v in (_walk_resolve(v, resolved) for v in value) if v is not None]
    return value


# The statements and rendering of the write path, shared with hms_ach.store.bulk (which writes the
# same rows for many versions at once).
render = _render
record_statements = _statements
index_statements = _index_statements
HISTORY_TABLE = _HISTORY
