"""Store-side reads of the /api/v1 workforce API, bounded by the search index.

Shifts and timecards are found through their index rows (declared in
:mod:`hms_ach.store.search_params`) rather than by reading every record:

* ``search_reference`` (param ``practitioner``): the records of ONE practitioner;
* ``search_date`` (Shift ``date`` = start, Shift ``end``, Timecard ``date`` = clockIn): a time window;
* ``search_token`` (Shift ``status``).

Every function returns the stored resources it selected, a superset of the answer: the callers
check the exact rule in Python on what was read (the index narrows, it does not decide). A record
whose ``practitioner`` is no indexable ``Practitioner/<id>`` reference has no reference row:
:func:`owned_by` with such a reference (or none) selects the records without a practitioner row
instead. A time that is no FHIR dateTime has no date row, so such a record is not found by a time
window (the rules could not have compared it either).

Shift ``end`` rows exist for shifts written since the parameter was declared, or reindexed since
(``hms-ach reindex --type Shift``): a shift without one is always a candidate of
:func:`overlap_candidates`, so a store not reindexed stays correct and only reads a little more.

Besides the record reads, the workforce API reaches the store only through this module:
:func:`read` (a reader connection), :func:`~hms_ach.store.savepoint.savepoint` (inside a writer job),
:class:`StoredRoster` (the lookups of :class:`hms_ach.workforce.rules.Roster`), and the credential
scan's alerts and last run (:func:`credential_alerts`, :func:`job_run`), and the compliance report's
reads of the outbox events (:func:`offboardings`) and of the refused writes (:func:`rule_violations`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, Select, Table, and_, bindparam, exists, literal, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from hms_ach.store.db import Store
from hms_ach.store.models import (
    RECORD_TABLES,
    CredentialAlert,
    InboundMessage,
    JobRun,
    OutboxEvent,
    SearchDate,
    SearchReference,
    SearchToken,
)
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint
from hms_ach.store.search_params import clip, parse_reference
from hms_ach.store.search_sql import own_rows

REFS: Table = SearchReference.__table__  # type: ignore[attr-defined]
DATES: Table = SearchDate.__table__  # type: ignore[attr-defined]
TOKENS: Table = SearchToken.__table__  # type: ignore[attr-defined]
CREDENTIAL_ALERTS: Table = CredentialAlert.__table__  # type: ignore[attr-defined]
JOB_RUNS: Table = JobRun.__table__  # type: ignore[attr-defined]
MESSAGES: Table = InboundMessage.__table__  # type: ignore[attr-defined]
EVENTS: Table = OutboxEvent.__table__  # type: ignore[attr-defined]
#: A workforce rule's code as every write path stores it in a refused write's error: ``[shift.too_long]``.
RULE_CODE = re.compile(r"\[((?:shift|swap|timecard)\.[a-z][a-z0-9_]*)\]")
OFFBOARDED_EVENT = "practitioner.offboarded"
T = TypeVar("T")
PRACTITIONER_PARAM = "practitioner"
#: The date parameter of each record type that the workforce API filters on (shift start, clock-in).
START_PARAM = "date"
SHIFT_END_PARAM = "end"
#: Rows read per statement when a page is filled by a scan that Python filters further.
SCAN_CHUNK = 500


def table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def live(t: Table) -> list[ColumnElement[bool]]:
    """A record that is neither deleted nor a placeholder (version 0 of a conditional create)."""
    return [t.c.deleted.is_(False), t.c.version_id > 0]


def utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


# ---------------------------------------------------------------------------- connections
def read(store: Store, work: Callable[[Tx], T]) -> T:
    """``work`` on a connection of the store's reader pool: one read that is no part of a write
    (lazy results such as :func:`scan` must be consumed inside ``work``)."""
    with store.read() as conn:
        return work(conn)


# ---------------------------------------------------------------------------- record reads
@cache
def _by_id(resource_type: str) -> Select[Any]:
    """The statement of :func:`get_record`, built once per type (bound: ``rid``)."""
    t = table(resource_type)
    return select(t.c.resource).where(t.c.id == bindparam("rid"), *live(t))


def get_record(conn: Connection, resource_type: str, rid: str) -> dict[str, Any] | None:
    """One live record by id (primary key)."""
    row = conn.execute(_by_id(resource_type), {"rid": rid}).scalar()
    return orjson.loads(row) if row else None


def all_records(conn: Connection, resource_type: str) -> list[dict[str, Any]]:
    """Every live record of a type, by id: for the reports over everyone (compliance status)."""
    t = table(resource_type)
    rows = conn.execute(select(t.c.resource).where(*live(t)).order_by(t.c.id)).scalars()
    return [orjson.loads(r) for r in rows]


def scan(
    conn: Connection,
    resource_type: str,
    conds: Iterable[ColumnElement[bool]] = (),
    after: str = "",
    first: int = SCAN_CHUNK,
) -> Iterator[dict[str, Any]]:
    """Live records meeting ``conds`` with id > ``after``, in id order, read ``first`` rows at a time
    at first and :data:`SCAN_CHUNK` after that; the caller stops iterating when its page is full."""
    t = table(resource_type)
    conds = list(conds)
    size = max(1, first)
    while True:
        stmt = (
            select(t.c.id, t.c.resource).where(*live(t), *conds, t.c.id > after).order_by(t.c.id).limit(size)
        )
        rows = conn.execute(stmt).all()
        for row in rows:
            yield orjson.loads(row.resource)
        if len(rows) < size:
            return
        after, size = rows[-1].id, SCAN_CHUNK


# ---------------------------------------------------------------------------- index conditions
def practitioner_id(reference: str | None) -> str | None:
    """The id that a ``practitioner`` reference is indexed under, or None when it has no index row."""
    if not reference:
        return None
    rtype, rid = parse_reference(reference)
    if rtype != "Practitioner" or not rid or len(rid) > 64:
        return None
    return rid


def owned_by(resource_type: str, reference: str | None, dialect: str) -> ColumnElement[bool]:
    """Records of ``resource_type`` whose practitioner is indexed as ``reference``; for a reference
    that has no index row (or None): the records without any practitioner row.

    "Without": on SQLite a ``NOT IN`` over the practitioner rows of the type, read once from the
    lookup index (a correlated ``NOT EXISTS`` would walk that covering index once per record); on
    PostgreSQL a ``NOT EXISTS``, which it runs as an anti-join."""
    t = table(resource_type)
    target = practitioner_id(reference)
    if target is None:
        if dialect == "sqlite":
            return t.c.id.not_in(
                select(REFS.c.resource_id).where(
                    REFS.c.resource_type == resource_type, REFS.c.param == PRACTITIONER_PARAM
                )
            )
        return ~exists(
            select(literal(1)).where(
                REFS.c.resource_type == resource_type,
                REFS.c.resource_id == t.c.id,
                REFS.c.param == PRACTITIONER_PARAM,
            )
        )
    return t.c.id.in_(
        select(REFS.c.resource_id).where(
            REFS.c.resource_type == resource_type,
            REFS.c.param == PRACTITIONER_PARAM,
            REFS.c.target_id == target,
            REFS.c.target_type == "Practitioner",
        )
    )


def assigned_to(resource_type: str, practitioner: str, dialect: str) -> ColumnElement[bool]:
    """Records whose practitioner reference is indexed with id ``practitioner`` (``Practitioner/<id>``)."""
    return owned_by(resource_type, f"Practitioner/{practitioner}", dialect)


def _date_rows(
    resource_type: str, param: str, t: Table, cond: ColumnElement[bool], narrowed: bool
) -> ColumnElement[bool]:
    if narrowed:  # few candidates already: look at their own date rows (owner index)
        return exists(select(literal(1)).where(*own_rows(DATES, resource_type, t, param), cond))
    return t.c.id.in_(
        select(DATES.c.resource_id).where(
            DATES.c.resource_type == resource_type, DATES.c.param == param, cond
        )
    )


def starts_within(
    resource_type: str, ranges: Iterable[tuple[datetime | None, datetime | None]], narrowed: bool = True
) -> ColumnElement[bool]:
    """Records whose start (Shift ``date``, Timecard ``date`` = clockIn) lies in one of the UTC ranges
    ``[lo, hi)`` (None: open)."""
    t = table(resource_type)
    alternatives = []
    for lo, hi in ranges:
        parts = []
        if lo is not None:
            parts.append(DATES.c.start >= utc(lo))
        if hi is not None:
            parts.append(DATES.c.start < utc(hi))
        alternatives.append(and_(true(), *parts))
    return _date_rows(resource_type, START_PARAM, t, or_(*alternatives), narrowed)


def with_status(resource_type: str, status: str) -> ColumnElement[bool]:
    t = table(resource_type)
    return t.c.id.in_(
        select(TOKENS.c.resource_id).where(
            TOKENS.c.resource_type == resource_type,
            TOKENS.c.param == "status",
            TOKENS.c.value == clip(status),
        )
    )


# ---------------------------------------------------------------------------- list pages
def scan_shifts(
    conn: Connection,
    *,
    employee_id: str | None = None,
    status: str | None = None,
    unfilled: bool | None = None,
    start_from: datetime | None = None,
    start_before: datetime | None = None,
    after: str = "",
    first: int = SCAN_CHUNK,
) -> Iterator[dict[str, Any]]:
    """:func:`scan` of the shifts the index selects for these filters (a superset: the caller applies
    the exact filter): assigned to ``employee_id``, with ``status``, without an employee (``unfilled``
    true; false selects all) and starting in ``[start_from, start_before)``."""
    dialect = conn.dialect.name
    conds = []
    if employee_id is not None:
        conds.append(assigned_to("Shift", employee_id, dialect))
    if status is not None:
        conds.append(with_status("Shift", status))
    if unfilled:
        conds.append(owned_by("Shift", None, dialect))
    if start_from is not None or start_before is not None:
        conds.append(starts_within("Shift", [(start_from, start_before)], narrowed=bool(conds)))
    return scan(conn, "Shift", conds, after, first)


def scan_timecards(
    conn: Connection, *, employee_id: str | None = None, after: str = "", first: int = SCAN_CHUNK
) -> Iterator[dict[str, Any]]:
    """:func:`scan` of the timecards (of ``employee_id`` as the index has it, when given)."""
    conds = [] if employee_id is None else [assigned_to("Timecard", employee_id, conn.dialect.name)]
    return scan(conn, "Timecard", conds, after, first)


# ---------------------------------------------------------------------------- shifts
def overlap_candidates(
    conn: Connection, reference: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """The shifts of ONE practitioner that may overlap ``[start, end)``: indexed as theirs, starting
    before ``end`` and ending after ``start`` (or without an ``end`` row: written before it was indexed);
    :func:`hms_ach.workforce.rules.overlapping_shift` decides."""
    t = table("Shift")
    ends_after = exists(
        select(literal(1)).where(*own_rows(DATES, "Shift", t, SHIFT_END_PARAM), DATES.c.start > utc(start))
    )
    no_end_row = ~exists(select(literal(1)).where(*own_rows(DATES, "Shift", t, SHIFT_END_PARAM)))
    stmt = (
        select(t.c.resource)
        .where(
            *live(t),
            owned_by("Shift", reference, conn.dialect.name),
            starts_within("Shift", [(None, end)], narrowed=practitioner_id(reference) is not None),
            or_(ends_after, no_end_row),
        )
        .order_by(t.c.id)
    )
    return [orjson.loads(r) for r in conn.execute(stmt).scalars()]


def unassigned_shifts(conn: Connection) -> list[dict[str, Any]]:
    """The shifts without an indexed practitioner (the unfilled ones, and any whose practitioner
    reference cannot be indexed), in id order: the index answers which, only those are read."""
    t = table("Shift")
    stmt = select(t.c.resource).where(*live(t), owned_by("Shift", None, conn.dialect.name)).order_by(t.c.id)
    return [orjson.loads(r) for r in conn.execute(stmt).scalars()]


# ---------------------------------------------------------------------------- timecards
@cache
def _timecards_window(dialect: str) -> Select[Any]:
    """The timecards of one indexed practitioner (bound: ``target``) clocking in within
    ``[lo, hi)``: the statement of the rules' common read, built once (bound values, cached SQL)."""
    t = table("Timecard")
    theirs = t.c.id.in_(
        select(REFS.c.resource_id).where(
            REFS.c.resource_type == "Timecard",
            REFS.c.param == PRACTITIONER_PARAM,
            REFS.c.target_id == bindparam("target"),
            REFS.c.target_type == "Practitioner",
        )
    )
    window = and_(DATES.c.start >= bindparam("lo"), DATES.c.start < bindparam("hi"))
    dated = exists(select(literal(1)).where(*own_rows(DATES, "Timecard", t, START_PARAM), window))
    return select(t.c.resource).where(*live(t), theirs, dated).order_by(t.c.id)


def practitioner_timecards(
    conn: Connection, reference: str | None, ranges: Iterable[tuple[datetime | None, datetime | None]]
) -> list[dict[str, Any]]:
    """The timecards of ONE practitioner (as :func:`owned_by` selects them) clocking in within one of
    the UTC ranges ``[lo, hi)``, in id order."""
    t = table("Timecard")
    ranges = list(ranges)
    if not ranges:
        return []
    target = practitioner_id(reference)
    if target is not None and len(ranges) == 1 and ranges[0][0] is not None and ranges[0][1] is not None:
        params = {"target": target, "lo": utc(ranges[0][0]), "hi": utc(ranges[0][1])}
        rows = conn.execute(_timecards_window(conn.dialect.name), params).scalars()
        return [orjson.loads(r) for r in rows]
    stmt = (
        select(t.c.resource)
        .where(
            *live(t),
            owned_by("Timecard", reference, conn.dialect.name),
            # one employee's cards are few: check their dates; else the dates find the cards
            starts_within("Timecard", ranges, narrowed=practitioner_id(reference) is not None),
        )
        .order_by(t.c.id)
    )
    return [orjson.loads(r) for r in conn.execute(stmt).scalars()]


def timecards_in_weeks(
    conn: Connection, reference: str | None, weeks: Iterable[datetime]
) -> list[dict[str, Any]]:
    """The timecards of ONE practitioner clocking in during the ISO weeks starting at ``weeks`` (Mondays)."""
    return practitioner_timecards(conn, reference, [(w, w + timedelta(days=7)) for w in sorted(set(weeks))])


# ---------------------------------------------------------------------------- rules' lookups
class StoredRoster:
    """The lookups of :class:`hms_ach.workforce.rules.Roster` in one transaction (or reader connection)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def employee(self, employee_id: str) -> dict[str, Any] | None:
        return get_record(self.conn, "Practitioner", employee_id)

    def shift(self, shift_record_id: str) -> dict[str, Any] | None:
        return get_record(self.conn, "Shift", shift_record_id)

    def shifts_around(self, practitioner: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return overlap_candidates(self.conn, practitioner, start, end)

    def timecards_between(self, practitioner: str, since: datetime, before: datetime) -> list[dict[str, Any]]:
        return practitioner_timecards(self.conn, practitioner, [(since, before)])


# ---------------------------------------------------------------------------- credential scan
@dataclass(frozen=True)
class AlertRow:
    """One ``credential_alert`` row (see :mod:`hms_ach.workforce.credentials`)."""

    practitioner_id: str
    credential: str
    expires: str
    threshold: str
    created_at: datetime


@dataclass(frozen=True)
class JobRunRow:
    """The ``job_run`` row of one scheduled job: its last run."""

    status: str
    started_at: datetime | None
    finished_at: datetime | None
    detail: str | None


def credential_alerts(conn: Connection) -> list[AlertRow]:
    """Every credential alert raised, in the order they were raised."""
    rows = conn.execute(select(CREDENTIAL_ALERTS).order_by(CREDENTIAL_ALERTS.c.id)).all()
    return [AlertRow(r.practitioner_id, r.credential, r.expires, r.threshold, r.created_at) for r in rows]


def job_run(conn: Connection, name: str) -> JobRunRow | None:
    """The last run of the scheduled job ``name``, or None when it never ran."""
    row = conn.execute(select(JOB_RUNS).where(JOB_RUNS.c.name == name)).first()
    if row is None:
        return None
    return JobRunRow(row.status, row.started_at, row.finished_at, row.detail)


# ---------------------------------------------------------------------------- compliance report
def records_by_id(conn: Connection, resource_type: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The live records of ``resource_type`` among ``ids``, by reference (``Shift/<id>``)."""
    t = table(resource_type)
    wanted = sorted({i for i in ids if i and len(i) <= 64})
    out: dict[str, dict[str, Any]] = {}
    for n in range(0, len(wanted), SCAN_CHUNK):
        stmt = select(t.c.resource).where(*live(t), t.c.id.in_(wanted[n : n + SCAN_CHUNK]))
        for row in conn.execute(stmt).scalars():
            res = orjson.loads(row)
            out[f"{resource_type}/{res.get('id')}"] = res
    return out


def _within(column: Any, since: datetime | None, before: datetime | None) -> list[ColumnElement[bool]]:
    """``column`` (a time column of the store's UTC type) in ``[since, before)``."""
    conds = []
    if since is not None:
        conds.append(column >= utc(since))
    if before is not None:
        conds.append(column < utc(before))
    return conds


def offboardings(
    conn: Connection, since: datetime | None = None, before: datetime | None = None
) -> list[tuple[str, datetime]]:
    """The ``practitioner.offboarded`` events written in ``[since, before)``: (practitioner
    reference, written at), oldest first."""
    stmt = (
        select(EVENTS.c.payload, EVENTS.c.created_at)
        .where(EVENTS.c.event == OFFBOARDED_EVENT, *_within(EVENTS.c.created_at, since, before))
        .order_by(EVENTS.c.id)
    )
    out = []
    for payload, created in conn.execute(stmt).all():
        ref = orjson.loads(payload).get("resource")
        out.append((str(ref or ""), created if created.tzinfo else created.replace(tzinfo=UTC)))
    return out


def rule_violations(
    conn: Connection, since: datetime | None = None, before: datetime | None = None
) -> list[tuple[str, datetime]]:
    """The writes refused by a workforce rule and stored in ``[since, before)``: (rule code, stored
    at), oldest first. Every path stores the code in the error (``[shift.too_long] ...``): /api/v1
    requests, FHIR writes and CSV rows (each row is a stored message)."""
    stmt = (
        select(MESSAGES.c.error, MESSAGES.c.received_at)
        .where(
            MESSAGES.c.status.in_(("error", "rejected")),
            MESSAGES.c.error.contains("["),
            *_within(MESSAGES.c.received_at, since, before),
        )
        .order_by(MESSAGES.c.id)
    )
    out = []
    for error, received in conn.execute(stmt).all():
        found = RULE_CODE.search(error or "")
        if found:
            out.append((found.group(1), received if received.tzinfo else received.replace(tzinfo=UTC)))
    return out


__all__ = [
    "AlertRow",
    "JobRunRow",
    "StoredRoster",
    "all_records",
    "assigned_to",
    "credential_alerts",
    "get_record",
    "job_run",
    "offboardings",
    "overlap_candidates",
    "owned_by",
    "practitioner_id",
    "practitioner_timecards",
    "read",
    "records_by_id",
    "rule_violations",
    "savepoint",
    "scan",
    "scan_shifts",
    "scan_timecards",
    "starts_within",
    "timecards_in_weeks",
    "unassigned_shifts",
    "with_status",
]
