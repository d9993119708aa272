"""FHIR R4 search over the canonical store: the page query, the total and the includes.

:func:`execute` runs a :class:`~hms_ach.store.search_query.SearchQuery` on a connection with
SQLAlchemy Core. The criteria's SQL comes from :mod:`hms_ach.store.search_sql` (one clause per
parameter type, each an ``IN`` sub-select on that type's index table; chains and ``_has`` are
sub-selects on the reference index and the other type's index tables), built once per shape of the
query with every user value a bound parameter; the page and count statements over it are kept with
it. ``_include``/``_revinclude`` run once per directive, round and type reached (:func:`_included`),
within the bounds :data:`MAX_INCLUDED` and :data:`MAX_INCLUDE_DEPTH`.

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
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    CompoundSelect,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    false,
    func,
    intersect,
    literal,
    or_,
    select,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.sql.elements import ColumnElement, TextClause

from hms_ach.store import fastexec
from hms_ach.store.search_params import FAR_PAST, clip, normalise
from hms_ach.store.search_query import (
    DEFAULT_COUNT,
    EVERYTHING,
    MAX_COUNT,
    MAX_INCLUDE_DEPTH,
    MAX_INCLUDED,
    Access,
    Include,
    SearchError,
    SearchQuery,
    SortKey,
    chain_targets,
    encode_cursor,
    include_params,
    parse_query,
    points_at,
    revinclude_params,
    sort_params,
    unescape,
)
from hms_ach.store.search_sql import (
    TOP,
    ClauseContext,
    CriteriaSql,
    compartment_clause,
    criteria_sql,
    index_table,
    record_table,
)

__all__ = [
    "DEFAULT_COUNT",
    "EVERYTHING",
    "Access",
    "MAX_COUNT",
    "ESTIMATE_BOUND",
    "MAX_INCLUDED",
    "MAX_INCLUDE_DEPTH",
    "SearchError",
    "SearchPage",
    "SearchQuery",
    "execute",
    "chain_targets",
    "include_params",
    "revinclude_params",
    "parse_query",
    "sort_params",
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


#: ``_total=estimate`` counts at most this many matches; past it the total is estimated.
ESTIMATE_BOUND = 1000


def page_total(
    conn: Connection,
    sql: CriteriaSql,
    params: dict[str, Any],
    query: SearchQuery,
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
    The statements are built once per shape of criteria (:class:`CriteriaSql`), the values bound.
    """
    if query.total == "none" or (query.total == "auto" and asked_only):
        return None, None
    t = record_table(query.resource_type)
    if query.total != "estimate":
        counting = sql.statement(
            "count",
            lambda: select(func.count()).select_from(_match_ids(t, sql.where, query, sql.ctx).subquery()),
        )
        return int(conn.execute(counting, params).scalar_one()), None
    bounded = sql.statement(
        "bounded",
        lambda: select(func.count()).select_from(
            _match_ids(t, sql.where, query, sql.ctx).limit(ESTIMATE_BOUND + 1).subquery()
        ),
    )
    found = int(conn.execute(bounded, params).scalar_one())
    if found <= ESTIMATE_BOUND:
        return found, None
    if conn.dialect.name == "postgresql":
        return max(found, _planner_rows(conn, _match_ids(t, sql.where, query, sql.ctx), params)), (
            "Bundle.total is the database planner's estimate (_total=estimate); _total=accurate counts"
        )
    return ESTIMATE_BOUND, (
        f"Bundle.total is a lower bound: more than {ESTIMATE_BOUND} records match (_total=estimate); "
        "_total=accurate counts them"
    )


def _planner_rows(conn: Connection, ids: Select[Any] | CompoundSelect[Any], params: dict[str, Any]) -> int:
    """PostgreSQL's estimate of the rows ``ids`` returns with ``params`` (EXPLAIN, nothing run)."""
    compiled = ids.params(params).compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
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
    ix = index_table(key.param.type)
    col = ix.c[{"string": "norm", "token": "value", "date": "start"}[key.param.type]]
    agg = func.max(col) if key.descending else func.min(col)
    sub = (
        select(agg)
        .where(ix.c.resource_type == rt, ix.c.resource_id == t.c.id, ix.c.param == key.param.name)
        .scalar_subquery()
    )
    missing: Any = FAR_PAST if key.param.type == "date" else ""
    return func.coalesce(sub, literal(missing, col.type))


def _after(cols: list[Any], descending: list[bool]) -> ColumnElement[bool]:
    """Rows strictly after the keys ``:a0``, ``:a1`` ... in the order of ``cols`` (the keyset
    condition)."""
    keys = [bindparam(f"a{i}", type_=col.type) for i, col in enumerate(cols)]
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
    the record table with the criteria, ordered by the sort keys and id, after the cursor. Each
    statement is built once per shape of the criteria (:func:`hms_ach.store.search_sql.criteria_sql`)
    and run with this query's values.

    The total (:func:`page_total`): none unless asked (``_total=accurate`` counts, ``estimate``
    gives a bounded count or the planner's figure), except that a first page holding every match
    carries its length, which costs nothing.
    """
    t = record_table(query.resource_type)
    dialect = conn.dialect.name
    prefix = _one_prefix(query, dialect) if query.count > 0 else None
    by_name = _prefix_page(conn, t, query, prefix) if prefix is not None else None
    # the criteria's SQL, needed only when a statement uses it (the name-by-name page does not)
    sql: CriteriaSql | None = None
    params: dict[str, Any] = {}
    if by_name is not None:
        rows: list[Any] = by_name
    else:
        sql, params = criteria_sql(query, dialect)
        if query.count == 0:
            counted, warning = page_total(conn, sql, params, query, asked_only=False)
            return SearchPage([], [], counted, None, [warning] if warning else [])
        rows = _page(conn, t, sql, params, query)
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
        if sql is None:
            sql, params = criteria_sql(query, dialect)
        total, warning = page_total(conn, sql, params, query)
        warnings += [warning] if warning else []
    included, include_warnings = _included(conn, query, [m[0] for m in matches])
    return SearchPage(matches, included, total, next_cursor, warnings + include_warnings)


def _page(
    conn: Connection, t: Table, sql: CriteriaSql, params: dict[str, Any], query: SearchQuery
) -> list[Any]:
    """The rows of the page and one more: (id, resource or None, *sort keys). The statement of the
    page's shape (index-only or over the records, sorted or not, past a cursor or not, its length)
    is built once, kept with the criteria's SQL; the cursor's keys are bound as ``:a0`` ..."""
    after = query.after is not None
    sort = tuple((k.param.name, k.descending) for k in query.sort)
    values = dict(params)
    if query.after is not None:
        values.update((f"a{i}", key) for i, key in enumerate(query.after))
    sets = _index_only_sets(query, sql.ctx)
    if sets is not None and not query.sort:
        shape: tuple[Any, ...] = ("narrow", after, query.count)
        stmt = sql.statement(shape, lambda: _narrow_page(t, _page_ids(sets, after, query.count)))
    else:
        shape = ("wide", sort, after, query.count)
        stmt = sql.statement(shape, lambda: _wide_page(t, sql.where, query))
    if not query.sort:
        # rows (id, resource text), which need no conversion: on the driver's cursor, as the family
        # page (a shape's criteria SQL is its dialect's, so one prepared statement serves it)
        fast: fastexec.Prepared | bool = sql.statement(
            ("cursor", *shape), lambda: fastexec.prepare(conn, stmt) or False
        )
        if isinstance(fast, fastexec.Prepared):
            return fast.rows(conn, values)
    return list(conn.execute(stmt, values).all())


def _index_only_sets(query: SearchQuery, ctx: ClauseContext) -> list[Select[Any]] | None:
    """The index-row selects whose intersection is exactly the matches (every criterion a plain
    index match, the patient compartment one more set), or None when some criterion is not."""
    limited = query.access.compartment(query.resource_type) is not None
    if query.criteria and len(ctx.index_sets) == len(query.criteria) and (ctx.limit_sets or not limited):
        return ctx.index_sets + ctx.limit_sets
    return None


def _narrow_page(t: Table, page_ids: Select[Any]) -> Select[Any]:
    """The page by id from the index alone: ``page_ids``, the first ``count + 1`` matching ids past
    the cursor (index-only, no record row read), then those records (a LEFT JOIN, so that an id whose
    record is gone still counts for the cursor and paging never skips). Rows: (id, resource or None)."""
    ids = page_ids.subquery("page")
    return (
        select(ids.c.rid, t.c.resource)
        .select_from(ids.outerjoin(t, and_(t.c.id == ids.c.rid, t.c.deleted == false())))
        .order_by(ids.c.rid)
    )


def _page_ids(sets: list[Select[Any]], after: bool, count: int) -> Select[Any]:
    """The ids of the page (and one more): the intersection of ``sets``, past the cursor (the last
    id, bound as ``:a0``) when ``after``, in id order. Each set is narrowed by the cursor inside its
    own select, so that a later page reads only the index rows after it."""
    narrowed = []
    for rows in sets:
        col = rows.selected_columns[0]
        narrowed.append(rows.where(col > bindparam("a0", type_=col.type)) if after else rows)
    if len(narrowed) == 1:
        # ordered by ``resource_id || ''``, which no index provides: else a planner may walk the owner
        # index (resource_type, resource_id) in id order and test every row of the type until the
        # page is full (PostgreSQL does on small tables, and a rare name would read them all)
        rid = narrowed[0].selected_columns[0].concat("").label("rid")
        return narrowed[0].with_only_columns(rid).distinct().order_by(rid).limit(count + 1)
    both = intersect(*narrowed).subquery("both")
    first = both.c[0]
    return select(first.label("rid")).order_by(first).limit(count + 1)


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
    # both statements on the driver's cursor (store/fastexec.py): through SQLAlchemy's execution
    # and result objects they cost more than SQLite took to run them
    found = fastexec.all_rows(conn, "prefix_values", _PREFIX_VALUES[conn.dialect.name], bounds)
    values = [row[0] for row in found]
    if len(values) > MAX_PREFIX_VALUES:
        return None
    values = values or [prefix]  # no value: one piece that finds nothing
    after = query.after[-1] if query.after is not None else None
    params: dict[str, Any] = {"rt": rt, "param": crit.param.name, "lim": query.count + 1, "deleted": False}
    params.update((f"v{i}", value) for i, value in enumerate(values))
    if after is not None:
        params["after"] = after
    shape = (t.name, len(values), after is not None)
    return fastexec.all_rows(conn, f"prefix_page:{shape}", _prefix_page_sql(*shape), params)


@functools.lru_cache(maxsize=512)
def _prefix_page_sql(table: str, values: int, after: bool) -> TextClause:
    """The statement of :func:`_prefix_page` for ``values`` names (``:v0`` ...), past ``:after``
    or not: the SQL that :func:`_narrow_page` over a union of per-name selects would build, written
    once per shape. Built with SQLAlchemy's constructs on every search it cost more than running
    it (0.7 of a search's 0.9 ms, over 100,000 Practitioners)."""
    ix = index_table("string").name
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


def _wide_page(t: Table, where: list[ColumnElement[bool]], query: SearchQuery) -> Select[Any]:
    """The page over the record table with every criterion: rows (id, resource, *sort keys), past
    the cursor's keys (``:a0`` ...) when the query has a cursor."""
    if not query.sort:  # in id order: one flat select (the sub-select's column proxies cost 0.1 ms)
        stmt = select(t.c.id, t.c.resource).where(*where)
        if query.after is not None:
            stmt = stmt.where(t.c.id > bindparam("a0", type_=t.c.id.type))
        return stmt.order_by(t.c.id).limit(query.count + 1)
    keys = [_sort_expression(t, query.resource_type, k).label(f"k{i}") for i, k in enumerate(query.sort)]
    inner = select(t.c.id, t.c.resource, *keys).where(*where).subquery("matches")
    cols = [inner.c[f"k{i}"] for i in range(len(keys))] + [inner.c.id]
    descending = [k.descending for k in query.sort] + [False]
    stmt = select(inner.c.id, inner.c.resource, *cols[:-1])
    if query.after is not None:
        stmt = stmt.where(_after(cols, descending))
    stmt = stmt.order_by(*[c.desc() if d else c.asc() for c, d in zip(cols, descending, strict=True)])
    return stmt.limit(query.count + 1)


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
            stmt = stmt.where(compartment_clause(record_table(rtype), rtype, patient))
        already = sum(1 for t, _ in seen if t == rtype)  # rows that may come back and be skipped
        room = limit - len(out) + already
        if patient is None and not inc.reverse and frontier.get(inc.source):
            # on the driver's cursor (store/fastexec.py), one statement per number of ids
            sources = frontier[inc.source]
            shape = (inc.source, inc.param.name, rtype, len(sources))
            values: dict[str, Any] = {f"i{i}": rid for i, rid in enumerate(sources)}
            values.update(src=inc.source, param=inc.param.name, target=rtype, deleted=False, room=room)
            rows = fastexec.all_rows(conn, f"forward_link:{shape}", _forward_link_sql(*shape), values)
        else:
            rows = list(conn.execute(stmt, {**ids, "room": room}))
        for rid, text in rows:
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
    ix = index_table("reference")
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
    ix = index_table("reference")
    starts = [
        and_(ix.c.target_type == rtype, ix.c.target_id.in_(bindparam(f"ids{i}", expanding=True)))
        for i, rtype in enumerate(types)
    ]
    rows = select(ix.c.resource_id).where(ix.c.resource_type == source, ix.c.param == param, or_(*starts))
    return _linked(source, rows)


@functools.lru_cache(maxsize=1024)
def _forward_link_sql(source: str, param: str, target: str, ids: int) -> TextClause:
    """:func:`_forward_link` for ``ids`` source ids (``:i0`` ...), as SQL text: the same statement
    on the driver's cursor, where SQLAlchemy's execution of it (an expanding ``IN``) cost more than
    SQLite took to run it."""
    ix = index_table("reference").name
    tt = record_table(target).name
    wanted = ", ".join(f":i{i}" for i in range(ids))
    return sql_text(
        f"SELECT {tt}.id, {tt}.resource FROM {tt} WHERE {tt}.id IN (SELECT {ix}.target_id FROM {ix}"
        f" WHERE {ix}.resource_type = :src AND {ix}.param = :param AND {ix}.resource_id IN ({wanted})"
        f" AND {ix}.target_type = :target) AND {tt}.deleted = :deleted ORDER BY {tt}.id LIMIT :room"
    )


def _linked(rtype: str, rows: Select[Any]) -> Select[Any]:
    tt = record_table(rtype)
    return (
        select(tt.c.id, tt.c.resource)
        .where(tt.c.id.in_(rows), tt.c.deleted == false())
        .order_by(tt.c.id)
        .limit(bindparam("room"))
    )
