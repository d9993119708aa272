"""``GET /fhir/AuditEvent`` as a FHIR search like the others (found by the conformance crawl): paging
ends although every page read is itself recorded, every parameter takes ``:missing``, unknown
parameters are ignored with a warning unless ``Prefer: handling=strict``, and cursors or ids past the
trail's key range are answered, not a 500 on PostgreSQL. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import FHIR_JSON, nurse

pytestmark = pytest.mark.timeout(120)


async def _trail(http: httpx.AsyncClient, writes: int) -> None:
    """``writes`` change entries, then as many access records, all committed before returning."""
    for i in range(writes):
        r = await http.post("/Practitioner", json=nurse(f"AE{i}", f"Trail{i}"), headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        assert (await http.get(f"/Practitioner/{r.json()['id']}")).status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # access records are written in the background
        r = await http.get("/AuditEvent?subtype=read&_count=200")
        if len([e for e in r.json()["entry"] if e["search"]["mode"] == "match"]) >= writes:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the access records were not written within 15 s")


def _next(bundle: dict[str, Any]) -> str | None:
    url: str | None = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    if url is None:
        return None
    parts = urlsplit(url)
    return parts.path.removeprefix("/fhir") + "?" + parts.query


async def test_paging_the_trail_ends_at_the_snapshot_of_its_first_page(
    fhir_engine: Engine, http: httpx.AsyncClient
) -> None:
    await _trail(http, 6)
    url: str | None = "/AuditEvent?_count=1"  # one a page: without the snapshot, each page adds one
    seen: list[str] = []
    pages = 0
    while url is not None:
        pages += 1
        assert pages < 40, "paging did not end"
        bundle = (await http.get(url)).json()
        seen += [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
        url = _next(bundle)
        await asyncio.sleep(0.25)  # the access record of this page is written meanwhile (0.2 s flushes)
    assert len(seen) == len(set(seen)), "a page repeated an entry"
    # the first page's snapshot: the 6 creates, their 6 reads, the earlier trail searches; nothing
    # recorded while paging (each page is an access record of its own)
    assert 12 <= len(seen) < 12 + 10, len(seen)


async def test_missing_and_lenient_handling(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    await _trail(http, 2)
    every = (await http.get("/AuditEvent?_count=200")).json()
    matches = [e for e in every["entry"] if e["search"]["mode"] == "match"]
    r = await http.get("/AuditEvent?agent:missing=false&_count=200")
    assert r.status_code == 200 and len(r.json()["entry"]) >= len(matches)
    r = await http.get("/AuditEvent?date:missing=true")
    assert r.status_code == 200 and r.json()["entry"] == [] and r.json()["total"] == 0
    with_patient = (await http.get("/AuditEvent?patient:missing=false&_count=200")).json()
    assert with_patient["entry"] == []  # the trail so far names Practitioners only
    r = await http.get("/AuditEvent?entity:missing=maybe")
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["entity:missing"]
    r = await http.get("/AuditEvent?no-such-parameter=1&_count=200")
    assert r.status_code == 200
    outcome = [e["resource"] for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and "no-such-parameter" in outcome[0]["issue"][0]["diagnostics"]
    assert outcome[0]["issue"][0]["severity"] == "warning"
    r = await http.get("/AuditEvent?no-such-parameter=1", headers={"prefer": "handling=strict"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


async def test_cursors_and_ids_past_the_key_range_are_answered(
    fhir_engine: Engine, http: httpx.AsyncClient
) -> None:
    await _trail(http, 1)
    huge = str(2**62)
    r = await http.get(f"/AuditEvent?_cursor={huge}&_access_cursor={huge}&_upto={huge}&_access_upto={huge}")
    assert r.status_code == 200, r.text
    assert [e for e in r.json()["entry"] if e["search"]["mode"] == "match"] == []
    r = await http.get("/AuditEvent?_cursor=5000000000&_access_upto=99999999999")
    assert r.status_code == 200, r.text
    for rid in ("audit-5000000000", "access-999999999999999999"):
        r = await http.get(f"/AuditEvent/{rid}")
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome", r.text
