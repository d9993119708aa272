"""Reads and writes of canonical records, on one SQLAlchemy connection inside the caller's transaction.

Upserts are race-free: a record with a business key is first inserted with
``ON CONFLICT (key_system, key_value) DO NOTHING``, then read back with ``FOR UPDATE`` (on
PostgreSQL) and merged. The unique constraint, never a check-then-insert, decides who creates it.
A write that changes nothing makes no new version.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.errors import ContentError, Err0357
from hms_ach.map.result import MappingResult, RecordWrite, StoreAction
from hms_ach.store import search_params
from hms_ach.store.changes import Change, notify
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES, ResourceHistory, SearchReference


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


def new_id() -> str:
    return str(uuid.uuid4())


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def merge_content(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``new`` into ``old``: objects merge, lists and scalars replace, ``None`` deletes."""
    out = dict(old)
    for k, v in new.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_content(out[k], v)
        else:
            out[k] = v
    return out


def _strip_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value if v is not None]
    return value


class Repository:
    """Canonical record reads and writes on ``conn`` (the caller owns the transaction)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        dialect = conn.dialect.name
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert
        self._lock = dialect == "postgresql"

    # ------------------------------------------------------------------ reads
    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
        row = self.conn.execute(select(table.c.resource, table.c.deleted).where(table.c.id == resource_id)).first()
        if row is None:
            return None
        return orjson.loads(row.resource)  # type: ignore[no-any-return]

    def find_by_key(self, resource_type: str, system: str | None, value: str) -> tuple[str, dict[str, Any]] | None:
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
        """Write every record of ``result`` (references resolved in dependency order), then its actions."""
        outcomes: list[WriteOutcome] = []
        resolved: dict[str, str] = {}
        pending = list(result.records)
        while pending:
            progressed = False
            for rec in list(pending):
                if _aliases_in(rec.content) - set(resolved):
                    continue
                pending.remove(rec)
                progressed = True
                content = _resolve_aliases(rec.content, resolved)
                outcome = self.upsert(rec, content, message_id)
                if outcome is not None:
                    resolved[rec.alias] = outcome.reference
                    outcomes.append(outcome)
                else:
                    resolved[rec.alias] = ""
            if not progressed:
                missing = sorted(set().union(*(_aliases_in(r.content) for r in pending)) - set(resolved))
                raise ContentError(
                    f"records {[r.alias for r in pending]} refer to {missing}, which no rule of this mapping produces",
                    code=Err0357.INTERNAL_ERROR,
                )
        for action in result.actions:
            outcomes.extend(self.run_action(action, resolved, message_id))
        return outcomes

    def upsert(self, rec: RecordWrite, content: dict[str, Any], message_id: int | None) -> WriteOutcome | None:
        table = RECORD_TABLES[rec.resource_type].__table__  # type: ignore[attr-defined]
        created = False
        if rec.key_value:
            if rec.create:
                stmt = self._insert(table).values(
                    id=new_id(), key_system=rec.key_system, key_value=rec.key_value, version_id=0,
                    last_updated=datetime.now(UTC), deleted=False, resource="{}",
                ).on_conflict_do_nothing(index_elements=["key_system", "key_value"])
                created = self.conn.execute(stmt).rowcount == 1
            query = select(table.c.id, table.c.version_id, table.c.resource).where(
                and_(table.c.key_system == rec.key_system, table.c.key_value == rec.key_value)
            )
            if self._lock:
                query = query.with_for_update()
            row = self.conn.execute(query).first()
            if row is None:  # create: false and no such record
                return None
            rid, version, old = row.id, row.version_id, _strip_meta(orjson.loads(row.resource))
            if version == 0:
                created = True
        else:
            rid, version, old, created = new_id(), 0, {}, True
            self.conn.execute(
                insert(table).values(id=rid, key_system=None, key_value=None, version_id=0,
                                     last_updated=datetime.now(UTC), deleted=False, resource="{}")
            )
        if rec.mode == "replace":
            merged = _drop_nones(merge_content({}, content))
        elif rec.mode == "fill":
            merged = _drop_nones(merge_content(content, old))  # what is stored wins
        else:
            merged = _drop_nones(merge_content(old, content))
        merged["resourceType"] = rec.resource_type
        if not created and merged == old:
            return WriteOutcome(rec.resource_type, rid, version, created=False, changed=False)
        return self._store_version(rec.resource_type, rid, version + 1, merged, message_id, created,
                                   before=None if created else old)

    def _store_version(
        self, resource_type: str, rid: str, version: int, content: dict[str, Any],
        message_id: int | None, created: bool, deleted: bool = False, before: dict[str, Any] | None = None,
    ) -> WriteOutcome:
        table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
        if before is None and not created:
            before = self.get(resource_type, rid)
        now = datetime.now(UTC)
        body = {"resourceType": resource_type, "id": rid,
                "meta": {"versionId": str(version), "lastUpdated": now.isoformat().replace("+00:00", "Z")}}
        body.update({k: v for k, v in content.items() if k not in ("resourceType", "id", "meta")})
        text = dumps(body)
        self.conn.execute(
            update(table).where(table.c.id == rid).values(
                version_id=version, last_updated=now, resource=text, deleted=deleted)
        )
        self.conn.execute(
            insert(ResourceHistory.__table__).values(  # type: ignore[attr-defined]
                resource_type=resource_type, id=rid, version_id=version, last_updated=now,
                deleted=deleted, message_id=message_id, resource=text,
            )
        )
        self.reindex(resource_type, rid, None if deleted else body)
        action = "delete" if deleted else "create" if created else "update"
        notify(self.conn, Change(resource_type, rid, version, action, None if created else before,
                                 None if deleted else body, message_id))
        return WriteOutcome(resource_type, rid, version, created=created, changed=True)

    def reindex(self, resource_type: str, rid: str, resource: dict[str, Any] | None) -> None:
        """Replace the search-index rows of one record (none when it is deleted)."""
        for kind, model in INDEX_TABLES.items():
            t = model.__table__  # type: ignore[attr-defined]
            self.conn.execute(delete(t).where(and_(t.c.resource_type == resource_type, t.c.resource_id == rid)))
            if resource is None:
                continue
            rows = search_params.index_rows(resource_type, resource).get(kind, [])
            if rows:
                self.conn.execute(
                    insert(t), [{**r, "resource_type": resource_type, "resource_id": rid} for r in rows]
                )

    # ------------------------------------------------------------------ actions
    def run_action(self, action: StoreAction, resolved: dict[str, str], message_id: int | None) -> list[WriteOutcome]:
        handler = ACTIONS.get(action.name)
        if handler is None:
            raise ContentError(f"unknown store action {action.name!r}; known: {sorted(ACTIONS)}")
        return handler(self, action.args, resolved, message_id)

    def _merge_patient(self, args: dict[str, Any], resolved: dict[str, str], message_id: int | None) -> list[WriteOutcome]:
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
        outcomes.append(self._store_version("Patient", src_id, self._version("Patient", src_id) + 1,
                                            src_content, message_id, created=False))
        dst_content = _strip_meta(self.get("Patient", dst_id) or {})
        dlinks = [lk for lk in dst_content.get("link", []) if lk.get("other", {}).get("reference") != src_ref]
        dst_content["link"] = dlinks + [{"other": {"reference": src_ref}, "type": "replaces"}]
        outcomes.append(self._store_version("Patient", dst_id, self._version("Patient", dst_id) + 1,
                                            dst_content, message_id, created=False))
        ref = SearchReference.__table__  # type: ignore[attr-defined]
        enc_ids = self.conn.execute(
            select(ref.c.resource_id).distinct().where(and_(
                ref.c.resource_type == "Encounter", ref.c.param == "subject",
                ref.c.target_type == "Patient", ref.c.target_id == src_id))
        ).scalars().all()
        for eid in enc_ids:
            enc = _strip_meta(self.get("Encounter", eid) or {})
            enc["subject"] = {"reference": dst_ref}
            outcomes.append(self._store_version("Encounter", eid, self._version("Encounter", eid) + 1,
                                                enc, message_id, created=False))
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


def _aliases_in(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            found.add(ref[1:])
        for v in value.values():
            found |= _aliases_in(v)
    elif isinstance(value, list):
        for v in value:
            found |= _aliases_in(v)
    return found


def _resolve_aliases(value: Any, resolved: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _resolve_aliases(v, resolved) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            target = resolved.get(ref[1:], "")
            if not target:
                return None  # the referenced record was not written (create: false): drop the reference
            out["reference"] = target
        return out
    if isinstance(value, list):
        return [v for v in (_resolve_aliases(v, resolved) for v in value) if v is not None]
    return value
