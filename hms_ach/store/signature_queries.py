"""The reads the signatures of review cases need (hms_ach/cases/signatures.py): the records that
refer to a record through one reference parameter (the Provenances whose ``target`` is a case's
findings), and one stored version of a record (the findings version a signature names)."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection, select

from hms_ach.store.models import ResourceHistory
from hms_ach.store.workforce_queries import REFS, live, table

_HISTORY = ResourceHistory.__table__  # type: ignore[attr-defined]


def referring(
    conn: Connection, resource_type: str, param: str, target_type: str, target_id: str
) -> list[dict[str, Any]]:
    """Live records of ``resource_type`` whose reference parameter ``param`` is indexed as
    ``target_type/target_id`` (a versioned reference counts), oldest id first."""
    t = table(resource_type)
    ids = select(REFS.c.resource_id).where(
        REFS.c.resource_type == resource_type,
        REFS.c.param == param,
        REFS.c.target_type == target_type,
        REFS.c.target_id == target_id,
    )
    rows = conn.execute(select(t.c.resource).where(*live(t), t.c.id.in_(ids)).order_by(t.c.id)).all()
    return [orjson.loads(row.resource) for row in rows]


def version_of(conn: Connection, resource_type: str, rid: str, version: int) -> dict[str, Any] | None:
    """Version ``version`` of ``resource_type/rid`` as stored; None when there is none (or it is a
    deletion)."""
    h = _HISTORY
    row = conn.execute(
        select(h.c.resource, h.c.deleted).where(
            h.c.resource_type == resource_type, h.c.id == rid, h.c.version_id == version
        )
    ).first()
    if row is None or row.deleted:
        return None
    loaded: dict[str, Any] = orjson.loads(row.resource)
    return loaded
