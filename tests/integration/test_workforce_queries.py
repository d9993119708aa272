"""The workforce API reads only what a request is about: the overlap check reads the shifts of one
employee around the new shift, a timecard the employee's timecards of its week, a list page the
records it shows. Many unrelated employees' shifts (all at the same times) are in the store, every
statement that reads the shift or timecard table is served by an index (SQLite: EXPLAIN QUERY
PLAN; PostgreSQL: EXPLAIN with sequential scans discouraged), and the answers are those of the
rules applied to every record (what the API computed before it used the index)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, delete, event
from sqlalchemy.engine import Engine as SAEngine

from hms_ach.app.runtime import Engine
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.models import SearchDate
from hms_ach.store.repository import Repository
from hms_ach.workforce import settings as workforce_settings
from hms_ach.workforce.api import overtime_of_page, shift_view, timecard_view
from hms_ach.workforce.overtime import overtime_by_timecard
from hms_ach.workforce.rules import overlapping_shift, week_start
from hms_ach.workforce.settings import WorkforceSettings
from tests.integration.engine_helpers import auth_headers

MONDAY = datetime(2026, 11, 30, 7, tzinfo=UTC)  # ISO week 49 of 2026
STAFF = 150
READS = re.compile(r"\b(FROM|JOIN)\s+(shift|timecard)\b", re.IGNORECASE)


def _fill(store: Store, staff: int = STAFF) -> list[str]:
    """``staff`` employees, each with a 12-hour shift and a 10-hour timecard at 07:00 Monday to
    Thursday (the same times for all), plus unfilled shifts and timecards of nobody on the roster."""
    records = []
    for i in range(staff):
        records.append(
            RecordWrite(
                f"p{i}",
                "Practitioner",
                "urn:hms-ach:id:staff",
                f"E{i}",
                {"name": [{"family": f"Staff{i}"}], "active": True},
            )
        )
        for d in range(4):
            start = MONDAY + timedelta(days=d)
            records.append(
                RecordWrite(
                    f"s{i}.{d}",
                    "Shift",
                    "urn:hms-ach:id:shift",
                    f"S{i}.{d}",
                    {
                        "identifier": [{"system": "urn:hms-ach:id:shift", "value": f"S{i}.{d}"}],
                        "practitioner": {"reference": f"@p{i}"},
                        "status": "cancelled" if (i, d) == (1, 1) else "planned",
                        "start": start.isoformat(),
                        "end": (start + timedelta(hours=12)).isoformat(),
                    },
                )
            )
            records.append(
                RecordWrite(
                    f"t{i}.{d}",
                    "Timecard",
                    "urn:hms-ach:id:timecard",
                    f"T{i}.{d}",
                    {
                        "identifier": [{"system": "urn:hms-ach:id:timecard", "value": f"T{i}.{d}"}],
                        "practitioner": {"reference": f"@p{i}"},
                        "clockIn": (start + timedelta(hours=i % 3)).isoformat(),
                        "clockOut": (start + timedelta(hours=10 + i % 3)).isoformat(),
                        "workedMinutes": 600,
                    },
                )
            )
    for d in range(3):
        start = MONDAY + timedelta(days=d)
        records.append(
            RecordWrite(
                f"u{d}",
                "Shift",
                "urn:hms-ach:id:shift",
                f"U{d}",
                {
                    "identifier": [{"system": "urn:hms-ach:id:shift", "value": f"U{d}"}],
                    "status": "planned",
                    "start": start.isoformat(),
                    "end": (start + timedelta(hours=8)).isoformat(),
                },
            )
        )
        records.append(
            RecordWrite(
                f"v{d}",
                "Timecard",
                "urn:hms-ach:id:timecard",
                f"V{d}",
                {
                    "identifier": [{"system": "urn:hms-ach:id:timecard", "value": f"V{d}"}],
                    "clockIn": start.isoformat(),
                    "clockOut": (start + timedelta(hours=9)).isoformat(),
                    "workedMinutes": 540,
                },
            )
        )
    with store.writer.begin() as conn:
        out = Repository(conn).apply(MappingResult(records=records))
    return [o.id for o in out if o.resource_type == "Practitioner"]


@contextmanager
def _statements() -> Iterator[list[tuple[str, Any]]]:
    """Every SELECT that reads the shift or timecard table, on any engine (the API's too)."""
    seen: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and READS.search(statement):
            seen.append((statement, parameters))

    event.listen(SAEngine, "before_cursor_execute", grab)
    try:
        yield seen
    finally:
        event.remove(SAEngine, "before_cursor_execute", grab)


def _assert_indexed(store: Store, statements: list[tuple[str, Any]]) -> None:
    """No statement reads the whole shift or timecard table."""
    assert statements
    with store.reader.connect() as conn:
        for sql, params in statements:
            with conn.begin():
                if conn.dialect.name == "sqlite":
                    plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
                    bad = [p for p in plan if re.match(r"SCAN (shift|timecard)\b", p)]
                else:
                    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                    plan = [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + sql, params)]
                    bad = [p for p in plan if re.search(r"Seq Scan on (shift|timecard)\b", p)]
            assert not bad, (sql, plan)


def _all(conn: Connection, rtype: str) -> list[dict[str, Any]]:
    return wq.all_records(conn, rtype)


def shift_overlap(conn: Any, who: str, start: datetime, end: datetime, skip: str | None) -> str | None:
    """The overlap rule over the candidates the index reads (the one check of every write path)."""
    return overlapping_shift(wq.overlap_candidates(conn, who, start, end), who, start, end, skip)


def test_the_overlap_check_reads_one_employees_shifts_around_the_window(store: Store) -> None:
    staff = _fill(store)
    me = f"Practitioner/{staff[0]}"
    with store.reader.connect() as conn:
        mine = {
            s["start"][:10]: s["id"]
            for s in _all(conn, "Shift")
            if (s.get("practitioner") or {}).get("reference") == me
        }
        tuesday = MONDAY + timedelta(days=1)
        with _statements() as seen:
            # every employee works Tuesday 07:00-19:00; only mine is read, and it is the clash
            found = wq.overlap_candidates(
                conn, me, tuesday + timedelta(hours=3), tuesday + timedelta(hours=5)
            )
            clash = shift_overlap(conn, me, tuesday + timedelta(hours=3), tuesday + timedelta(hours=5), None)
            # back to back is no overlap; the shift being replaced is not a clash with itself
            after = shift_overlap(
                conn, me, tuesday + timedelta(hours=12), tuesday + timedelta(hours=14), None
            )
            itself = shift_overlap(conn, me, tuesday, tuesday + timedelta(hours=1), mine["2026-12-01"])
            # Tuesday 18:00 to Thursday 18:00 overlaps three of them: the earliest is named
            two = shift_overlap(conn, me, tuesday + timedelta(hours=11), tuesday + timedelta(days=2), None)
    assert [s["id"] for s in found] == [mine["2026-12-01"]]
    assert clash == mine["2026-12-01"] and after is None and itself is None
    assert two == mine["2026-12-01"]
    assert all(staff[0] in str(p) for _sql, p in seen)  # every read names the employee
    _assert_indexed(store, seen)

    # a cancelled shift is no clash (employee 1 cancelled Tuesday's)
    with store.reader.connect() as conn:
        assert (
            shift_overlap(conn, f"Practitioner/{staff[1]}", tuesday, tuesday + timedelta(hours=1), None)
            is None
        )


def test_the_fhir_overlap_query_and_the_rule_give_the_same_answers(store: Store) -> None:
    """The overlap rule over the candidates the index reads (every write path: /api/v1, FHIR, CSV)
    decides as over every shift."""
    staff = _fill(store, staff=3)
    tuesday = MONDAY + timedelta(days=1)
    windows = [
        (tuesday + timedelta(hours=h), tuesday + timedelta(hours=h + n))
        for h in (-30, 0, 11, 12)
        for n in (1, 40)
    ]
    with store.reader.connect() as conn:
        shifts = _all(conn, "Shift")
        for who in [f"Practitioner/{p}" for p in staff] + ["Practitioner/nobody"]:
            for skip in [None, *(s["id"] for s in shifts[:3])]:
                for start, end in windows:
                    candidates = wq.overlap_candidates(conn, who, start, end)
                    # the candidates are a superset: the rule over every shift agrees
                    assert overlapping_shift(shifts, who, start, end, skip) == overlapping_shift(
                        candidates, who, start, end, skip
                    )


def test_a_shift_indexed_before_its_end_was_is_still_checked(store: Store) -> None:
    """Stores written before Shift ``end`` was declared have no end rows (there is no reindex)."""
    staff = _fill(store, staff=3)
    me = f"Practitioner/{staff[2]}"
    ix = SearchDate.__table__  # type: ignore[attr-defined]
    with store.writer.begin() as conn:
        conn.execute(delete(ix).where(ix.c.resource_type == "Shift", ix.c.param == "end"))
    tuesday = MONDAY + timedelta(days=1)
    with store.reader.connect() as conn:
        clash = shift_overlap(conn, me, tuesday + timedelta(hours=11), tuesday + timedelta(hours=13), None)
        assert clash is not None
        assert wq.get_record(conn, "Shift", clash)["start"].startswith("2026-12-01")  # type: ignore[index]
        # only shifts starting before the window's end are read
        assert len(wq.overlap_candidates(conn, me, tuesday, tuesday + timedelta(hours=1))) == 2


def test_timecards_are_read_by_employee_and_week(store: Store) -> None:
    staff = _fill(store)
    me = f"Practitioner/{staff[4]}"
    wednesday = MONDAY + timedelta(days=2, hours=4)  # employee 4 clocks in at 08:00
    with store.reader.connect() as conn:
        with _statements() as seen:
            earlier = wq.practitioner_timecards(conn, me, [(week_start(wednesday), wednesday)])
            week = wq.timecards_in_weeks(conn, me, [week_start(wednesday)])
            nobody = wq.timecards_in_weeks(conn, None, [week_start(wednesday)])
        cards = _all(conn, "Timecard")
        page = [c for c in cards if c["identifier"][0]["value"] in ("T4.3", "T7.2", "V2", "T9.0")]
        with _statements() as page_reads:
            overtime = overtime_of_page(conn, page)
    assert sorted(c["clockIn"][:10] for c in earlier) == ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert len(week) == 4 and all(c["practitioner"]["reference"] == me for c in week)
    assert sorted(c["identifier"][0]["value"] for c in nobody) == ["V0", "V1", "V2"]
    _assert_indexed(store, seen + page_reads)
    # the same overtime as the rule over every timecard
    everyone = overtime_by_timecard(cards)
    assert {c["id"]: overtime.get(c["id"], 0) for c in page} == {c["id"]: everyone[c["id"]] for c in page}
    assert all(overtime[c["id"]] > 0 for c in page)  # 10 h (9 h for nobody's) a day


# ---------------------------------------------------------------------------- through the API
@pytest.fixture
async def api(fhir_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}", timeout=30, headers=auth_headers(fhir_engine)
    ) as client:
        yield client


async def _pages(api: httpx.AsyncClient, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        resp = await api.get(path, params={**params, "limit": 7, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["items"]) <= 7
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


@pytest.fixture
def no_rest_rule(fhir_engine: Engine) -> Iterator[None]:
    """The filled roster leaves no 8 h rest around a new shift: these tests are about the reads."""
    workforce_settings.use(WorkforceSettings(min_rest_hours=0))
    yield
    workforce_settings.use(WorkforceSettings())


@pytest.mark.usefixtures("no_rest_rule")
async def test_the_api_reads_through_the_index_with_the_same_answers(
    api: httpx.AsyncClient, store: Store
) -> None:
    staff = _fill(store)
    me = staff[5]
    tuesday = MONDAY + timedelta(days=1)

    def shift(start: datetime, hours: int = 4) -> dict[str, Any]:
        return {
            "employee_id": me,
            "start": start.isoformat(),
            "end": (start + timedelta(hours=hours)).isoformat(),
        }

    with _statements() as seen:
        clash = await api.post("/api/v1/shifts", json=shift(tuesday + timedelta(hours=2)))
        assert clash.status_code == 422 and clash.json()["errors"][0]["location"] == "body.start", clash.text
        made = await api.post("/api/v1/shifts", json=shift(tuesday + timedelta(hours=12)))
        assert made.status_code == 201, made.text
        moved = await api.put(
            f"/api/v1/shifts/{made.json()['id']}", json=shift(tuesday + timedelta(hours=13))
        )
        assert moved.status_code == 200, moved.text
        mine = (await api.get("/api/v1/shifts", params={"employee_id": me})).json()["items"]
        assert len(mine) == 5
        card = await api.post(
            "/api/v1/timecards",
            json={
                "employee_id": me,
                "clock_in": (tuesday + timedelta(hours=13)).isoformat(),
                "clock_out": (tuesday + timedelta(hours=15)).isoformat(),
            },
        )
        # Tuesday: 10 h already (employee 5 works 09:00-19:00), so all 2 h are over the 8 h day
        assert card.status_code == 201 and card.json()["overtime_minutes"] == 120, card.text
        cards = (await api.get("/api/v1/timecards", params={"employee_id": me})).json()["items"]
        assert len(cards) == 5
    assert any("search_date" in sql for sql, _p in seen)  # the API's own statements are seen
    _assert_indexed(store, seen)

    # lists: every filter, paged, gives what the rules over every record give
    with store.reader.connect() as conn:
        shifts = sorted((shift_view(s) for s in _all(conn, "Shift")), key=lambda s: s["id"])
        timecards = _all(conn, "Timecard")
    wed = MONDAY + timedelta(days=2)
    cases: list[tuple[dict[str, Any], Any]] = [
        ({}, lambda s: True),
        ({"employee_id": me}, lambda s: s["employee_id"] == me),
        ({"employee_id": "nobody"}, lambda s: False),
        ({"status": "cancelled"}, lambda s: s["status"] == "cancelled"),
        ({"unfilled": "true"}, lambda s: s["employee_id"] is None),
        ({"unfilled": "false", "employee_id": staff[1]}, lambda s: s["employee_id"] == staff[1]),
        (
            {"start_from": wed.isoformat(), "start_before": (wed + timedelta(days=1)).isoformat()},
            lambda s: wed <= datetime.fromisoformat(s["start"]) < wed + timedelta(days=1),
        ),
        (
            {"employee_id": me, "start_from": wed.isoformat()},
            lambda s: s["employee_id"] == me and datetime.fromisoformat(s["start"]) >= wed,
        ),
    ]
    for params, keep in cases:
        got = await _pages(api, "/api/v1/shifts", params)
        assert [s["id"] for s in got] == [s["id"] for s in shifts if keep(s)], params
    overtime = overtime_by_timecard(timecards)
    want = sorted(
        ({**timecard_view(t), "overtime_minutes": overtime.get(t["id"], 0)} for t in timecards),
        key=lambda t: t["id"],
    )
    assert await _pages(api, "/api/v1/timecards", {}) == want
    assert await _pages(api, "/api/v1/timecards", {"employee_id": me}) == [
        t for t in want if t["employee_id"] == me
    ]
    employees = await _pages(api, "/api/v1/employees", {"active": "true"})
    assert [e["id"] for e in employees] == sorted(staff)
