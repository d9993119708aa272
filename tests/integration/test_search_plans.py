"""The searches the benchmarks time are served by indexes: the query plans of
``Practitioner?family=X`` and ``Encounter?patient=..&date=ge..`` name an index for every index
table they read, and neither scans a whole table (SQLite: EXPLAIN QUERY PLAN; PostgreSQL:
EXPLAIN with sequential scans discouraged, as the tables here are tiny)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event

from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import search
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository


def _fill(store: Store) -> dict[str, str]:
    records = [
        RecordWrite(
            f"p{i}",
            "Practitioner",
            "urn:npi",
            f"N{i}",
            {"name": [{"family": f"Fam{i % 7}son", "given": ["A"]}]},
        )
        for i in range(40)
    ]
    records += [
        RecordWrite("pat", "Patient", "urn:mrn", "M1", {"name": [{"family": "Osei"}]}),
        RecordWrite("bed", "Location", "urn:bed", "B1", {"name": "4W-1"}),
    ]
    records += [
        RecordWrite(
            f"e{i}",
            "Encounter",
            "urn:visit",
            f"V{i}",
            {
                "status": "in-progress",
                "subject": {"reference": "@pat"},
                "period": {
                    "start": f"2026-0{1 + i % 9}-01T10:00:00Z",
                    "end": f"2026-0{1 + i % 9}-01T12:00:00Z",
                },
                "location": [{"location": {"reference": "@bed"}}],
            },
        )
        for i in range(12)
    ]
    with store.writer.begin() as conn:
        out = Repository(conn).apply(MappingResult(records=records))
    return {o.resource_type: o.id for o in out}


def _plans(store: Store, resource_type: str, params: list[tuple[str, str]]) -> list[str]:
    """The plan lines of every statement ``search.execute`` runs for the query."""
    seen: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((statement, parameters))

    query = search.parse_query(resource_type, params)
    if store.dialect == "postgresql":  # statistics, as a loaded store has them (the bulk loader runs ANALYZE)
        with store.writer.begin() as conn:
            conn.exec_driver_sql(
                "ANALYZE search_string, search_reference, search_date, practitioner, encounter"
            )
    with store.reader.connect() as conn:
        event.listen(conn, "before_cursor_execute", grab)
        with conn.begin():
            search.execute(conn, query)
        event.remove(conn, "before_cursor_execute", grab)
        with conn.begin():
            return [line for sql, p in seen for line in _explain(conn, sql, p)]


def _explain(conn: Connection, sql: str, params: Any) -> list[str]:
    if conn.dialect.name == "sqlite":
        return [str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return [str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + sql, params)]


def _assert_indexed(plan: list[str], tables: list[str], dialect: str) -> None:
    text = "\n".join(plan)
    for table in tables:
        if dialect == "sqlite":
            assert f"SCAN {table}" not in text, text
            assert any(f"SEARCH {table} USING" in line and "INDEX" in line for line in plan), (table, text)
        else:
            assert f"Seq Scan on {table}" not in text, text
            # an index scan, or a bitmap heap scan (which a bitmap index scan drives)
            assert any(
                ("Index" in line or "Bitmap Heap Scan" in line) and f" on {table}" in line for line in plan
            ), (table, text)


def test_family_prefix_search_uses_the_string_index(store: Store) -> None:
    _fill(store)
    plan = _plans(store, "Practitioner", [("family", "fam3"), ("_count", "20")])
    _assert_indexed(plan, ["search_string", "practitioner"], store.dialect)
    # the page's ids come from the string lookup index (it ends with resource_id: no table row read)
    text = "\n".join(plan)
    if store.dialect == "sqlite":
        assert "USING COVERING INDEX ix_search_string_lookup" in text, text
    else:
        assert "Index Scan on ix_search_string_lookup" in text or "using ix_search_string_lookup" in text, (
            text
        )
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query("Practitioner", [("family", "fam3")]))
    assert len(page.matches) == 6 and page.total == 6  # Fam3son: i = 3, 10, 17, 24, 31, 38


def test_encounter_patient_and_date_search_uses_indexes(store: Store) -> None:
    ids = _fill(store)
    params = [
        ("patient", f"Patient/{ids['Patient']}"),
        ("date", "ge2026-05-01"),
        ("_include", "Encounter:location"),
    ]
    plan = _plans(store, "Encounter", params)
    _assert_indexed(plan, ["search_reference", "search_date", "encounter", "location"], store.dialect)
    if store.dialect == "sqlite":  # the date is checked per candidate encounter, through its owner index
        assert any("SEARCH search_date USING INDEX ix_search_date_owner" in line for line in plan), plan
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query("Encounter", params))
    assert len(page.matches) == 5  # visits in months 5..9: i = 4..8
    assert [t for t, _, _ in page.included] == ["Location"]


def test_the_total_of_index_only_criteria_is_counted_from_the_index(store: Store) -> None:
    """Bundle.total of criteria that are all plain index matches reads no record row (over a million
    records a common family name has tens of thousands of matches scattered over the file)."""
    _fill(store)
    seen: list[str] = []

    def grab(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if "count(" in statement.lower():
            seen.append(" ".join(statement.split()).lower())

    # 6 matches: a second page, so the total is counted when asked
    params = [("family", "fam3"), ("_count", "2"), ("_total", "accurate")]
    with store.reader.connect() as conn:
        event.listen(conn, "before_cursor_execute", grab)
        with conn.begin():
            page = search.execute(conn, search.parse_query("Practitioner", params))
        event.remove(conn, "before_cursor_execute", grab)
    assert page.total == 6 and len(page.matches) == 2
    assert len(seen) == 1 and "from practitioner" not in seen[0] and "search_string" in seen[0], seen
    with store.reader.connect() as conn:  # a criterion on a record column still counts through the table
        page = search.execute(
            conn,
            search.parse_query(
                "Practitioner",
                [
                    ("family", "fam3"),
                    ("_lastUpdated", "ge2000-01-01"),
                    ("_count", "2"),
                    ("_total", "accurate"),
                ],
            ),
        )
    assert page.total == 6


def _statements(store: Store, resource_type: str, params: list[tuple[str, str]]) -> tuple[list[str], Any]:
    """The SELECT statements ``search.execute`` runs for the query (whitespace folded, lower case), and
    its page."""
    seen: list[str] = []

    def grab(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append(" ".join(statement.split()).lower())

    with store.reader.connect() as conn:
        event.listen(conn, "before_cursor_execute", grab)
        with conn.begin():
            page = search.execute(conn, search.parse_query(resource_type, params))
        event.remove(conn, "before_cursor_execute", grab)
    return seen, page


def test_no_total_is_counted_unless_asked(store: Store) -> None:
    """Without _total a page with more pages after it carries no total, and no COUNT runs (over a
    million records the count of a common family name cost more than the page)."""
    _fill(store)
    seen, page = _statements(store, "Practitioner", [("family", "fam3"), ("_count", "2")])
    assert page.total is None and len(page.matches) == 2 and page.next_cursor is not None
    assert seen and not any("count(" in s for s in seen), seen
    seen, page = _statements(store, "Practitioner", [("family", "fam3"), ("_count", "20")])
    assert page.total == 6 and not any("count(" in s for s in seen)  # all on the first page: free


def test_the_family_page_reads_only_the_records_it_serves(store: Store) -> None:
    """The page's ids come from the string index alone (keyset on the id, past the cursor), and
    only those records are read: the practitioner table is joined to the page's ids, not searched
    with the criterion."""
    _fill(store)
    seen, first = _statements(store, "Practitioner", [("family", "fam3"), ("_count", "4")])
    seen = [s for s in seen if not s.startswith("with recursive")]  # the names in the prefix
    assert len(seen) == 1 and "limit" in seen[0], seen
    inner = seen[0].split(" from (", 1)[1]
    assert "from search_string" in inner and "practitioner" not in inner.split(") as page")[0], seen[0]
    assert first.next_cursor is not None
    cursor = ("_cursor", first.next_cursor)
    rest = search.parse_query("Practitioner", [("family", "fam3"), ("_count", "4"), cursor])
    with store.reader.connect() as conn:
        second = search.execute(conn, rest)
    ids = [m[0] for m in first.matches + second.matches]
    assert len(ids) == 6 and ids == sorted(set(ids)) and second.next_cursor is None


def test_an_estimated_total_is_bounded(store: Store, monkeypatch: Any) -> None:
    """``_total=estimate`` counts at most ESTIMATE_BOUND matches: exact below it; past it a lower
    bound (SQLite) or the planner's estimate (PostgreSQL), with a warning saying which."""
    _fill(store)
    params = [("family", "fam3"), ("_count", "2"), ("_total", "estimate")]
    _, page = _statements(store, "Practitioner", params)
    assert page.total == 6 and not page.warnings
    monkeypatch.setattr(search, "ESTIMATE_BOUND", 3)
    _, page = _statements(store, "Practitioner", params)
    assert len(page.matches) == 2 and len(page.warnings) == 1, page.warnings
    if store.dialect == "sqlite":
        assert page.total == 3 and "lower bound" in page.warnings[0]
    else:
        assert page.total is not None and page.total >= 4 and "estimate" in page.warnings[0]


def _page_through(store: Store, params: list[tuple[str, str]]) -> list[str]:
    ids: list[str] = []
    query = search.parse_query("Practitioner", params)
    while True:
        with store.reader.connect() as conn:
            page = search.execute(conn, query)
        ids += [rid for rid, _ in page.matches]
        if page.next_cursor is None:
            return ids
        query = search.parse_query("Practitioner", [*params, ("_cursor", page.next_cursor)])


def test_a_prefix_is_paged_value_by_value(store: Store, monkeypatch: Any) -> None:
    """A prefix matching few distinct names is paged name by name (each name's ids are in
    id order in the lookup index), so a page reads about _count index entries per name, not every
    match; the pages are those of the plain index-only page: every match once, in id order, a
    record with two matching names once."""
    _fill(store)
    two = RecordWrite(
        "two", "Practitioner", "urn:npi", "N-two", {"name": [{"family": "Fam1son"}, {"family": "Fam2son"}]}
    )
    with store.writer.begin() as conn:
        Repository(conn).apply(MappingResult(records=[two]))
    params = [("family", "fam"), ("_count", "3")]  # Fam0son .. Fam6son: seven names
    seen, _ = _statements(store, "Practitioner", params)
    assert any(s.startswith("with recursive") for s in seen), seen
    by_name = _page_through(store, params)
    assert len(by_name) == 41 and by_name == sorted(set(by_name))
    monkeypatch.setattr(search, "MAX_PREFIX_VALUES", 2)  # too many names: every match is read instead
    assert _page_through(store, params) == by_name
    assert _page_through(store, [("family", "fam1"), ("_count", "2")]) == sorted(
        set(_page_through(store, [("family", "fam1son"), ("_count", "50")]))
    )
    assert _page_through(store, [("family", "zzz")]) == []
