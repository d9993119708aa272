"""Searches on SQLite run on the event loop within a deadline, and again on a read thread past it.

What users rely on: a search answers the same bundle wherever it ran; a search that runs past
the deadline is never answered from its interrupted run (nothing half-read, nothing counted twice
in the access record) but run again in full; the connection it was interrupted on serves the next
reads without the deadline; and the metric says where searches ran.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from hms_ach.app.http import create_app
from hms_ach.core import metrics
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.fhir import read as reads
from hms_ach.fhir import routes
from hms_ach.store import db
from hms_ach.store.db import Store, read_budget
from hms_ach.store.repository import Repository
from hms_ach.store.search import EVERYTHING
from tests.conftest import empty_store
from tests.integration.engine_helpers import auth_headers, local_authenticator

#: A statement that takes SQLite far longer than any budget below (a count to fifty million).
SLOW = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000000) SELECT count(*) FROM n"
STAFF = "urn:test:staff"


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    with empty_store("sqlite", tmp_path) as s:
        assert s.bounded_reads
        with s.writer.begin() as conn:
            Repository(conn).apply(
                MappingResult(
                    records=[
                        RecordWrite(
                            f"p{i}", "Practitioner", STAFF, f"S{i}", {"name": [{"family": f"Okafor{i}"}]}
                        )
                        for i in range(3)
                    ]
                )
            )
        yield s


def test_a_read_past_its_budget_is_interrupted_and_its_connection_serves_the_next_read_in_full(
    sqlite_store: Store,
) -> None:
    with read_budget(0.02) as budget, pytest.raises(OperationalError, match="interrupted"):
        with sqlite_store.read() as conn:
            conn.execute(text(SLOW)).scalar_one()
    assert budget.spent
    with read_budget(5.0) as quick:
        with sqlite_store.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM practitioner")).scalar_one() == 3
    assert not quick.spent
    # outside a budget the kept connection has no deadline left on it
    with sqlite_store.read() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        assert conn.execute(text(SLOW.replace("50000000", "300000"))).scalar_one() == 300000


def test_a_search_past_the_deadline_is_dropped_whole(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "INLINE_SEARCH_SECONDS", 0.0)
    monkeypatch.setattr(db, "BUDGET_STEPS", 1)  # look at the deadline on every step
    seen = reads.Seen()
    params = [("family", "Okafor")]
    search = functools.partial(
        reads.search_type, sqlite_store, "http://x/fhir", "Practitioner", params, False, EVERYTHING, seen
    )
    assert routes._search_inline(search, seen) is None
    assert seen.refs == [] and seen.count is None

    monkeypatch.setattr(routes, "INLINE_SEARCH_SECONDS", 5.0)
    answer = routes._search_inline(search, seen)
    assert answer is not None and answer.status_code == 200
    assert seen.count == 3 and len(seen.refs) == 3


def _ran(label: str) -> float:
    return metrics.FHIR_SEARCHES.labels(label)._value.get()  # type: ignore[no-any-return]


async def test_the_api_answers_the_same_bundle_on_the_loop_and_after_the_deadline(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = local_authenticator(tmp_path / "data")
    app = create_app(sqlite_store, authenticator=auth)
    transport = httpx.ASGITransport(app=app)

    async def family() -> dict[str, Any]:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=auth_headers(auth)
        ) as c:
            r = await c.get("/fhir/Practitioner", params={"family": "okafor", "_count": "2"})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    loop0, after0 = _ran("event_loop"), _ran("read_thread_after_deadline")
    on_loop = await family()
    assert (_ran("event_loop"), _ran("read_thread_after_deadline")) == (loop0 + 1, after0)

    monkeypatch.setattr(routes, "INLINE_SEARCH_SECONDS", 0.0)
    monkeypatch.setattr(db, "BUDGET_STEPS", 1)
    again = await family()
    assert (_ran("event_loop"), _ran("read_thread_after_deadline")) == (loop0 + 1, after0 + 1)

    def ids(bundle: dict[str, Any]) -> list[str]:
        return [e["resource"]["id"] for e in bundle["entry"]]

    assert len(ids(on_loop)) == 2 and ids(again) == ids(on_loop)
    assert [link for link in again["link"] if link["relation"] == "next"]
