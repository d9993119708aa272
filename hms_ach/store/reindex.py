"""Rebuild the search index from the current search-parameter declarations (``hms-ach reindex``).

The write path indexes a record when it changes, with the parameters declared at that time in
:data:`hms_ach.core.records.RECORD_TYPES`. A parameter added (or changed) later finds nothing among
the records stored before it; and the write path rewrites only the kinds of index rows whose rows
differ between the old and the new version, computed with today's declarations. Reindexing after a
declaration change makes the index match the declarations again.

For each record type, the current versions are read in batches in id order. Each batch is one job
of the group-commit writer (:class:`hms_ach.store.writer.StoreWriter`), so one transaction: every
index row of the batch's records is deleted and rebuilt with
:func:`hms_ach.store.search_params.index_rows`. A deleted record (and a placeholder claimed by a
FHIR conditional create, version 0) keeps no index row. On PostgreSQL the batch's records are
locked (``FOR UPDATE``) so a concurrent write of one of them waits for the batch, never
interleaves with it. Records, versions and history are not touched, and no change listener runs.

:func:`invalid_versions` (``hms-ach reindex --validate``) reads instead: every stored version of
every FHIR record type, in keyset order, checked against R4 with
:func:`hms_ach.mapping.fhir_instance.problems`. It finds what was stored before the write-time and
load-time checks existed (``Location.address`` as an array), so it can be repaired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Table, delete, func, select

from hms_ach.core.errors import HmsAchError
from hms_ach.core.records import RECORD_TYPES
from hms_ach.mapping.fhir_instance import problems
from hms_ach.store import fastexec, search_params
from hms_ach.store.db import Store
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES, ResourceHistory
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter

#: Records read and reindexed per transaction.
DEFAULT_BATCH_SIZE = 500


class UnknownRecordTypeError(HmsAchError, ValueError):
    """A record type to reindex that RECORD_TYPES does not declare."""


@dataclass
class ReindexCount:
    """What reindexing one record type did."""

    resource_type: str
    records: int = 0
    """Current versions whose index rows were rebuilt."""
    cleared: int = 0
    """Deleted records (and placeholders), left without index rows."""
    rows: int = 0
    """Index rows written."""
    batches: int = 0
    """Transactions committed."""


@dataclass(frozen=True)
class ReindexBatch:
    """What one batch did; ``last_id`` is the id to continue after (None: the type is done)."""

    records: int
    cleared: int
    rows: int
    last_id: str | None


def _table(resource_type: str) -> Table:
    table: Table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    return table


def _index_table(kind: str) -> Table:
    table: Table = INDEX_TABLES[kind].__table__  # type: ignore[attr-defined]
    return table


def reindex_batch(tx: Tx, resource_type: str, after: str, limit: int) -> ReindexBatch:
    """Rebuild the index rows of the (at most ``limit``) records of ``resource_type`` whose id
    sorts after ``after`` (``""``: from the first), in the caller's transaction ``tx``."""
    t = _table(resource_type)
    stmt = select(t.c.id, t.c.version_id, t.c.deleted, t.c.resource).where(t.c.id > after)
    stmt = stmt.order_by(t.c.id).limit(limit)
    if tx.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    found = tx.execute(stmt).all()
    if not found:
        return ReindexBatch(0, 0, 0, None)
    ids = [row.id for row in found]
    for kind in INDEX_TABLES:
        index = _index_table(kind)
        tx.execute(delete(index).where(index.c.resource_type == resource_type, index.c.resource_id.in_(ids)))
    new_rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in INDEX_TABLES}
    records = cleared = 0
    for row in found:
        if row.deleted or row.version_id == 0:
            cleared += 1
            continue
        records += 1
        body = orjson.loads(row.resource)
        for kind, rows in search_params.index_rows(resource_type, body).items():
            new_rows[kind].extend({"resource_type": resource_type, "resource_id": row.id, **r} for r in rows)
    written = 0
    for kind, rows in new_rows.items():
        fastexec.insert_rows(tx, _index_table(kind), rows)
        written += len(rows)
    return ReindexBatch(records, cleared, written, ids[-1] if len(found) == limit else None)


def record_total(store: Store, resource_types: Sequence[str] | None = None) -> int:
    """How many stored records (deleted ones included) :func:`reindex` of ``resource_types`` reads."""
    types = [t for t in (resource_types or RECORD_TYPES) if t in RECORD_TYPES]
    with store.reader.connect() as conn:
        return sum(int(conn.execute(select(func.count()).select_from(_table(t))).scalar_one()) for t in types)


def version_total(store: Store, resource_types: Sequence[str] | None = None) -> int:
    """How many stored versions (deleted ones excepted) :func:`invalid_versions` of ``resource_types`` reads."""
    h: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    types = _check_types(resource_types)
    stmt = select(func.count()).select_from(h).where(h.c.resource_type.in_(types), h.c.deleted.is_(False))
    with store.reader.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def reindex(
    store: Store,
    resource_types: Sequence[str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    writer: StoreWriter | None = None,
    progress: Callable[[ReindexCount], None] | None = None,
    batch_done: Callable[[int], None] | None = None,
) -> list[ReindexCount]:
    """Rebuild the search index of ``resource_types`` (default: every type of RECORD_TYPES).

        Each batch of ``batch_size`` records is one job of ``writer`` (default: a writer of its own on
        ``store``, stopped at the end). Call it from a thread that is not an event loop. ``progress`` is
        called with each type's count when that type is done, ``batch_done`` with the number of records
    a batch read (for a progress bar; :func:`record_total` is the whole). Raises :class:`UnknownRecordTypeError`
        before writing anything when a type is not declared.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
    types = list(resource_types) if resource_types else list(RECORD_TYPES)
    unknown = [t for t in types if t not in RECORD_TYPES]
    if unknown:
        raise UnknownRecordTypeError(
            f"cannot reindex {', '.join(unknown)}: not a record type; expected one of {', '.join(RECORD_TYPES)}"
        )
    own = writer is None
    run = writer if writer is not None else StoreWriter(store)
    counts: list[ReindexCount] = []
    try:
        for rtype in types:
            count = ReindexCount(rtype)
            after = ""
            while True:
                done = run.run_sync(
                    partial(reindex_batch, resource_type=rtype, after=after, limit=batch_size)
                )
                count.records += done.records
                count.cleared += done.cleared
                count.rows += done.rows
                count.batches += 1
                if batch_done is not None:
                    batch_done(done.records + done.cleared)
                if done.last_id is None:
                    break
                after = done.last_id
            counts.append(count)
            if progress is not None:
                progress(count)
    finally:
        if own:
            run.stop()
    return counts


@dataclass(frozen=True)
class InvalidVersion:
    """A stored version that is not valid R4: the first problem found, and how many there are."""

    resource_type: str
    id: str
    version_id: int
    expression: str
    message: str
    problems: int

    def render(self) -> str:
        more = f" (and {self.problems - 1} more)" if self.problems > 1 else ""
        return f"{self.resource_type}/{self.id}/_history/{self.version_id}  {self.expression}: {self.message}{more}"


def _check_types(resource_types: Sequence[str] | None) -> list[str]:
    types = list(resource_types) if resource_types else list(RECORD_TYPES)
    unknown = [t for t in types if t not in RECORD_TYPES]
    if unknown:
        raise UnknownRecordTypeError(
            f"cannot validate {', '.join(unknown)}: not a record type; expected one of {', '.join(RECORD_TYPES)}"
        )
    return [t for t in types if RECORD_TYPES[t].fhir]  # Shift, Timecard... are not R4 resources


def invalid_versions(
    store: Store,
    resource_types: Sequence[str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checked: Callable[[str, int], None] | None = None,
    batch_done: Callable[[int], None] | None = None,
) -> Iterator[InvalidVersion]:
    """Every stored version (history, deleted ones excepted) of the FHIR record types that fails R4,
    read in batches of ``batch_size`` in (id, version) order; ``checked(type, n)`` is called with the
    number of versions checked of each type when that type is done, ``batch_done(n)`` after each batch
    of ``n`` versions (:func:`version_total` is the whole). Read-only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
    h: Table = ResourceHistory.__table__  # type: ignore[attr-defined]
    for rtype in _check_types(resource_types):
        after: tuple[str, int] = ("", -1)
        total = 0
        while True:
            stmt = (
                select(h.c.id, h.c.version_id, h.c.resource)
                .where(h.c.resource_type == rtype, h.c.deleted.is_(False))
                .where((h.c.id > after[0]) | ((h.c.id == after[0]) & (h.c.version_id > after[1])))
                .order_by(h.c.id, h.c.version_id)
                .limit(batch_size)
            )
            with store.reader.connect() as conn:
                rows = conn.execute(stmt).all()
            if batch_done is not None and rows:
                batch_done(len(rows))
            for row in rows:
                total += 1
                try:
                    body = orjson.loads(row.resource)
                except orjson.JSONDecodeError:
                    yield InvalidVersion(rtype, row.id, int(row.version_id), rtype, "not JSON", 1)
                    continue
                found = problems(body)
                if found:
                    first = found[0]
                    yield InvalidVersion(
                        rtype, row.id, int(row.version_id), first.expression, first.message, len(found)
                    )
            if len(rows) < batch_size:
                break
            after = (rows[-1].id, int(rows[-1].version_id))
        if checked is not None:
            checked(rtype, total)
