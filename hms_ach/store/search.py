"""FHIR R4 search over the canonical store: the SQL builder and the page query.

:func:`execute` runs a :class:`~hms_ach.store.search_query.SearchQuery` on a connection with
SQLAlchemy Core: one clause builder per parameter type, each an ``IN`` sub-select on that type's
index table; every user value is a bound parameter. A chained parameter and ``_has`` are
sub-selects on the reference index and the other type's index tables (:func:`chain_clause`,
:func:`has_clause`); ``_include``/``_revinclude`` run once per directive, round and type reached
(:func:`_included`), within the bounds :data:`MAX_INCLUDED` and :data:`MAX_INCLUDE_DEPTH`.

Paging is keyset paging. When every criterion is a plain index match and no ``_sort`` is asked, the
page's ids come from the index alone and only the page's records are read (:func:`_narrow_page`);
``Bundle.total`` is counted only when asked (:func:`page_total`). The page is ordered by the sort
keys and then the record id, and the next
page starts strictly after the keys of the last row served (carried by the cursor). A record whose
sort keys do not change while a client pages is therefore returned exactly once, whatever is
inserted or deleted meanwhile; the default order (by ``_id``) never changes, so with it no record
is skipped or repeated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    CompoundSelect,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    false,
    func,
    intersect,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.sql.elements import ColumnElement, TextClause

from hms_ach.core.records import PATIENT_COMPARTMENT, THE_PATIENT_ITSELF
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.search_params import (
    FAR_PAST,
    IMPLICIT_SYSTEMS,
    SearchParam,
    clip,
    normalise,
    parse_reference,
)
from hms_ach.store.search_query import (
    DEFAULT_COUNT,
    EVERYTHING,
    MAX_COUNT,
    MAX_INCLUDE_DEPTH,
    MAX_INCLUDED,
    Access,
    Criterion,
    Include,
    SearchError,
    SearchQuery,
    SortKey,
    chain_targets,
    date_value,
    encode_cursor,
    include_params,
    parse_query,
    points_at,
    revinclude_params,
    sort_params,
    split_escaped,
    unescape,
)

__all__ = [
    "DEFAULT_COUNT",
    "EVERYTHING",
    "Access",
    "MAX_COUNT",
    "ESTIMATE_BOUND",
    "MAX_INCLUDED",
    "MAX_INCLUDE_DEPTH",
    "ClauseContext",
    "SearchError",
    "SearchPage",
    "SearchQuery",
    "execute",
    "chain_targets",
    "include_params",
    "revinclude_params",
    "clause_context",
    "compartment_clause",
    "own_rows",
    "parse_query",
    "sort_params",
    "where_clauses",
]


@dataclass
class SearchPage:
    matches: list[tuple[str, str]]
    """(id, stored resource JSON) of the page, in order."""
    included: list[tuple[str, str, str]]
    """(type, id, stored resource JSON) of the ``_include``-d and ``_revinclude``-d records."""
    total: int | None
    next_cursor: str | None
    warnings: list[str] = field(default_factory=list)
    """What the page left out (included resources past the bound), for a warning OperationOutcome."""


# ---------------------------------------------------------------------------- SQL builders
def _table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def _index(kind: str) -> Table:
    return INDEX_TABLES[kind].__table__  # type: ignore[attr-defined, no-any-return]


def _rows_of(ix: Table, rt: str, param: SearchParam, *conds: ColumnElement[bool]) -> Select[Any]:
    rows = _param_rows(ix, rt, param.name)
    return rows.where(*conds) if conds else rows


@functools.lru_cache(maxsize=4096)
def _param_rows(ix: Table, rt: str, param: str) -> Select[Any]:
    """The ids of the ``rt`` records with an index row of ``param``, the select every criterion's
    index set starts from (built once: SQLAlchemy constructs are immutable, and building the
    criteria's SQL is most of a search's time in Python)."""
    return select(ix.c.resource_id).where(ix.c.resource_type == rt, ix.c.param == param)


def _in_index(
    t: Table, ix: Table, rt: str, crit: Criterion, cond: ColumnElement[bool], ctx: ClauseContext | None = None
) -> ColumnElement[bool]:
    if crit.modifier == "missing":
        rows = _rows_of(ix, rt, crit.param)
        return t.c.id.not_in(rows) if crit.values[0] == "true" else t.c.id.in_(rows)
    rows = _rows_of(ix, rt, crit.param, cond)
    if crit.modifier == "not":
        return t.c.id.not_in(rows)
    if ctx is not None:
        ctx.index_sets.append(rows)
    return t.c.id.in_(rows)


@dataclass(frozen=True)
class ClauseContext:
    """What a clause builder may adapt to: the SQL dialect, and whether another criterion of the
    query narrows the records first (then a date criterion is checked per candidate record through
    the index's owner columns, instead of listing every date row that matches).

    ``index_sets`` collects, as the builders run, the index-row selects of the criteria that are a
    plain "the record has a matching index row". When every criterion is one, the matches can be
    counted from the index alone (:func:`_match_ids`)."""

    dialect: str = "sqlite"
    narrowed: bool = False
    index_sets: list[Select[Any]] = field(default_factory=list)
    limit_sets: list[Select[Any]] = field(default_factory=list)
    """The index-row selects of the access limits (the patient compartment), beside the criteria's."""


@functools.lru_cache(maxsize=4096)
def own_rows(ix: Table, rt: str, t: Table, param: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions selecting the index rows of ``param`` of the record ``t.c.id`` (for a
    correlated sub-select).

    They are found through the owner index (resource_type, resource_id), a few rows per record. The
    param is compared through ``coalesce`` (it is never NULL) so that the planner cannot pick the
    lookup index (resource_type, param, ...) instead: SQLite does when it can, and then walks every
    row of the param for every candidate record. Built once per table, type and param (as
    :func:`_param_rows`).
    """
    return (ix.c.resource_type == rt, ix.c.resource_id == t.c.id, func.coalesce(ix.c.param, "") == param)


def _owned(t: Table, ix: Table, rt: str, crit: Criterion, cond: ColumnElement[bool]) -> ColumnElement[bool]:
    """The record has an index row of ``crit`` meeting ``cond`` (a correlated EXISTS)."""
    return exists(select(literal(1)).where(*own_rows(ix, rt, t, crit.param.name), cond))


def token_clause(t: Table, rt: str, crit: Criterion, ctx: ClauseContext) -> ColumnElement[bool]:
    """``system|code``, ``code``, ``|code`` (no system), ``system|`` (any code in system)."""
    if crit.param.column is not None:
        if crit.modifier == "missing":  # a column is never missing
            return true() if crit.values[0] == "false" else false()
        return t.c[crit.param.column].in_([unescape(v) for v in crit.values])
    ix = _index("token")
    implicit = IMPLICIT_SYSTEMS.get((rt, crit.param.name))
    conds: list[ColumnElement[bool]] = []
    for raw in crit.values:
        parts = split_escaped(raw, "|")
        if len(parts) == 1:
            conds.append(ix.c.value == clip(unescape(parts[0])))
            continue
        system, code = unescape(parts[0]), unescape("|".join(parts[1:]))
        sys_cond: ColumnElement[bool]
        if system == "":
            sys_cond = ix.c.system.is_(None)
        elif system == implicit:  # a bare code is stored without its (implicit) system
            sys_cond = or_(ix.c.system.is_(None), ix.c.system == clip(system))
        else:
            sys_cond = ix.c.system == clip(system)
        conds.append(and_(sys_cond, ix.c.value == clip(code)) if code else sys_cond)
    return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: Sorts after every character (the largest code point): ``prefix <= x < prefix + TOP`` is a prefix match
#: for byte-wise (SQLite BINARY, PostgreSQL "C") ordering of UTF-8 text.
TOP = chr(0x10FFFF)


def prefix_condition(col: ColumnElement[Any], prefix: str, dialect: str) -> ColumnElement[bool]:
    """``col`` starts with ``prefix``, in a form the column's btree index serves.

    SQLite: a range ``>= prefix AND < prefix || U+10FFFF`` (its LIKE is case-insensitive and
    cannot use a BINARY index). PostgreSQL: ``LIKE 'prefix%'``, which the index with
    ``text_pattern_ops`` serves whatever the database collation.
    """
    if dialect == "postgresql":
        return col.like(_like_escape(prefix) + "%", escape="\\")
    return and_(col >= prefix, col < prefix + TOP)


def string_clause(t: Table, rt: str, crit: Criterion, ctx: ClauseContext) -> ColumnElement[bool]:
    """Starts-with on the normalised form by default; ``:exact`` and ``:contains`` as in R4."""
    ix = _index("string")
    conds: list[ColumnElement[bool]] = []
    for raw in crit.values:
        text = unescape(raw)
        if crit.modifier == "exact":
            conds.append(ix.c.exact == clip(text))
            continue
        norm = clip(normalise(text))
        if crit.modifier == "contains":
            conds.append(ix.c.norm.like("%" + _like_escape(norm) + "%", escape="\\"))
        else:
            conds.append(prefix_condition(ix.c.norm, norm, ctx.dialect))
    return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)


def _date_condition(
    prefix: str,
    start: ColumnElement[Any],
    end_gt: Callable[[datetime], ColumnElement[bool]],
    end_le: Callable[[datetime], ColumnElement[bool]],
    lo: datetime,
    hi: datetime,
) -> ColumnElement[bool]:
    """The R4 prefix table with the target range [start, end) and the search range [lo, hi). Only
    the condition asked for is built (building all nine cost a third of an Encounter search)."""
    if prefix == "gt":
        return end_gt(hi)
    if prefix == "lt":
        return start < lo
    if prefix == "sa":
        return start >= hi
    if prefix == "eb":
        return end_le(lo)
    if prefix == "ap":  # approximately: the target overlaps the search range widened by date_value
        return and_(start < hi, end_gt(lo))
    eq = and_(start >= lo, end_le(hi))
    if prefix == "ne":
        return ~eq
    if prefix == "ge":
        return or_(end_gt(hi), eq)
    if prefix == "le":
        return or_(start < lo, eq)
    if prefix != "eq":
        raise ValueError(f"unknown date prefix {prefix!r}")
    return eq


def date_clause(t: Table, rt: str, crit: Criterion, ctx: ClauseContext) -> ColumnElement[bool]:
    """Date prefixes over precision ranges; ``_lastUpdated`` treats the column as an instant."""
    conds: list[ColumnElement[bool]] = []
    ix = _index("date")
    if crit.modifier == "missing":
        if crit.param.column is not None:  # a column is never missing
            return true() if crit.values[0] == "false" else false()
        return _in_index(t, ix, rt, crit, false(), ctx)
    start: ColumnElement[Any]
    end_gt: Callable[[datetime], ColumnElement[bool]]
    end_le: Callable[[datetime], ColumnElement[bool]]
    if crit.param.column is not None:  # an instant: its range ends where it starts
        start = end = t.c[crit.param.column]
        end_gt, end_le = (lambda x: end >= x), (lambda x: end < x)
    else:
        start, end = ix.c.start, ix.c.end
        end_gt, end_le = (lambda x: end > x), (lambda x: end <= x)
    for raw in crit.values:
        prefix, lo, hi = date_value(raw, crit.param.name)
        conds.append(_date_condition(prefix, start, end_gt, end_le, lo, hi))
    cond = or_(false(), *conds)
    if crit.param.column is not None:
        return cond
    if ctx.narrowed and crit.modifier is None:
        return _owned(t, ix, rt, crit, cond)
    return _in_index(t, ix, rt, crit, cond, ctx)


def reference_clause(t: Table, rt: str, crit: Criterion, ctx: ClauseContext) -> ColumnElement[bool]:
    """``Type/id``, a bare ``id`` or an absolute URL ending in ``Type/id``; ``:Type`` narrows."""
    ix = _index("reference")
    conds: list[ColumnElement[bool]] = []
    for raw in crit.values:
        target_type, target_id = parse_reference(unescape(raw))
        if crit.modifier not in (None, "missing"):
            if target_type not in (None, crit.modifier):
                continue
            target_type = crit.modifier
        cond = ix.c.target_id == target_id
        conds.append(and_(cond, ix.c.target_type == target_type) if target_type else cond)
    return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)


def _compartment_rows(rt: str, params: list[str], patient: str) -> Select[Any]:
    """The ids of the ``rt`` records whose reference ``params`` point at ``Patient/patient``
    (the lookup index: resource_type, param, target_id, target_type)."""
    ix = _index("reference")
    param = ix.c.param == params[0] if len(params) == 1 else ix.c.param.in_(params)
    return select(ix.c.resource_id).where(
        ix.c.resource_type == rt, param, ix.c.target_id == patient, ix.c.target_type == "Patient"
    )


def compartment_clause(
    t: Table, rt: str, patient: str, ctx: ClauseContext | None = None
) -> ColumnElement[bool]:
    """The ``rt`` record ``t`` is in the compartment of ``Patient/patient`` (FHIR R4 Patient
    CompartmentDefinition, declared in :data:`hms_ach.core.records.PATIENT_COMPARTMENT`): the
    Patient itself, or a record whose compartment reference parameter points at it. A type outside
    the compartment matches nothing. The patient id is a bound value. When the condition is a plain
    index set, it is reported in ``ctx`` so that the count can still come from the index alone."""
    declared = PATIENT_COMPARTMENT.get(rt, ())
    params = [p for p in declared if p != THE_PATIENT_ITSELF]
    conds: list[ColumnElement[bool]] = []
    if THE_PATIENT_ITSELF in declared:
        conds.append(t.c.id == patient)
    if params:
        rows = _compartment_rows(rt, params, patient)
        conds.append(t.c.id.in_(rows))
        if ctx is not None and not conds[:-1]:
            ctx.limit_sets.append(rows)
    if not conds:
        return false()
    return conds[0] if len(conds) == 1 else or_(*conds)


CLAUSE_BUILDERS = {
    "token": token_clause,
    "string": string_clause,
    "date": date_clause,
    "reference": reference_clause,
}


def _linked_ids(other: str, inner: Criterion, dialect: str, access: Access) -> Select[Any]:
    """The ids of the live ``other`` records matching ``inner`` (within the caller's patient
    compartment of ``other``): the far side of a chain or ``_has``, as a sub-select."""
    ot = _table(other)
    conds = [ot.c.deleted == false()]
    conds.append(CLAUSE_BUILDERS[inner.param.type](ot, other, inner, ClauseContext(dialect)))
    patient = access.compartment(other)
    if patient is not None:
        conds.append(compartment_clause(ot, other, patient))
    return select(ot.c.id).where(*conds)


def chain_clause(
    t: Table, rt: str, crit: Criterion, ctx: ClauseContext, access: Access = EVERYTHING
) -> ColumnElement[bool]:
    """``ref:Type.param=value``: the record's reference ``crit.param`` points at a ``Type`` record
    matching the inner criterion. One statement: the reference rows whose target is in the
    sub-select of matching targets (their own index tables), no look-up per record."""
    link = crit.chain
    if link is None:
        raise ValueError(f"{crit.param.name}: a chain_clause needs a chained criterion")
    ix = _index("reference")
    targets = _linked_ids(link.other, link.inner, ctx.dialect, access)
    rows = _rows_of(ix, rt, crit.param, ix.c.target_type == link.other, ix.c.target_id.in_(targets))
    ctx.index_sets.append(rows)
    return t.c.id.in_(rows)


def has_clause(
    t: Table, rt: str, crit: Criterion, ctx: ClauseContext, access: Access = EVERYTHING
) -> ColumnElement[bool]:
    """``_has:Type:ref:param=value``: some ``Type`` record matching the inner criterion refers to
    the record through ``ref`` (``crit.param``, a parameter of ``Type``). The reference targets may
    name records that do not exist, so this set is not counted from the index alone."""
    link = crit.has
    if link is None:
        raise ValueError(f"{crit.param.name}: a has_clause needs a _has criterion")
    ix = _index("reference")
    sources = _linked_ids(link.other, link.inner, ctx.dialect, access)
    rows = select(ix.c.target_id).where(
        ix.c.resource_type == link.other,
        ix.c.param == crit.param.name,
        ix.c.target_type == rt,
        ix.c.resource_id.in_(sources),
    )
    return t.c.id.in_(rows)


def clause_context(query: SearchQuery, dialect: str) -> ClauseContext:
    """The context of ``query``'s clause builders: narrowed when a plain reference or token
    criterion, or the patient compartment of a ``patient/`` grant, selects the candidates first."""
    narrowed = any(c.param.type in ("reference", "token") and c.modifier is None for c in query.criteria)
    narrowed = narrowed or query.access.compartment(query.resource_type) is not None
    return ClauseContext(dialect, narrowed)


def where_clauses(
    query: SearchQuery, dialect: str = "sqlite", ctx: ClauseContext | None = None
) -> list[ColumnElement[bool]]:
    """Every WHERE condition of ``query``; deleted records never match. ``ctx`` (default
    :func:`clause_context`) collects what the builders report, e.g. the index sets of the count."""
    t = _table(query.resource_type)
    ctx = ctx or clause_context(query, dialect)
    conds: list[ColumnElement[bool]] = [t.c.deleted == false()]
    for crit in query.criteria:
        if crit.chain is not None:
            conds.append(chain_clause(t, query.resource_type, crit, ctx, query.access))
        elif crit.has is not None:
            conds.append(has_clause(t, query.resource_type, crit, ctx, query.access))
        else:
            conds.append(CLAUSE_BUILDERS[crit.param.type](t, query.resource_type, crit, ctx))
    patient = query.access.compartment(query.resource_type)
    if patient is not None:  # only under patient/ scopes: user/ and system/ searches get no condition
        conds.append(compartment_clause(t, query.resource_type, patient, ctx))
    return conds


#: ``_total=estimate`` counts at most this many matches; past it the total is estimated.
ESTIMATE_BOUND = 1000


def page_total(
    conn: Connection,
    t: Table,
    where: list[ColumnElement[bool]],
    query: SearchQuery,
    ctx: ClauseContext,
    *,
    asked_only: bool = True,
) -> tuple[int | None, str | None]:
    """``Bundle.total`` as ``_total`` asks, and the warning that goes with an estimate.

    Without ``_total`` (``auto``) no total is counted: a count reads every match once per page, which
    over a million records costs more than the page itself. ``asked_only=False`` (a ``_count=0`` or
    ``_summary=count`` request, whose whole answer is the total) counts it then. ``accurate`` counts
    (every match, :func:`_match_ids`); ``estimate`` counts at most :data:`ESTIMATE_BOUND` matches, exact below that;
    past it PostgreSQL gives the planner's row estimate for the matches (at least the bound) and
    SQLite, which has no such estimate, the bound itself as a lower bound, with a warning saying so.
    """
    if query.total == "none" or (query.total == "auto" and asked_only):
        return None, None
    ids = _match_ids(t, where, query, ctx)
    if query.total != "estimate":
        return int(conn.execute(select(func.count()).select_from(ids.subquery())).scalar_one()), None
    bounded = select(func.count()).select_from(ids.limit(ESTIMATE_BOUND + 1).subquery())
    found = int(conn.execute(bounded).scalar_one())
    if found <= ESTIMATE_BOUND:
        return found, None
    if conn.dialect.name == "postgresql":
        return max(found, _planner_rows(conn, ids)), (
            "Bundle.total is the database planner's estimate (_total=estimate); _total=accurate counts"
        )
    return ESTIMATE_BOUND, (
        f"Bundle.total is a lower bound: more than {ESTIMATE_BOUND} records match (_total=estimate); "
        "_total=accurate counts them"
    )


def _planner_rows(conn: Connection, ids: Select[Any] | CompoundSelect[Any]) -> int:
    """PostgreSQL's estimate of the rows ``ids`` returns (EXPLAIN, nothing run)."""
    compiled = ids.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    row = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled), compiled.params).scalar_one()
    plan = orjson.loads(row) if isinstance(row, str | bytes) else row
    return int(plan[0]["Plan"]["Plan Rows"])


def _match_ids(
    t: Table, where: list[ColumnElement[bool]], query: SearchQuery, ctx: ClauseContext
) -> Select[Any] | CompoundSelect[Any]:
    """The ids of every match, for counting. When every criterion is a plain index match (one
    index set per criterion), they come from the index alone: the ids in all of the sets. A deleted
    record and the placeholder of a conditional create have no index rows, so nothing is counted
    that the page query would not return, and no record row is read (over a million Practitioners,
    counting the matches of a common family name through the records read 25,000 rows scattered
    over the file). Otherwise the ids of the record table with the page's criteria. The patient
    compartment of a ``patient/`` scope is one more index set (``ctx.limit_sets``)."""
    sets = _index_only_sets(query, ctx)
    if sets is not None:
        return sets[0].distinct() if len(sets) == 1 else intersect(*sets)
    return select(t.c.id).where(*where)


def _sort_expression(t: Table, rt: str, key: SortKey) -> ColumnElement[Any]:
    if key.param.column is not None:
        return t.c[key.param.column]
    ix = _index(key.param.type)
    col = ix.c[{"string": "norm", "token": "value", "date": "start"}[key.param.type]]
    agg = func.max(col) if key.descending else func.min(col)
    sub = (
        select(agg)
        .where(ix.c.resource_type == rt, ix.c.resource_id == t.c.id, ix.c.param == key.param.name)
        .scalar_subquery()
    )
    missing: Any = FAR_PAST if key.param.type == "date" else ""
    return func.coalesce(sub, literal(missing, col.type))


def _after(cols: list[Any], descending: list[bool], keys: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``keys`` in the order of ``cols`` (the keyset condition)."""
    alternatives = []
    for i, col in enumerate(cols):
        equal = [cols[j] == keys[j] for j in range(i)]
        alternatives.append(and_(*equal, col < keys[i] if descending[i] else col > keys[i]))
    return or_(*alternatives)


def execute(conn: Connection, query: SearchQuery) -> SearchPage:
    """Run ``query``: one page after the cursor, its includes, and ``Bundle.total``.

    The page: when every criterion is a plain index match and no ``_sort`` is asked, the page's ids
    come from the index alone (:func:`_page_ids`: keyset on ``resource_id``, the first
    ``_count + 1`` past the cursor) and only those records are read; otherwise one statement over
    the record table with the criteria, ordered by the sort keys and id, after the cursor.

    The total (:func:`page_total`): none unless asked (``_total=accurate`` counts, ``estimate``
    gives a bounded count or the planner's figure), except that a first page holding every match
    carries its length, which costs nothing.
    """
    t = _table(query.resource_type)
    dialect = conn.dialect.name
    prefix = _one_prefix(query, dialect) if query.count > 0 else None
    by_name = _prefix_page(conn, t, query, prefix) if prefix is not None else None
    ctx = clause_context(query, dialect)
    # the criteria's SQL, built only when a statement needs it (the name-by-name page does not)
    where = where_clauses(query, dialect, ctx) if by_name is None else []
    if query.count == 0:
        counted, warning = page_total(conn, t, where, query, ctx, asked_only=False)
        return SearchPage([], [], counted, None, [warning] if warning else [])
    if by_name is not None:
        rows: list[Any] = by_name
    elif (sets := _index_only_sets(query, ctx)) is not None and not query.sort:
        rows = _narrow_page(conn, t, _page_ids(sets, query), query)
    else:
        rows = _wide_page(conn, t, where, query)
    more = len(rows) > query.count
    rows = rows[: query.count]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor(query, [*last[2:], last[0]])
    matches = [(r[0], r[1]) for r in rows if r[1] is not None]  # an index-only id whose record is gone: none
    total: int | None = None
    warnings: list[str] = []
    if query.after is None and not more and query.total != "none":
        total = len(matches)  # every match is on this first page: no need to count
    elif query.total in ("accurate", "estimate"):
        where = where or where_clauses(query, dialect, ctx)
        total, warning = page_total(conn, t, where, query, ctx)
        warnings += [warning] if warning else []
    included, include_warnings = _included(conn, query, [m[0] for m in matches])
    return SearchPage(matches, included, total, next_cursor, warnings + include_warnings)


def _index_only_sets(query: SearchQuery, ctx: ClauseContext) -> list[Select[Any]] | None:
    """The index-row selects whose intersection is exactly the matches (every criterion a plain
    index match, the patient compartment one more set), or None when some criterion is not."""
    limited = query.access.compartment(query.resource_type) is not None
    if query.criteria and len(ctx.index_sets) == len(query.criteria) and (ctx.limit_sets or not limited):
        return ctx.index_sets + ctx.limit_sets
    return None


def _narrow_page(conn: Connection, t: Table, page_ids: Select[Any], query: SearchQuery) -> list[Any]:
    """The page by id from the index alone: ``page_ids``, the first ``count + 1`` matching ids past
    the cursor (index-only, no record row read), then those records (a LEFT JOIN, so that an id whose
    record is gone still counts for the cursor and paging never skips). Rows: (id, resource or None)."""
    if query.count == 0:
        return []
    ids = page_ids.subquery("page")
    stmt = (
        select(ids.c.rid, t.c.resource)
        .select_from(ids.outerjoin(t, and_(t.c.id == ids.c.rid, t.c.deleted == false())))
        .order_by(ids.c.rid)
    )
    return list(conn.execute(stmt).all())


def _page_ids(sets: list[Select[Any]], query: SearchQuery) -> Select[Any]:
    """The ids of the page (and one more): the intersection of ``sets``, past the cursor, in id order.
    Each set is narrowed by the cursor inside its own select, so that a later page reads only the
    index rows after it."""
    after = query.after[-1] if query.after is not None else None
    narrowed = []
    for rows in sets:
        col = rows.selected_columns[0]
        narrowed.append(rows.where(col > after) if after is not None else rows)
    if len(narrowed) == 1:
        # ordered by ``resource_id || ''``, which no index provides: else a planner may walk the owner
        # index (resource_type, resource_id) in id order and test every row of the type until the
        # page is full (PostgreSQL does on small tables, and a rare name would read them all)
        rid = narrowed[0].selected_columns[0].concat("").label("rid")
        return narrowed[0].with_only_columns(rid).distinct().order_by(rid).limit(query.count + 1)
    both = intersect(*narrowed).subquery("both")
    first = both.c[0]
    return select(first.label("rid")).order_by(first).limit(query.count + 1)


#: A string prefix matching at most this many distinct normalised values is paged value by value.
MAX_PREFIX_VALUES = 32

#: The distinct normalised values of one string parameter in ``[lo, hi)``, one index seek each (a
#: skip scan: neither database has a loose index scan of its own), at most ``cap + 1`` of them.
#: PostgreSQL compares with the ``text_pattern_ops`` operators of the lookup index (byte order).
_PREFIX_VALUES = {
    dialect: sql_text(
        f"""WITH RECURSIVE found(v, i) AS (
    SELECT (SELECT {first} FROM search_string
            WHERE resource_type = :rt AND param = :param AND norm {ge} :lo AND norm {lt} :hi{tail}), 0
    UNION ALL
    SELECT (SELECT {first} FROM search_string
            WHERE resource_type = :rt AND param = :param AND norm {gt} found.v AND norm {lt} :hi{tail}),
           found.i + 1
    FROM found WHERE found.v IS NOT NULL AND found.i < :cap
)
SELECT v FROM found WHERE v IS NOT NULL"""
    )
    for dialect, first, ge, gt, lt, tail in (
        ("sqlite", "min(norm)", ">=", ">", "<", ""),
        ("postgresql", "norm", "~>=~", "~>~", "~<~", " ORDER BY norm USING ~<~ LIMIT 1"),
    )
}


def _one_prefix(query: SearchQuery, dialect: str) -> str | None:
    """The normalised prefix when ``query`` is one default (starts-with) string criterion with one
    value, no ``_sort`` and no compartment limit; else None."""
    if dialect not in _PREFIX_VALUES or query.sort or len(query.criteria) != 1:
        return None
    if query.access.compartment(query.resource_type) is not None:
        return None
    crit = query.criteria[0]
    if crit.param.type != "string" or crit.modifier is not None or crit.chain or crit.has:
        return None
    if crit.param.column is not None or len(crit.values) != 1:
        return None
    return clip(normalise(unescape(crit.values[0])))


def _prefix_page(conn: Connection, t: Table, query: SearchQuery, prefix: str) -> list[Any] | None:
    """The page of a string prefix search, read value by value: the distinct normalised values
    starting with ``prefix`` (:data:`_PREFIX_VALUES`), then for each the first ``count + 1`` ids
    past the cursor, which the lookup index (resource_type, param, norm, resource_id) holds in id
    order, merged, and those records (:func:`_prefix_page_sql`). This reads about ``count + 1``
    index entries per value however many records share the name (a common family name over a
    million records has thousands). Rows as :func:`_narrow_page`'s. None when the prefix has more
    than :data:`MAX_PREFIX_VALUES` values (the caller pages through every match instead)."""
    crit = query.criteria[0]
    rt = query.resource_type
    bounds = {"rt": rt, "param": crit.param.name, "lo": prefix, "hi": prefix + TOP, "cap": MAX_PREFIX_VALUES}
    values = list(conn.execute(_PREFIX_VALUES[conn.dialect.name], bounds).scalars())
    if len(values) > MAX_PREFIX_VALUES:
        return None
    values = values or [prefix]  # no value: one piece that finds nothing
    after = query.after[-1] if query.after is not None else None
    params: dict[str, Any] = {"rt": rt, "param": crit.param.name, "lim": query.count + 1, "deleted": False}
    params.update((f"v{i}", value) for i, value in enumerate(values))
    if after is not None:
        params["after"] = after
    return list(conn.execute(_prefix_page_sql(t.name, len(values), after is not None), params).all())


@functools.lru_cache(maxsize=512)
def _prefix_page_sql(table: str, values: int, after: bool) -> TextClause:
    """The statement of :func:`_prefix_page` for ``values`` names (``:v0`` ...), past ``:after``
    or not: the SQL that :func:`_narrow_page` over a union of per-name selects would build, written
    once per shape. Built with SQLAlchemy's constructs on every search it cost more than running
    it (0.7 of a search's 0.9 ms, over 100,000 Practitioners)."""
    ix = _index("string").name
    past = " AND resource_id > :after" if after else ""
    pieces = " UNION ALL ".join(
        f"SELECT rid FROM (SELECT resource_id AS rid FROM {ix} WHERE resource_type = :rt AND param = :param"
        f" AND norm = :v{i}{past} ORDER BY resource_id LIMIT :lim) AS p{i}"
        for i in range(values)
    )
    return sql_text(
        f"SELECT page.rid, {table}.resource FROM (SELECT DISTINCT rid FROM ({pieces}) AS merged ORDER BY rid"
        f" LIMIT :lim) AS page LEFT OUTER JOIN {table} ON {table}.id = page.rid AND {table}.deleted = :deleted"
        " ORDER BY page.rid"
    )


def _wide_page(conn: Connection, t: Table, where: list[ColumnElement[bool]], query: SearchQuery) -> list[Any]:
    """The page over the record table with every criterion: rows (id, resource, *sort keys)."""
    if not query.sort:  # in id order: one flat select (the sub-select's column proxies cost 0.1 ms)
        stmt = select(t.c.id, t.c.resource).where(*where)
        if query.after is not None:
            stmt = stmt.where(t.c.id > query.after[-1])
        return list(conn.execute(stmt.order_by(t.c.id).limit(query.count + 1)).all())
    keys = [_sort_expression(t, query.resource_type, k).label(f"k{i}") for i, k in enumerate(query.sort)]
    inner = select(t.c.id, t.c.resource, *keys).where(*where).subquery("matches")
    cols = [inner.c[f"k{i}"] for i in range(len(keys))] + [inner.c.id]
    descending = [k.descending for k in query.sort] + [False]
    stmt = select(inner.c.id, inner.c.resource, *cols[:-1])
    if query.after is not None:
        stmt = stmt.where(_after(cols, descending, query.after))
    stmt = stmt.order_by(*[c.desc() if d else c.asc() for c, d in zip(cols, descending, strict=True)])
    return list(conn.execute(stmt.limit(query.count + 1)).all())


Found = list[tuple[str, str, str]]
"""(type, id, stored resource JSON) of included records."""


def _included(conn: Connection, query: SearchQuery, ids: list[str]) -> tuple[Found, list[str]]:
    """The records the page's ``_include``/``_revinclude`` directives reach, and the warnings of the
    bounds hit.

    The directives start from the matches; those marked ``:iterate`` are applied again to the
    records the previous round added, up to :data:`MAX_INCLUDE_DEPTH` links from a match. Each
    directive of a round is one statement per record type it reaches (an ``IN`` sub-select on the
    reference index), at most ``query.max_included`` records in all. Only the types the caller may
    see (``query.access``) are followed, each limited to its patient compartment when the caller's
    grant on that type is; both limits are conditions of the SQL."""
    if not query.includes or not ids:
        return [], []
    seen = {(query.resource_type, i) for i in ids}
    out: Found = []
    warnings: list[str] = []
    frontier: dict[str, list[str]] = {query.resource_type: ids}
    directives = list(query.includes)
    depth = 0
    while frontier and directives:
        if depth == MAX_INCLUDE_DEPTH:
            if any(_follow(conn, query, inc, frontier, 1, seen) for inc in directives):
                warnings.append(
                    f"_include:iterate/_revinclude:iterate stopped at {MAX_INCLUDE_DEPTH} links from the "
                    "matches; more records are reachable"
                )
            break
        added: dict[str, list[str]] = {}
        for inc in directives:
            room = query.max_included - len(out)
            for rtype, rid, text in _follow(conn, query, inc, frontier, room + 1, seen):
                if len(out) == query.max_included:
                    warnings.append(
                        f"more than {query.max_included} included resources: the first "
                        f"{query.max_included} are served; narrow the search or lower _count"
                    )
                    return out, warnings
                seen.add((rtype, rid))
                out.append((rtype, rid, text))
                added.setdefault(rtype, []).append(rid)
        frontier = added
        directives = [inc for inc in query.includes if inc.iterate]
        depth += 1
    return out, warnings


def _follow(
    conn: Connection,
    query: SearchQuery,
    inc: Include,
    frontier: dict[str, list[str]],
    limit: int,
    seen: set[tuple[str, str]],
) -> Found:
    """The records not in ``seen`` that ``inc`` reaches from the ``frontier`` records (type -> ids),
    at most ``limit``, ordered by type and id."""
    out: Found = []
    for rtype, stmt, ids in _links(inc, frontier):
        if not query.access.visible(rtype) or len(out) >= limit:
            continue
        patient = query.access.compartment(rtype)
        if patient is not None:
            stmt = stmt.where(compartment_clause(_table(rtype), rtype, patient))
        already = sum(1 for t, _ in seen if t == rtype)  # rows that may come back and be skipped
        for rid, text in conn.execute(stmt, {**ids, "room": limit - len(out) + already}):
            if (rtype, rid) not in seen and len(out) < limit:
                out.append((rtype, rid, text))
    return out


def _links(
    inc: Include, frontier: dict[str, list[str]]
) -> list[tuple[str, Select[Any], dict[str, list[str]]]]:
    """What ``inc`` fetches from the ``frontier``: (type of the records, the statement that reads
    them, its ``ids`` parameters); each statement also takes ``room``, its row limit."""
    if inc.reverse:
        types = tuple(
            rtype
            for rtype in sorted(frontier)
            if (inc.target is None or inc.target == rtype) and points_at(inc.param, rtype)
        )
        if not types:
            return []
        stmt = _reverse_link(inc.source, inc.param.name, types)
        return [(inc.source, stmt, {f"ids{i}": frontier[rtype] for i, rtype in enumerate(types)})]
    if inc.source not in frontier:
        return []
    ids = {"ids": frontier[inc.source]}
    targets = [inc.target] if inc.target else chain_targets(inc.param)
    return [(target, _forward_link(inc.source, inc.param.name, target), ids) for target in targets]


@functools.lru_cache(maxsize=1024)
def _forward_link(source: str, param: str, target: str) -> Select[Any]:
    """The ``target`` records that the ``source`` records ``:ids`` point at through ``param``, in
    id order, at most ``:room``. Built once per shape, for every dialect (SQLAlchemy compiles it for
    each): built for every search, the include statements cost a sixth of an Encounter search with
    ``_include`` over 100,000 Practitioners; a statement used again also keeps its cache key."""
    ix = _index("reference")
    rows = select(ix.c.target_id).where(
        ix.c.resource_type == source,
        ix.c.param == param,
        ix.c.resource_id.in_(bindparam("ids", expanding=True)),
        ix.c.target_type == target,
    )
    return _linked(target, rows)


@functools.lru_cache(maxsize=1024)
def _reverse_link(source: str, param: str, types: tuple[str, ...]) -> Select[Any]:
    """The ``source`` records whose ``param`` points at records of ``types`` (their ids ``:ids0``,
    ``:ids1`` ... in that order), in id order, at most ``:room``; built once as :func:`_forward_link`."""
    ix = _index("reference")
    starts = [
        and_(ix.c.target_type == rtype, ix.c.target_id.in_(bindparam(f"ids{i}", expanding=True)))
        for i, rtype in enumerate(types)
    ]
    rows = select(ix.c.resource_id).where(ix.c.resource_type == source, ix.c.param == param, or_(*starts))
    return _linked(source, rows)


def _linked(rtype: str, rows: Select[Any]) -> Select[Any]:
    tt = _table(rtype)
    return (
        select(tt.c.id, tt.c.resource)
        .where(tt.c.id.in_(rows), tt.c.deleted == false())
        .order_by(tt.c.id)
        .limit(bindparam("room"))
    )
