"""Reads of stored record versions (the history table), for replay's before/after diff."""

from __future__ import annotations

from sqlalchemy import and_, select

from hms_ach.store.models import ResourceHistory
from hms_ach.store.port import Tx

H = ResourceHistory.__table__  # type: ignore[attr-defined]


def version_body(tx: Tx, resource_type: str, rid: str, version: int) -> str | None:
    """The stored JSON of version ``version`` of ``resource_type/rid``, or None when there is none."""
    body = tx.execute(
        select(H.c.resource).where(
            and_(H.c.resource_type == resource_type, H.c.id == rid, H.c.version_id == version)
        )
    ).scalar()
    return None if body is None else str(body)
