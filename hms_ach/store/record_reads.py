"""Reads of the records as they are now, for the code that works beside the FHIR API: the claim
builder, the 837 sink, the fhir_push sink and the credential scan.

Each function takes a connection: the writer's transaction (:data:`hms_ach.store.port.Tx`) when
the read is part of a write, or one from :attr:`hms_ach.store.db.Store.reader` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, select

from hms_ach.store import fastexec
from hms_ach.store.models import RECORD_TABLES, SearchReference
from hms_ach.store.port import Tx

REFERENCES = SearchReference.__table__  # type: ignore[attr-defined]

#: The ids whose reference parameter points at a target, built once: the claim builder runs it in
#: the writer's transaction of every discharge (figure B), where building the statement cost more
#: than running it.
_REFERRING = (
    select(REFERENCES.c.resource_id)
    .distinct()
    .where(
        and_(
            REFERENCES.c.resource_type == bindparam("rt"),
            REFERENCES.c.param == bindparam("prm"),
            REFERENCES.c.target_type == bindparam("tt"),
            REFERENCES.c.target_id == bindparam("tid"),
        )
    )
)


@dataclass(frozen=True)
class StoredRecord:
    """A record's current row: its business key, whether it is deleted, its version and content."""

    resource_type: str
    id: str
    key_system: str | None
    key_value: str | None
    deleted: bool
    version_id: int  # 0: a placeholder made for a reference, never written
    content: dict[str, Any]


def stored(tx: Tx, reference: str | None) -> StoredRecord | None:
    """The current row of ``Type/id`` (deleted or not); None for no such row or an unknown type."""
    if not reference or "/" not in reference:
        return None
    rtype, _, rid = reference.partition("/")
    model = RECORD_TABLES.get(rtype)
    if model is None or not rid:
        return None
    t = model.__table__  # type: ignore[attr-defined]
    row = tx.execute(
        select(t.c.key_system, t.c.key_value, t.c.deleted, t.c.resource, t.c.version_id).where(t.c.id == rid)
    ).first()
    if row is None:
        return None
    return StoredRecord(
        rtype,
        rid,
        row.key_system,
        row.key_value,
        bool(row.deleted),
        int(row.version_id),
        orjson.loads(row.resource),
    )


def referring(tx: Tx, resource_type: str, param: str, target_type: str, target_id: str) -> list[str]:
    """Ids of the ``resource_type`` records whose reference parameter ``param`` points at the target."""
    values = {"rt": resource_type, "prm": param, "tt": target_type, "tid": target_id}
    return [str(row[0]) for row in fastexec.all_rows(tx, "record_reads.referring", _REFERRING, values)]


def current(tx: Tx, resource_type: str, ids: list[str]) -> list[dict[str, Any]]:
    """The content of those of ``ids`` that exist and are not deleted."""
    if not ids:
        return []
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    rows = tx.execute(select(table.c.resource).where(and_(table.c.id.in_(ids), table.c.deleted.is_(False))))
    return [orjson.loads(r.resource) for r in rows]


def every_current(tx: Tx, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, content) of every ``resource_type`` record that is not deleted."""
    t = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    rows = tx.execute(select(t.c.id, t.c.resource).where(t.c.deleted.is_(False))).all()
    for row in rows:
        yield str(row.id), orjson.loads(row.resource)
