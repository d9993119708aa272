"""Reads of stored record versions (the history table): one version for replay's before/after diff,
and the pages of the type-level and system-level FHIR history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, literal, select, tuple_
from sqlalchemy.sql.elements import ColumnElement

from hms_ach.store.db import Store
from hms_ach.store.models import ResourceHistory
from hms_ach.store.port import Tx
from hms_ach.store.resources import StoredVersion, reading

H = ResourceHistory.__table__  # type: ignore[attr-defined]


def version_body(tx: Tx, resource_type: str, rid: str, version: int) -> str | None:
    """The stored JSON of version ``version`` of ``resource_type/rid``, or None when there is none."""
    body = tx.execute(
        select(H.c.resource).where(
            and_(H.c.resource_type == resource_type, H.c.id == rid, H.c.version_id == version)
        )
    ).scalar()
    return None if body is None else str(body)


# ---------------------------------------------------------------------------- type and system history
@dataclass(frozen=True)
class HistoryQuery:
    """Which versions a history asks for: of ``types`` (None: every type), of one record ``rid``,
    changed at or after ``since``, current at ``at``; ``count`` per page after the ``after`` key."""

    types: tuple[str, ...] | None = None
    rid: str | None = None
    since: datetime | None = None
    at: datetime | None = None
    count: int = 20
    after: tuple[datetime, str, str, int] | None = None


def history(tx: Tx, q: HistoryQuery) -> tuple[list[StoredVersion], tuple[datetime, str, str, int] | None]:
    """One page of versions, newest first (by last update, then type, id and version, so that a page
    boundary is exact), and the key to pass as ``after`` for the next page (None: no more).

    ``at``: only the versions that were current at that instant (the newest version of each record
    written at or before it). The history table has no index on the update time, so a type or system
    history reads the versions of the types asked for; ``since`` and ``_count`` bound what is served.
    """
    h = H
    conds: list[ColumnElement[bool]] = []
    if q.types is not None:
        conds.append(h.c.resource_type.in_(list(q.types)))
    if q.rid is not None:
        conds.append(h.c.id == q.rid)
    if q.since is not None:
        conds.append(h.c.last_updated >= q.since)
    if q.at is not None:
        later = H.alias("later")
        conds.append(h.c.last_updated <= q.at)
        conds.append(
            ~exists(
                select(literal(1)).where(
                    later.c.resource_type == h.c.resource_type,
                    later.c.id == h.c.id,
                    later.c.version_id > h.c.version_id,
                    later.c.last_updated <= q.at,
                )
            )
        )
    keys = (h.c.last_updated, h.c.resource_type, h.c.id, h.c.version_id)
    if q.after is not None:
        conds.append(tuple_(*keys) < tuple_(*[literal(v) for v in q.after]))
    stmt = (
        select(*keys, h.c.deleted, h.c.resource)
        .where(*conds)
        .order_by(*[k.desc() for k in keys])
        .limit(q.count + 1)
    )
    rows = tx.execute(stmt).all()
    page = [
        StoredVersion(
            r.resource_type, r.id, int(r.version_id), r.last_updated, bool(r.deleted), str(r.resource)
        )
        for r in rows[: q.count]
    ]
    more = len(rows) > q.count and page
    nxt = (page[-1].last_updated, page[-1].resource_type, page[-1].id, page[-1].version) if more else None
    return page, nxt


def read_history(
    store: Store, q: HistoryQuery
) -> tuple[list[StoredVersion], tuple[datetime, str, str, int] | None]:
    """:func:`history` in one short read transaction on the reader pool."""
    with reading(store) as conn:
        return history(conn, q)
