"""Keyset reads for ``$everything`` and Bulk ``$export``, and the export-state rows.

A :class:`Slice` is the set of current, not deleted records of one type that an operation serves:
optionally those changed since an instant, those with given ids, those whose reference parameters
point at given targets, and those inside one patient's compartment (a ``patient/`` grant). Its
records are read in id order, one page at a time, starting strictly after the last id served, so a
reader never holds more than a page and a resumed reader neither skips nor repeats a record whose id
it has passed. Every value is a bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, delete, false, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES, BulkExport
from hms_ach.store.port import Tx
from hms_ach.store.search_sql import compartment_clause

EXPORTS = BulkExport.__table__  # type: ignore[attr-defined]
REFERENCES = INDEX_TABLES["reference"].__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Pointing:
    """Records whose reference parameters ``params`` point at a record of ``target_type``: the ones
    in ``target_ids``, or any when it is None."""

    params: tuple[str, ...]
    target_type: str
    target_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Slice:
    """The records of ``resource_type`` an operation serves (see the module text). ``ids`` and
    ``pointing`` are alternatives (a record matching either belongs); both None: every record."""

    resource_type: str
    since: datetime | None = None
    ids: tuple[str, ...] | None = None
    pointing: tuple[Pointing, ...] | None = None
    patient: str | None = None
    """The patient whose compartment limits what the caller may see of this type, or None."""


def _table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def _pointing_clause(t: Table, rtype: str, p: Pointing) -> ColumnElement[bool]:
    conds = [
        REFERENCES.c.resource_type == rtype,
        REFERENCES.c.param.in_(p.params),
        REFERENCES.c.target_type == p.target_type,
    ]
    if p.target_ids is not None:
        conds.append(REFERENCES.c.target_id.in_(p.target_ids))
    return t.c.id.in_(select(REFERENCES.c.resource_id).where(*conds))


def _conditions(t: Table, s: Slice) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [t.c.deleted.is_(False)]
    if s.since is not None:
        conds.append(t.c.last_updated >= s.since)
    members: list[ColumnElement[bool]] = []
    if s.ids is not None:
        members.append(t.c.id.in_(s.ids) if s.ids else false())
    for p in s.pointing or ():
        members.append(_pointing_clause(t, s.resource_type, p))
    if s.ids is not None or s.pointing is not None:
        conds.append(or_(false(), *members))
    if s.patient is not None:
        conds.append(compartment_clause(t, s.resource_type, s.patient))
    return conds


def page(conn: Tx, s: Slice, after: str | None, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (id, stored JSON) of ``s``, in id order, after the id ``after``."""
    t = _table(s.resource_type)
    conds = _conditions(t, s)
    if after is not None:
        conds.append(t.c.id > after)
    rows = conn.execute(select(t.c.id, t.c.resource).where(and_(*conds)).order_by(t.c.id).limit(limit))
    return [(str(r.id), str(r.resource)) for r in rows]


def references_of(conn: Tx, resource_type: str, rid: str) -> list[tuple[str, str]]:
    """(target type, target id) of every reference the search index holds for one record."""
    rows = conn.execute(
        select(REFERENCES.c.target_type, REFERENCES.c.target_id)
        .distinct()
        .where(REFERENCES.c.resource_type == resource_type, REFERENCES.c.resource_id == rid)
        .order_by(REFERENCES.c.target_type, REFERENCES.c.target_id)
    )
    return [(str(r.target_type), str(r.target_id)) for r in rows]


# ---------------------------------------------------------------------------- export-state rows
def insert_export(tx: Tx, row: dict[str, Any]) -> None:
    tx.execute(EXPORTS.insert().values(**row))


def export_row(conn: Tx, export_id: str) -> dict[str, Any] | None:
    found = conn.execute(select(EXPORTS).where(EXPORTS.c.id == export_id)).mappings().first()
    return dict(found) if found is not None else None


def claimable(conn: Tx, now: datetime) -> list[str]:
    """Ids of the exports waiting for a worker: accepted, or running with no live lease (the engine
    that ran it stopped or died), oldest first."""
    rows = conn.execute(
        select(EXPORTS.c.id)
        .where(
            or_(
                EXPORTS.c.status == "accepted",
                and_(
                    EXPORTS.c.status == "running",
                    or_(EXPORTS.c.lease_until.is_(None), EXPORTS.c.lease_until < now),
                ),
            )
        )
        .order_by(EXPORTS.c.created_at, EXPORTS.c.id)
    )
    return [str(r.id) for r in rows]


def claim(tx: Tx, export_id: str, now: datetime, until: datetime) -> bool:
    """Take the lease of a claimable export (compare-and-set: two workers never both win)."""
    result = tx.execute(
        update(EXPORTS)
        .where(
            EXPORTS.c.id == export_id,
            or_(
                EXPORTS.c.status == "accepted",
                and_(
                    EXPORTS.c.status == "running",
                    or_(EXPORTS.c.lease_until.is_(None), EXPORTS.c.lease_until < now),
                ),
            ),
        )
        .values(status="running", lease_until=until)
    )
    return bool(result.rowcount)


def save_progress(tx: Tx, export_id: str, progress: str, until: datetime | None) -> bool:
    """Record the progress of a running export and renew (or, ``until`` None, release) its lease;
    False when the export is no longer running here (cancelled: its row is gone)."""
    result = tx.execute(
        update(EXPORTS)
        .where(EXPORTS.c.id == export_id, EXPORTS.c.status == "running")
        .values(progress=progress, lease_until=until)
    )
    return bool(result.rowcount)


def finish(tx: Tx, export_id: str, status: str, progress: str, when: datetime, error: str | None) -> bool:
    result = tx.execute(
        update(EXPORTS)
        .where(EXPORTS.c.id == export_id, EXPORTS.c.status == "running")
        .values(status=status, progress=progress, finished_at=when, lease_until=None, error=error)
    )
    return bool(result.rowcount)


def delete_export(tx: Tx, export_id: str) -> bool:
    return bool(tx.execute(delete(EXPORTS).where(EXPORTS.c.id == export_id)).rowcount)


def expired(conn: Tx, before: datetime) -> list[tuple[str, str]]:
    """(id, directory) of the exports created before ``before`` (past their retention)."""
    rows = conn.execute(select(EXPORTS.c.id, EXPORTS.c.directory).where(EXPORTS.c.created_at < before))
    return [(str(r.id), str(r.directory)) for r in rows]
