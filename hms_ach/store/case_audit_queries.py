"""The reads behind a review case's audit log and the review analytics (hms_ach/cases/audit_log.py,
hms_ach/cases/analytics.py): the stored versions of a record, the records that refer to a case,
the change entries and access records of a set of records, and the Task version histories.

Nothing here writes. Each function takes a connection (the reader pool's, through
:func:`hms_ach.store.workforce_queries.read`). The integrity of the trails is checked by
:func:`hms_ach.store.console_queries.verify_trails`, the same walk as ``hms-ach audit verify``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, or_, select
from sqlalchemy.sql.elements import ColumnElement

from hms_ach.core.records import RECORD_TYPES
from hms_ach.store.models import (
    RECORD_TABLES,
    AccessRecord,
    AuditEntry,
    ResourceHistory,
    SearchReference,
    SearchToken,
)

H = ResourceHistory.__table__  # type: ignore[attr-defined]
A = AuditEntry.__table__  # type: ignore[attr-defined]
R = AccessRecord.__table__  # type: ignore[attr-defined]
REF = SearchReference.__table__  # type: ignore[attr-defined]
TOK = SearchToken.__table__  # type: ignore[attr-defined]

#: The most access records one case's audit log lists (the oldest first); ``truncated`` says more exist.
MAX_ACCESS_RECORDS = 5000
#: The ids asked for in one ``IN (...)`` list.
_CHUNK = 500


@dataclass(frozen=True)
class RecordVersion:
    """One stored version of a record: its content (``meta`` included) as written."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    deleted: bool
    content: dict[str, Any]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _version(row: Any) -> RecordVersion:
    return RecordVersion(
        str(row.resource_type),
        str(row.id),
        int(row.version_id),
        _aware(row.last_updated),
        bool(row.deleted),
        orjson.loads(row.resource) if row.resource else {},
    )


def versions(conn: Connection, resource_type: str, rid: str) -> list[RecordVersion]:
    """Every stored version of ``resource_type/rid``, oldest first."""
    rows = conn.execute(
        select(H).where(and_(H.c.resource_type == resource_type, H.c.id == rid)).order_by(H.c.version_id)
    ).all()
    return [_version(r) for r in rows]


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    batch = sorted(set(ids))
    for i in range(0, len(batch), _CHUNK):
        yield batch[i : i + _CHUNK]


def referrers(conn: Connection, resource_type: str, element: str, target: str) -> list[str]:
    """Ids of the ``resource_type`` records whose ``element`` (a top-level element such as
    ``about`` or ``target``) refers to ``target`` (``Task/1``), current versions.

    Through the search index when the type declares a reference parameter on that element; else
    (a type without one) the records whose JSON names ``target`` are read and checked. An unknown
    type (not stored by this engine) has none."""
    rtype = RECORD_TYPES.get(resource_type)
    model = RECORD_TABLES.get(resource_type)
    if rtype is None or model is None:
        return []
    ttype, _, tid = target.partition("/")
    names = [n for n, decl in rtype.params.items() if decl[0] == "reference" and decl[1].strip() == element]
    if names:
        rows = conn.execute(
            select(REF.c.resource_id)
            .distinct()
            .where(
                and_(
                    REF.c.resource_type == resource_type,
                    REF.c.param.in_(names),
                    REF.c.target_type == ttype,
                    REF.c.target_id == tid,
                )
            )
        ).scalars()
        return sorted(str(r) for r in rows)
    t = model.__table__  # type: ignore[attr-defined]
    needle = f'%"{target.replace("%", "").replace("_", "")}"%'
    found: list[str] = []
    for row in conn.execute(select(t.c.id, t.c.resource).where(t.c.resource.like(needle))):
        value = orjson.loads(row.resource).get(element)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict) and v.get("reference") == target for v in items):
            found.append(str(row.id))
    return sorted(found)


@dataclass(frozen=True)
class ChangeRow:
    """One entry of the change trail (what the audit chain recorded for one record version)."""

    seq: int
    recorded: str
    agent: str
    action: str
    entity_type: str
    entity_id: str
    version_id: int
    actor: str | None


def change_rows(conn: Connection, records: Iterable[tuple[str, str]]) -> list[ChangeRow]:
    """The change entries of ``records`` (``(type, id)`` pairs), in chain order."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in records:
        by_type.setdefault(rtype, []).append(rid)
    out: list[ChangeRow] = []
    cols = (A.c.seq, A.c.recorded, A.c.agent, A.c.action, A.c.entity_type, A.c.entity_id, A.c.version_id)
    for rtype, ids in by_type.items():
        for chunk in _chunks(ids):
            rows = conn.execute(
                select(*cols, A.c.actor).where(and_(A.c.entity_type == rtype, A.c.entity_id.in_(chunk)))
            ).all()
            out.extend(
                ChangeRow(
                    int(r.seq),
                    str(r.recorded),
                    str(r.agent),
                    str(r.action),
                    str(r.entity_type),
                    str(r.entity_id),
                    int(r.version_id),
                    r.actor,
                )
                for r in rows
            )
    return sorted(out, key=lambda c: c.seq)


def access_rows(
    conn: Connection, paths: Iterable[str], references: Iterable[str]
) -> tuple[list[dict[str, Any]], bool]:
    """The access records of a case, oldest first, and whether there were more than
    :data:`MAX_ACCESS_RECORDS`: those whose request path is one of ``paths`` or under it
    (``/api/v1/review/1`` matches ``/api/v1/review/1/audit-log``), or that returned one of
    ``references``."""
    conds: list[ColumnElement[bool]] = []
    for path in paths:
        clean = path.replace("%", "").replace("_", "")
        q = R.c.query
        conds.extend((q == clean, q.like(clean + "/%"), q.like(clean + "?%")))
    for ref in references:
        clean = ref.replace("%", "").replace("_", "")
        e = R.c.entities
        conds.extend((e == clean, e.like(clean + " %"), e.like("% " + clean), e.like("% " + clean + " %")))
    if not conds:
        return [], False
    cols = (R.c.seq, R.c.recorded, R.c.subtype, R.c.resource_type, R.c.outcome, R.c.sub, R.c.query)
    rows = conn.execute(
        select(*cols).where(or_(*conds)).order_by(R.c.seq).limit(MAX_ACCESS_RECORDS + 1)
    ).all()
    return [dict(r._mapping) for r in rows[:MAX_ACCESS_RECORDS]], len(rows) > MAX_ACCESS_RECORDS


def task_histories(
    conn: Connection, case_system: str, case_type: str | None
) -> dict[str, list[RecordVersion]]:
    """Every version of every Task coded in ``case_system`` (of ``case_type`` when given, by the
    Task's current code), grouped by Task id, each oldest first."""
    ids_q = select(TOK.c.resource_id).where(
        and_(TOK.c.resource_type == "Task", TOK.c.param == "code", TOK.c.system == case_system)
    )
    if case_type is not None:
        ids_q = ids_q.where(TOK.c.value == case_type)
    ids = sorted({str(r) for r in conn.execute(ids_q.distinct()).scalars()})
    out: dict[str, list[RecordVersion]] = {}
    for chunk in _chunks(ids):
        rows = conn.execute(
            select(H)
            .where(and_(H.c.resource_type == "Task", H.c.id.in_(chunk)))
            .order_by(H.c.id, H.c.version_id)
        ).all()
        for r in rows:
            out.setdefault(str(r.id), []).append(_version(r))
    return out


def current_records(conn: Connection, resource_type: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The current content of those of ``ids`` that exist and are not deleted."""
    model = RECORD_TABLES.get(resource_type)
    if model is None:
        return {}
    t = model.__table__  # type: ignore[attr-defined]
    out: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        rows = conn.execute(
            select(t.c.id, t.c.resource).where(and_(t.c.id.in_(chunk), t.c.deleted.is_(False)))
        )
        out.update((str(r.id), orjson.loads(r.resource)) for r in rows)
    return out
