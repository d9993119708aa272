"""The SQL of a search's criteria, built once per shape.

A search's criteria become SQLAlchemy constructs: one clause per parameter type, each an ``IN``
sub-select on that type's index table (:func:`hms_ach.store.search.execute` runs them). Building
those constructs cost more than running them (over 100,000 records, an Encounter search by patient
and date spent 45% of its time building its WHERE clause and computing the cache key of the new
statement, 8% in SQLite), so they are built once per *shape*: what the SQL depends on (the resource
type, each criterion's parameter, modifier and the form of each value: a token with or without a
system, a date's prefix, a reference with or without a type, the dialect, the patient
compartment), never the values themselves. Every value a user sent is a bound parameter named
``b0``, ``b1`` ... in the order the criteria are planned; :func:`criteria_sql` returns the cached
:class:`CriteriaSql` of the query's shape and the values of this query.

Each criterion is planned in two steps: its *piece* function reads the values (cheap: parsing, no
SQL) and returns the shape's key and a function that builds the SQL; the latter runs only when the
shape is new. A value that changed the SQL without being part of the key would make a later
search of the same key answer with the first one's SQL: every value goes through :class:`Binds`,
and the key holds only the forms and the bound names.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, Table, and_, bindparam, exists, false, func, literal, or_, select, true
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from hms_ach.core.records import PATIENT_COMPARTMENT, THE_PATIENT_ITSELF
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.search_params import IMPLICIT_SYSTEMS, SearchParam, clip, normalise, parse_reference
from hms_ach.store.search_query import (
    EVERYTHING,
    Access,
    Criterion,
    Link,
    SearchQuery,
    date_value,
    split_escaped,
    unescape,
)

__all__ = [
    "TOP",
    "Binds",
    "ClauseContext",
    "CriteriaSql",
    "compartment_clause",
    "criteria_sql",
    "index_table",
    "own_rows",
    "record_table",
]


def record_table(resource_type: str) -> Table:
    return RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined, no-any-return]


def index_table(kind: str) -> Table:
    return INDEX_TABLES[kind].__table__  # type: ignore[attr-defined, no-any-return]


@functools.lru_cache(maxsize=4096)
def _param_rows(ix: Table, rt: str, param: str) -> Select[Any]:
    """The ids of the ``rt`` records with an index row of ``param``, the select every criterion's
    index set starts from."""
    return select(ix.c.resource_id).where(ix.c.resource_type == rt, ix.c.param == param)


def _rows_of(ix: Table, rt: str, param: SearchParam, *conds: ColumnElement[bool]) -> Select[Any]:
    rows = _param_rows(ix, rt, param.name)
    return rows.where(*conds) if conds else rows


@functools.lru_cache(maxsize=4096)
def own_rows(ix: Table, rt: str, t: Table, param: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions selecting the index rows of ``param`` of the record ``t.c.id`` (for a
    correlated sub-select).

    They are found through the owner index (resource_type, resource_id), a few rows per record. The
    param is compared through ``coalesce`` (it is never NULL) so that the planner cannot pick the
    lookup index (resource_type, param, ...) instead: SQLite does when it can, and then walks every
    row of the param for every candidate record. Built once per table, type and param.
    """
    return (ix.c.resource_type == rt, ix.c.resource_id == t.c.id, func.coalesce(ix.c.param, "") == param)


@dataclass(frozen=True)
class ClauseContext:
    """What a clause builder may adapt to: the SQL dialect, and whether another criterion of the
    query narrows the records first (then a date criterion is checked per candidate record through
    the index's owner columns, instead of listing every date row that matches).

    ``index_sets`` collects, as the builders run, the index-row selects of the criteria that are a
    plain "the record has a matching index row". When every criterion is one, the matches can be
    counted and paged from the index alone."""

    dialect: str = "sqlite"
    narrowed: bool = False
    index_sets: list[Select[Any]] = field(default_factory=list)
    limit_sets: list[Select[Any]] = field(default_factory=list)
    """The index-row selects of the access limits (the patient compartment), beside the criteria's."""


class Binds:
    """The values of one search, each bound by a name (``b0``, ``b1`` ...) given in the order the
    criteria are planned, so that two searches of one shape give their values the same names."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def __call__(self, value: Any) -> str:
        name = f"b{len(self.values)}"
        self.values[name] = value
        return name


Build = Callable[[ClauseContext], ColumnElement[bool]]
Piece = tuple[Hashable, Build]
"""A planned criterion: the key of its SQL's shape, and the function that builds that SQL."""


def _in_index(
    t: Table, ix: Table, rt: str, crit: Criterion, cond: ColumnElement[bool], ctx: ClauseContext
) -> ColumnElement[bool]:
    if crit.modifier == "missing":
        rows = _rows_of(ix, rt, crit.param)
        return t.c.id.not_in(rows) if crit.values[0] == "true" else t.c.id.in_(rows)
    rows = _rows_of(ix, rt, crit.param, cond)
    if crit.modifier == "not":
        return t.c.id.not_in(rows)
    ctx.index_sets.append(rows)
    return t.c.id.in_(rows)


def _missing(t: Table, rt: str, crit: Criterion, kind: str) -> Piece:
    """``:missing=true|false``: a token or date column is never missing; an indexed parameter is
    missing when the record has no index row of it."""
    missing = crit.values[0] == "true"
    key = (kind, crit.param.name, "missing", missing)
    if crit.param.column is not None and kind in ("token", "date"):
        return key, (lambda ctx: false() if missing else true())
    ix = index_table(kind)
    return key, (lambda ctx: _in_index(t, ix, rt, crit, false(), ctx))


def _bound(name: str, like: ColumnElement[Any]) -> BindParameter[Any]:
    return bindparam(name, type_=like.type)


def token_piece(t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext) -> Piece:
    """``system|code``, ``code``, ``|code`` (no system), ``system|`` (any code in system)."""
    if crit.modifier == "missing":
        return _missing(t, rt, crit, "token")
    column = crit.param.column
    if column is not None:
        listed = binds([unescape(v) for v in crit.values])
        return ("token", column, listed), (lambda ctx: t.c[column].in_(bindparam(listed, expanding=True)))
    implicit = IMPLICIT_SYSTEMS.get((rt, crit.param.name))
    forms: list[tuple[str, str | None, str | None]] = []  # (system form, system's name, code's name)
    for raw in crit.values:
        parts = split_escaped(raw, "|")
        if len(parts) == 1:
            forms.append(("any", None, binds(clip(unescape(parts[0])))))
            continue
        system, code = unescape(parts[0]), unescape("|".join(parts[1:]))
        form = "none" if system == "" else "implicit" if system == implicit else "system"
        forms.append((form, binds(clip(system)) if system else None, binds(clip(code)) if code else None))
    shape = tuple(forms)

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("token")
        conds: list[ColumnElement[bool]] = []
        for form, system, code in shape:
            is_code = ix.c.value == _bound(code, ix.c.value) if code else None
            if form == "any" and is_code is not None:
                conds.append(is_code)
                continue
            sys_cond: ColumnElement[bool]
            if form == "none" or system is None:
                sys_cond = ix.c.system.is_(None)
            elif form == "implicit":  # a bare code is stored without its (implicit) system
                sys_cond = or_(ix.c.system.is_(None), ix.c.system == _bound(system, ix.c.system))
            else:
                sys_cond = ix.c.system == _bound(system, ix.c.system)
            conds.append(and_(sys_cond, is_code) if is_code is not None else sys_cond)
        return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)

    return ("token", crit.param.name, crit.modifier, shape), build


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: Sorts after every character (the largest code point): ``prefix <= x < prefix + TOP`` is a prefix match
#: for byte-wise (SQLite BINARY, PostgreSQL "C") ordering of UTF-8 text.
TOP = chr(0x10FFFF)


def string_piece(t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext) -> Piece:
    """Starts-with on the normalised form by default; ``:exact`` and ``:contains`` as in R4.

    The starts-with takes a form the lookup index serves: on SQLite a range ``>= prefix AND <
    prefix || U+10FFFF`` (its LIKE is case-insensitive and cannot use a BINARY index), on
    PostgreSQL ``LIKE 'prefix%'``, which the index with ``text_pattern_ops`` serves whatever the
    database collation. The bounds or the pattern are bound values."""
    if crit.modifier == "missing":
        return _missing(t, rt, crit, "string")
    forms: list[tuple[str, str, str | None]] = []
    for raw in crit.values:
        text = unescape(raw)
        if crit.modifier == "exact":
            forms.append(("exact", binds(clip(text)), None))
            continue
        norm = clip(normalise(text))
        if crit.modifier == "contains":
            forms.append(("like", binds("%" + _like_escape(norm) + "%"), None))
        elif ctx.dialect == "postgresql":
            forms.append(("like", binds(_like_escape(norm) + "%"), None))
        else:
            forms.append(("range", binds(norm), binds(norm + TOP)))
    shape = tuple(forms)

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("string")
        conds: list[ColumnElement[bool]] = []
        for form, first, second in shape:
            if form == "exact":
                conds.append(ix.c.exact == _bound(first, ix.c.exact))
            elif form == "like":
                conds.append(ix.c.norm.like(_bound(first, ix.c.norm), escape="\\"))
            else:
                conds.append(
                    and_(ix.c.norm >= _bound(first, ix.c.norm), ix.c.norm < _bound(str(second), ix.c.norm))
                )
        return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)

    return ("string", crit.param.name, crit.modifier, shape), build


def _date_condition(
    prefix: str,
    start: ColumnElement[Any],
    end_gt: Callable[[Any], ColumnElement[bool]],
    end_le: Callable[[Any], ColumnElement[bool]],
    lo: BindParameter[Any],
    hi: BindParameter[Any],
) -> ColumnElement[bool]:
    """The R4 prefix table with the target range [start, end) and the search range [lo, hi)."""
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


def date_piece(t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext) -> Piece:
    """Date prefixes over precision ranges; ``_lastUpdated`` treats the column as an instant. When
    another criterion narrows the records first, the date is checked per candidate record (a
    correlated EXISTS through the owner index)."""
    if crit.modifier == "missing":
        return _missing(t, rt, crit, "date")
    forms: list[tuple[str, str, str]] = []
    for raw in crit.values:
        prefix, lo, hi = date_value(raw, crit.param.name)
        forms.append((prefix, binds(lo), binds(hi)))
    shape = tuple(forms)
    column = crit.param.column
    owned = column is None and ctx.narrowed

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("date")
        start: ColumnElement[Any]
        end_gt: Callable[[Any], ColumnElement[bool]]
        end_le: Callable[[Any], ColumnElement[bool]]
        if column is not None:  # an instant: its range ends where it starts
            start = end = t.c[column]
            end_gt, end_le = (lambda x: end >= x), (lambda x: end < x)
        else:
            start, end = ix.c.start, ix.c.end
            end_gt, end_le = (lambda x: end > x), (lambda x: end <= x)
        conds = [
            _date_condition(prefix, start, end_gt, end_le, _bound(lo, start), _bound(hi, start))
            for prefix, lo, hi in shape
        ]
        cond = or_(false(), *conds)
        if column is not None:
            return cond
        if owned:
            return exists(select(literal(1)).where(*own_rows(ix, rt, t, crit.param.name), cond))
        return _in_index(t, ix, rt, crit, cond, ctx)

    return ("date", crit.param.name, column, owned, shape), build


def reference_piece(t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext) -> Piece:
    """``Type/id``, a bare ``id`` or an absolute URL ending in ``Type/id``; ``:Type`` narrows."""
    if crit.modifier == "missing":
        return _missing(t, rt, crit, "reference")
    forms: list[tuple[str, str | None]] = []
    for raw in crit.values:
        target_type, target_id = parse_reference(unescape(raw))
        if crit.modifier is not None:
            if target_type not in (None, crit.modifier):
                continue
            target_type = crit.modifier
        forms.append((binds(target_id), binds(target_type) if target_type else None))
    shape = tuple(forms)

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("reference")
        conds: list[ColumnElement[bool]] = []
        for target_id, target_type in shape:
            cond = ix.c.target_id == _bound(target_id, ix.c.target_id)
            if target_type is not None:
                cond = and_(cond, ix.c.target_type == _bound(target_type, ix.c.target_type))
            conds.append(cond)
        return _in_index(t, ix, rt, crit, or_(false(), *conds), ctx)

    return ("reference", crit.param.name, crit.modifier, shape), build


def _compartment_rows(rt: str, params: list[str], patient: Any) -> Select[Any]:
    """The ids of the ``rt`` records whose reference ``params`` point at ``Patient/patient``
    (the lookup index: resource_type, param, target_id, target_type)."""
    ix = index_table("reference")
    param = ix.c.param == params[0] if len(params) == 1 else ix.c.param.in_(params)
    return select(ix.c.resource_id).where(
        ix.c.resource_type == rt, param, ix.c.target_id == patient, ix.c.target_type == "Patient"
    )


def compartment_clause(
    t: Table, rt: str, patient: str | BindParameter[Any], ctx: ClauseContext | None = None
) -> ColumnElement[bool]:
    """The ``rt`` record ``t`` is in the compartment of ``Patient/patient`` (FHIR R4 Patient
    CompartmentDefinition, declared in :data:`hms_ach.core.records.PATIENT_COMPARTMENT`): the
    Patient itself, or a record whose compartment reference parameter points at it. A type outside
    the compartment matches nothing. The patient id is a bound value (or a bound parameter). When
    the condition is a plain index set, it is reported in ``ctx`` so that the count can still come
    from the index alone."""
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


PIECES: dict[str, Callable[[Table, str, Criterion, Binds, ClauseContext], Piece]] = {
    "token": token_piece,
    "string": string_piece,
    "date": date_piece,
    "reference": reference_piece,
}


def _linked_piece(
    other: str, inner: Criterion, binds: Binds, ctx: ClauseContext, access: Access
) -> tuple[Hashable, Callable[[ClauseContext], Select[Any]]]:
    """The ids of the live ``other`` records matching ``inner`` (within the caller's patient
    compartment of ``other``): the far side of a chain or ``_has``, as a sub-select."""
    ot = record_table(other)
    inner_ctx = ClauseContext(ctx.dialect)
    inner_key, inner_build = PIECES[inner.param.type](ot, other, inner, binds, inner_ctx)
    patient = access.compartment(other)
    patient_name = binds(patient) if patient is not None else None

    def build(ctx: ClauseContext) -> Select[Any]:
        conds = [ot.c.deleted == false(), inner_build(ClauseContext(ctx.dialect))]
        if patient_name is not None:
            conds.append(compartment_clause(ot, other, bindparam(patient_name, type_=ot.c.id.type)))
        return select(ot.c.id).where(*conds)

    return (other, inner_key, patient_name), build


def _far_side(
    crit: Criterion, link: Link | None, binds: Binds, ctx: ClauseContext, access: Access
) -> tuple[Link, Hashable, Callable[[ClauseContext], Select[Any]]]:
    """The link of a chain or ``_has`` criterion, its far side's key and sub-select builder."""
    if link is None:
        raise ValueError(f"{crit.param.name}: not a chain or _has criterion")
    key, linked = _linked_piece(link.other, link.inner, binds, ctx, access)
    return link, key, linked


def chain_piece(
    t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext, access: Access = EVERYTHING
) -> Piece:
    """``ref:Type.param=value``: the record's reference ``crit.param`` points at a ``Type`` record
    matching the inner criterion. One statement: the reference rows whose target is in the
    sub-select of matching targets (their own index tables), no look-up per record."""
    link, key, linked = _far_side(crit, crit.chain, binds, ctx, access)

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("reference")
        targets = linked(ctx)
        rows = _rows_of(ix, rt, crit.param, ix.c.target_type == link.other, ix.c.target_id.in_(targets))
        ctx.index_sets.append(rows)
        return t.c.id.in_(rows)

    return ("chain", crit.param.name, key), build


def has_piece(
    t: Table, rt: str, crit: Criterion, binds: Binds, ctx: ClauseContext, access: Access = EVERYTHING
) -> Piece:
    """``_has:Type:ref:param=value``: some ``Type`` record matching the inner criterion refers to
    the record through ``ref`` (``crit.param``, a parameter of ``Type``). The reference targets may
    name records that do not exist, so this set is not counted from the index alone."""
    link, key, linked = _far_side(crit, crit.has, binds, ctx, access)

    def build(ctx: ClauseContext) -> ColumnElement[bool]:
        ix = index_table("reference")
        rows = select(ix.c.target_id).where(
            ix.c.resource_type == link.other,
            ix.c.param == crit.param.name,
            ix.c.target_type == rt,
            ix.c.resource_id.in_(linked(ctx)),
        )
        return t.c.id.in_(rows)

    return ("has", crit.param.name, key), build


def clause_context(query: SearchQuery, dialect: str) -> ClauseContext:
    """The context of ``query``'s clause builders: narrowed when a plain reference or token
    criterion, or the patient compartment of a ``patient/`` grant, selects the candidates first."""
    narrowed = any(c.param.type in ("reference", "token") and c.modifier is None for c in query.criteria)
    narrowed = narrowed or query.access.compartment(query.resource_type) is not None
    return ClauseContext(dialect, narrowed)


@dataclass
class CriteriaSql:
    """The SQL of one shape of criteria: every WHERE condition (deleted records never match), the
    context the builders filled (the index sets), and the page and count statements built on them
    so far (:meth:`statement`), kept with it."""

    where: list[ColumnElement[bool]]
    ctx: ClauseContext
    statements: dict[Hashable, Any] = field(default_factory=dict)

    def statement(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The statement ``key`` of this shape, built by ``build`` the first time."""
        found = self.statements.get(key)
        if found is None:
            found = self.statements.setdefault(key, build())
        return found


#: Shapes kept; past it the cache starts again (a client inventing shapes cannot grow it for ever).
MAX_SHAPES = 2048
_shapes: dict[Hashable, CriteriaSql] = {}
_shapes_lock = threading.Lock()


def criteria_sql(query: SearchQuery, dialect: str) -> tuple[CriteriaSql, dict[str, Any]]:
    """The SQL of ``query``'s shape (built the first time that shape is seen) and ``query``'s
    values for its bound parameters."""
    rt = query.resource_type
    t = record_table(rt)
    ctx = clause_context(query, dialect)
    binds = Binds()
    pieces: list[Piece] = []
    for crit in query.criteria:
        if crit.chain is not None:
            pieces.append(chain_piece(t, rt, crit, binds, ctx, query.access))
        elif crit.has is not None:
            pieces.append(has_piece(t, rt, crit, binds, ctx, query.access))
        else:
            pieces.append(PIECES[crit.param.type](t, rt, crit, binds, ctx))
    patient = query.access.compartment(rt)
    patient_name = binds(patient) if patient is not None else None
    key = (rt, dialect, ctx.narrowed, tuple(k for k, _ in pieces), patient_name)
    built = _shapes.get(key)
    if built is None:
        where: list[ColumnElement[bool]] = [t.c.deleted == false()]
        where += [build(ctx) for _, build in pieces]
        if patient_name is not None:  # only under patient/ scopes: user/ and system/ searches get none
            where.append(compartment_clause(t, rt, bindparam(patient_name, type_=t.c.id.type), ctx))
        built = CriteriaSql(where, ctx)
        with _shapes_lock:
            if len(_shapes) >= MAX_SHAPES:
                _shapes.clear()
            built = _shapes.setdefault(key, built)
    return built, binds.values
