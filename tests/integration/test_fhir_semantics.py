"""Exact FHIR R4 REST semantics (issue 15) against a running engine with a fhir_rest channel: code
tokens through their implicit system, ``:missing`` on every parameter type, ``ap``, clear errors for
bad date values, the update id rules, ``Prefer: return=``, ``Accept`` on writes, HEAD,
``If-Modified-Since``, AuditEvent read and ``_lastUpdated``, shifts answered as ``Basic`` (parsed by
fhirclient). SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
from fhirclient.models.bundle import Bundle as ClientBundle
from fhirpy import AsyncFHIRClient

from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import FHIR_JSON, STAFF, auth_headers, basic_shift

GENDER = "http://hl7.org/fhir/administrative-gender"


def nurse(number: str, family: str = "Osei", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": STAFF, "value": number}],
        "name": [{"family": family, "given": ["Amara"]}],
        **extra,
    }


def outcome(resp: httpx.Response, status: int, text: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    if text is not None:
        assert text in body["issue"][0]["diagnostics"], body
    return body


async def ids(http: httpx.AsyncClient, query: str) -> set[str]:
    resp = await http.get(f"/Practitioner?{query}")
    assert resp.status_code == 200, resp.text
    return {e["resource"]["id"] for e in resp.json().get("entry", [])}


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    resp = await http.post(f"/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["id"]
    return rid


async def test_search_semantics(http: httpx.AsyncClient) -> None:
    female = await create(http, nurse("S1", gender="female", birthDate="1980-05-01"))
    male = await create(http, nurse("S2", gender="male"))
    plain = await create(
        http, nurse("S3", qualification=[{"code": {"text": "RN"}, "period": {"start": "2020"}}])
    )

    # a code element's token matches through its implicit system, with or without it
    assert await ids(http, f"gender={GENDER}|female") == {female}
    assert await ids(http, "gender=female") == {female}
    assert await ids(http, f"gender={GENDER}|male,{GENDER}|female") == {female, male}
    assert await ids(http, "gender=http://example.org/other|female") == set()

    # :missing on a token, a string, a date (indexed or not) and on _id / _lastUpdated
    assert await ids(http, "gender:missing=true") == {plain}
    assert await ids(http, "gender:missing=false") == {female, male}
    assert await ids(http, "qualification-period:missing=false") == {plain}
    assert await ids(http, "qualification-period:missing=true") == {female, male}
    assert await ids(http, "_id:missing=true") == set()
    assert await ids(http, "_lastUpdated:missing=false") == {female, male, plain}
    assert await ids(http, "family:missing=true") == set()

    # ap: approximately (the value's range widened by a tenth of its distance from now)
    now = datetime.now(UTC)
    assert await ids(http, f"_lastUpdated=ap{now.date().isoformat()}") == {female, male, plain}
    assert await ids(http, f"_lastUpdated=ap{(now - timedelta(days=400)).date().isoformat()}") == set()
    assert await ids(http, "qualification-period=ap2020-01-05") == {plain}
    assert await ids(http, "qualification-period=ap1990") == set()

    # bad values say what a date search value is, never "prefix 'no'"
    body = outcome(await http.get("/Practitioner?_lastUpdated=now"), 400, "is not a date search value")
    assert "prefix 'no'" not in body["issue"][0]["diagnostics"]
    outcome(await http.get("/Practitioner?qualification-period=2020-13"), 400, "2020-13")
    outcome(await http.get("/Practitioner?gender:missing=maybe"), 400, "true or false")


async def test_update_id_rules(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("U1"))
    other = await create(http, nurse("U2"))
    # PUT without a body id, or with another id: 400, nothing written
    outcome(await http.put(f"/Practitioner/{rid}", json=nurse("U1", "Mensah"), headers=FHIR_JSON), 400, "id")
    outcome(
        await http.put(f"/Practitioner/{rid}", json=nurse("U1", "Mensah", id=other), headers=FHIR_JSON),
        400,
        "is not the id in the URL",
    )
    # a conditional update whose body id is not the matched record's: 400
    outcome(
        await http.put(f"/Practitioner?identifier={STAFF}|U1", json=nurse("U1", id=other), headers=FHIR_JSON),
        400,
        "conditional update matches",
    )
    assert (await http.get(f"/Practitioner/{rid}")).headers["etag"] == 'W/"1"'
    # the matched id, or none, is accepted
    ok = await http.put(
        f"/Practitioner?identifier={STAFF}|U1", json=nurse("U1", "B", id=rid), headers=FHIR_JSON
    )
    assert ok.status_code == 200 and ok.json()["id"] == rid
    ok = await http.put(f"/Practitioner?identifier={STAFF}|U1", json=nurse("U1", "C"), headers=FHIR_JSON)
    assert ok.status_code == 200 and ok.json()["id"] == rid
    # in a transaction too
    tx: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": nurse("U1", "D"), "request": {"method": "PUT", "url": f"Practitioner/{rid}"}}],
    }
    outcome(await http.post("", json=tx, headers=FHIR_JSON), 400, "must carry the id")


async def test_prefer_return_and_accept(http: httpx.AsyncClient) -> None:
    minimal = await http.post(
        "/Practitioner", json=nurse("P1"), headers={**FHIR_JSON, "Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["etag"] == 'W/"1"' and "/Practitioner/" in minimal.headers["location"]
    rid = minimal.headers["location"].split("/Practitioner/")[1].split("/")[0]

    said = await http.put(
        f"/Practitioner/{rid}",
        json=nurse("P1", "Mensah", id=rid),
        headers={**FHIR_JSON, "Prefer": "return=OperationOutcome"},
    )
    body = outcome(said, 200, f"Practitioner/{rid} updated")
    assert body["issue"][0]["severity"] == "information"

    full = await http.put(
        f"/Practitioner/{rid}",
        json=nurse("P1", "Owusu", id=rid),
        headers={**FHIR_JSON, "Prefer": "return=representation"},
    )
    assert full.json()["name"][0]["family"] == "Owusu"

    # in a transaction: no resources (minimal), an outcome per entry (OperationOutcome)
    tx: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": nurse("P2"), "request": {"method": "POST", "url": "Practitioner"}}],
    }
    resp = await http.post("", json=tx, headers={**FHIR_JSON, "Prefer": "return=minimal"})
    entry = resp.json()["entry"][0]
    assert "resource" not in entry and entry["response"]["status"] == "201 Created"
    tx["entry"][0]["resource"] = nurse("P3")
    resp = await http.post("", json=tx, headers={**FHIR_JSON, "Prefer": "return=OperationOutcome"})
    entry = resp.json()["entry"][0]
    assert "resource" not in entry
    assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"

    # Accept on writes: XML is refused before anything is written
    refused = await http.post(
        "/Practitioner", json=nurse("P4"), headers={**FHIR_JSON, "Accept": "application/fhir+xml"}
    )
    outcome(refused, 406)
    assert await ids(http, f"identifier={STAFF}|P4") == set()
    fine = await http.post(
        "/Practitioner", json=nurse("P4"), headers={**FHIR_JSON, "Accept": "application/json"}
    )
    assert fine.status_code == 201


async def test_head_and_if_modified_since(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("H1"))
    got = await http.get(f"/Practitioner/{rid}")
    for url in (
        f"/Practitioner/{rid}",
        "/Practitioner?_count=5",
        "/metadata",
        f"/Practitioner/{rid}/_history",
    ):
        head = await http.head(url)
        assert head.status_code == 200, url
        assert head.content == b""
        assert head.headers["content-type"].startswith("application/fhir+json")
    head = await http.head(f"/Practitioner/{rid}")
    assert head.headers["etag"] == got.headers["etag"]
    assert head.headers["last-modified"] == got.headers["last-modified"]
    assert head.headers["content-length"] == got.headers["content-length"]
    assert (await http.head("/Practitioner/unknown")).status_code == 404

    # If-Modified-Since: 304 when not changed since, 200 when changed after
    later = format_datetime(datetime.now(UTC) + timedelta(minutes=1), usegmt=True)
    earlier = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    same = got.headers["last-modified"]
    not_modified = await http.get(f"/Practitioner/{rid}", headers={"If-Modified-Since": same})
    assert not_modified.status_code == 304 and not_modified.headers["etag"] == 'W/"1"'
    assert (await http.get(f"/Practitioner/{rid}", headers={"If-Modified-Since": later})).status_code == 304
    assert (await http.get(f"/Practitioner/{rid}", headers={"If-Modified-Since": earlier})).status_code == 200
    # a header that is not an HTTP date is ignored; If-None-Match decides when both are sent
    assert (await http.get(f"/Practitioner/{rid}", headers={"If-Modified-Since": "soon"})).status_code == 200
    both = {"If-Modified-Since": later, "If-None-Match": 'W/"9"'}
    assert (await http.get(f"/Practitioner/{rid}", headers=both)).status_code == 200


async def test_audit_events_read_and_last_updated(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("A1"))
    await http.get(f"/Practitioner/{rid}")
    today = datetime.now(UTC).date().isoformat()
    found = await http.get(
        "/AuditEvent", params={"_lastUpdated": f"ge{today}", "entity": f"Practitioner/{rid}"}
    )
    assert found.status_code == 200, found.text
    entries = found.json()["entry"]
    assert entries
    for item in entries:  # every fullUrl resolves to the same resource
        read = await http.get(item["fullUrl"])
        assert read.status_code == 200, item["fullUrl"]
        assert read.json() == item["resource"]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    later = await http.get("/AuditEvent", params={"_lastUpdated": f"gt{tomorrow}"})
    assert later.json().get("entry", []) == []
    outcome(await http.get("/AuditEvent/audit-999999"), 404)
    outcome(await http.get("/AuditEvent/nothing"), 404)
    outcome(await http.get("/AuditEvent", params={"_lastUpdated": "now"}), 400)


async def test_a_shift_is_answered_as_basic_that_fhirclient_parses(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("B1"))
    shift = basic_shift("SEM-1", rid)
    for kind in ("transaction", "batch"):
        shift["identifier"][0]["value"] = f"SEM-{kind}"
        day = "02" if kind == "batch" else "01"  # no overlap with the other shift
        shift["extension"][0]["valuePeriod"] = {
            "start": f"2026-12-{day}T07:00:00Z",
            "end": f"2026-12-{day}T15:00:00Z",
        }
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {"resource": shift, "request": {"method": "POST", "url": "Basic"}},
                {"resource": nurse(f"B2{kind}"), "request": {"method": "POST", "url": "Practitioner"}},
            ],
        }
        resp = await http.post("", json=bundle, headers=FHIR_JSON)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert "Shift" not in resp.text
        parsed = ClientBundle(body)  # strict R4 models: raises on an unknown resource type
        assert parsed.type == f"{kind}-response"
        first, second = body["entry"]
        assert first["resource"]["resourceType"] == "Basic" and "fullUrl" not in first
        assert first["response"]["status"] == "201 Created"
        # every fullUrl of the answer resolves
        assert (await http.get(second["fullUrl"])).status_code == 200


async def test_batch_entries_are_independent_and_may_read(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("K1", "Kwame"))
    batch: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": nurse("K2"), "request": {"method": "POST", "url": "Practitioner"}},
            {
                "resource": {"resourceType": "Practitioner", "gender": "robot"},
                "request": {"method": "POST", "url": "Practitioner"},
            },
            {"request": {"method": "PATCHY", "url": "Practitioner"}},
            {"resource": nurse("K3"), "request": {"method": "POST", "url": "Nothing"}},
            {"request": {"method": "GET", "url": f"Practitioner/{rid}"}},
            {"request": {"method": "GET", "url": f"Practitioner?identifier={STAFF}|K2"}},
            {"request": {"method": "GET", "url": "Practitioner/unknown"}},
            {
                "resource": nurse("K1", "Kwame", id=rid),
                "request": {"method": "PUT", "url": f"Practitioner/{rid}"},
            },
        ],
    }
    resp = await http.post("", json=batch, headers=FHIR_JSON)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ClientBundle(body)  # fhirclient parses it
    statuses = [e["response"]["status"].split()[0] for e in body["entry"]]
    assert statuses == ["201", "422", "400", "404", "200", "200", "404", "200"], statuses
    for bad in (1, 2, 3, 6):
        assert body["entry"][bad]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert body["entry"][4]["resource"]["id"] == rid
    found = body["entry"][5]["resource"]
    assert found["resourceType"] == "Bundle" and found["type"] == "searchset" and found["total"] == 1
    assert await ids(http, f"identifier={STAFF}|K2") == {found["entry"][0]["resource"]["id"]}

    # a transaction is still all or nothing, and holds no GET
    tx = {**batch, "type": "transaction", "entry": batch["entry"][:1]}
    tx["entry"] = [*tx["entry"], {"request": {"method": "GET", "url": f"Practitioner/{rid}"}}]
    outcome(await http.post("", json=tx, headers=FHIR_JSON), 400, "not supported")


PATCH = {"content-type": "application/json-patch+json"}


async def test_json_patch(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("J1", "Osei", gender="female"))
    ops = [
        {"op": "test", "path": "/gender", "value": "female"},
        {"op": "replace", "path": "/name/0/family", "value": "Mensah"},
        {"op": "add", "path": "/name/0/given/-", "value": "Ama"},
    ]
    resp = await http.patch(f"/Practitioner/{rid}", json=ops, headers=PATCH)
    assert resp.status_code == 200, resp.text
    assert resp.headers["etag"] == 'W/"2"'
    assert resp.json()["name"][0] == {"family": "Mensah", "given": ["Amara", "Ama"]}
    assert (await http.get(f"/Practitioner/{rid}")).json()["name"][0]["family"] == "Mensah"

    # If-Match: a stale version is 412, the current one applies
    stale = await http.patch(
        f"/Practitioner/{rid}",
        json=[{"op": "replace", "path": "/name/0/family", "value": "X"}],
        headers={**PATCH, "If-Match": 'W/"1"'},
    )
    outcome(stale, 412)
    fresh = await http.patch(
        f"/Practitioner/{rid}",
        json=[{"op": "replace", "path": "/name/0/family", "value": "Owusu"}],
        headers={**PATCH, "If-Match": 'W/"2"', "Prefer": "return=minimal"},
    )
    assert fresh.status_code == 200 and fresh.content == b"" and fresh.headers["etag"] == 'W/"3"'

    # a failed test, a missing path: 422; a malformed document: 400; validated like an update
    outcome(
        await http.patch(
            f"/Practitioner/{rid}", json=[{"op": "test", "path": "/gender", "value": "male"}], headers=PATCH
        ),
        422,
    )
    outcome(
        await http.patch(
            f"/Practitioner/{rid}", json=[{"op": "remove", "path": "/telecom/3"}], headers=PATCH
        ),
        422,
    )
    outcome(await http.patch(f"/Practitioner/{rid}", json={"family": "x"}, headers=PATCH), 400)
    outcome(
        await http.patch(
            f"/Practitioner/{rid}", json=[{"op": "replace", "path": "/id", "value": "other"}], headers=PATCH
        ),
        400,
        "may not change",
    )
    outcome(
        await http.patch(
            f"/Practitioner/{rid}",
            json=[{"op": "replace", "path": "/gender", "value": "robot"}],
            headers=PATCH,
        ),
        422,
        "gender",
    )
    # not a JSON Patch: 415; unknown record: 404
    plain = {"content-type": "text/plain"}
    outcome(await http.patch(f"/Practitioner/{rid}", content=b"[]", headers=plain), 415, "JSON Patch")

    outcome(await http.patch("/Practitioner/unknown", json=ops, headers=PATCH), 404)
    assert (await http.get(f"/Practitioner/{rid}")).headers["etag"] == 'W/"3"'


async def test_patch_needs_the_update_scope(fhir_engine: Engine) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}/fhir",
        timeout=30,
        headers=auth_headers(fhir_engine),
    ) as full:
        rid = await create(full, nurse("J2"))
    reader = auth_headers(fhir_engine, scope="system/Practitioner.rs")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}/fhir", timeout=30, headers=reader
    ) as http:
        resp = await http.patch(
            f"/Practitioner/{rid}",
            json=[{"op": "replace", "path": "/name/0/family", "value": "X"}],
            headers=PATCH,
        )
        outcome(resp, 403)
        assert "update" in resp.json()["issue"][0]["diagnostics"]


def subsetted(resource: dict[str, Any]) -> bool:
    return any(t.get("code") == "SUBSETTED" for t in resource.get("meta", {}).get("tag", []))


async def test_summary_and_elements(http: httpx.AsyncClient) -> None:
    full = nurse(
        "E1",
        gender="female",
        birthDate="1980-05-01",
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Amara Osei</div>'},
        qualification=[{"code": {"text": "RN"}}],
    )
    rid = await create(http, full)
    stored = (await http.get(f"/Practitioner/{rid}")).json()
    assert not subsetted(stored)

    async def match(query: str) -> dict[str, Any]:
        resp = await http.get(f"/Practitioner?_id={rid}&{query}")
        assert resp.status_code == 200, resp.text
        found: dict[str, Any] = resp.json()["entry"][0]["resource"]
        return found

    summary = await match("_summary=true")  # qualification is not a summary element of Practitioner
    assert subsetted(summary) and "qualification" not in summary and "text" not in summary
    assert summary["gender"] == "female" and summary["name"] == stored["name"] and summary["id"] == rid
    # the mapping keeps no narrative: data leaves nothing out, text keeps only id and meta
    data = await match("_summary=data")
    assert "text" not in stored and data == stored
    text = await match("_summary=text")
    assert subsetted(text) and set(text) == {"resourceType", "id", "meta"}
    assert not subsetted(await match("_summary=false"))
    elements = await match("_elements=gender,Practitioner.birthDate")
    assert set(elements) == {"resourceType", "id", "meta", "gender", "birthDate"} and subsetted(elements)
    counted = (await http.get(f"/Practitioner?_id={rid}&_summary=count")).json()
    assert counted["total"] == 1 and "entry" not in counted
    outcome(await http.get("/Practitioner?_summary=maybe"), 400, "_summary")
    outcome(await http.get("/Practitioner?_elements=a-b"), 400, "_elements")

    # on a read too
    read = (await http.get(f"/Practitioner/{rid}", params={"_elements": "name"})).json()
    assert set(read) == {"resourceType", "id", "meta", "name"} and subsetted(read)
    read = (await http.get(f"/Practitioner/{rid}", params={"_summary": "true"})).json()
    assert subsetted(read) and "qualification" not in read
    outcome(await http.get(f"/Practitioner/{rid}", params={"_summary": "count"}), 400)


async def test_type_and_system_history(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    first = await create(http, nurse("Y1"))
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    second = await create(http, nurse("Y2"))
    changed = await http.put(
        f"/Practitioner/{first}", json=nurse("Y1", "Boateng", id=first), headers=FHIR_JSON
    )
    assert changed.status_code == 200
    org = await create(
        http,
        {
            "resourceType": "Organization",
            "name": "Ward 3",
            "identifier": [{"system": "urn:o", "value": "W3"}],
        },
    )

    def keys(body: dict[str, Any]) -> list[tuple[str, str]]:
        return [(e["fullUrl"].split("/fhir/")[1], e["response"]["etag"]) for e in body.get("entry", [])]

    typed = await http.get("/Practitioner/_history")
    assert typed.status_code == 200, typed.text
    assert typed.json()["type"] == "history"
    assert keys(typed.json()) == [
        (f"Practitioner/{first}", 'W/"2"'),
        (f"Practitioner/{second}", 'W/"1"'),
        (f"Practitioner/{first}", 'W/"1"'),
    ]
    ClientBundle(typed.json())
    system = (await http.get("/_history")).json()
    # the 4 versions written here, then the 2 shipped forms the engine published at start
    assert keys(system)[0] == (f"Organization/{org}", 'W/"1"') and len(keys(system)) == 6
    assert {k for k, _ in keys(system)[4:]} == {
        "Questionnaire/clinical-review-findings",
        "Questionnaire/complaint-resolution",
    }

    # _since: changed at or after; _at: the versions current then
    stamp = middle.isoformat().replace("+00:00", "Z")
    since = (await http.get("/Practitioner/_history", params={"_since": stamp})).json()
    assert keys(since) == [(f"Practitioner/{first}", 'W/"2"'), (f"Practitioner/{second}", 'W/"1"')]
    at = (await http.get("/Practitioner/_history", params={"_at": stamp})).json()
    assert keys(at) == [(f"Practitioner/{first}", 'W/"1"')]
    inst = (await http.get(f"/Practitioner/{first}/_history", params={"_since": stamp})).json()
    assert keys(inst) == [(f"Practitioner/{first}", 'W/"2"')]

    # _count pages through every version exactly once
    seen: list[tuple[str, str]] = []
    url: str | None = "/_history?_count=1"
    while url:
        page = (await http.get(url)).json()
        seen += keys(page)
        url = next((lk["url"] for lk in page["link"] if lk["relation"] == "next"), None)
    assert seen == keys(system)
    outcome(await http.get("/_history", params={"_since": "yesterday"}), 400, "_since")
    outcome(await http.get("/_history", params={"_page": "junk"}), 400)

    # history-type needs the s letter of the type; a system history shows only the granted types
    only_orgs = auth_headers(fhir_engine, scope="system/Organization.rs")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}/fhir", timeout=30, headers=only_orgs
    ) as limited:
        outcome(await limited.get("/Practitioner/_history"), 403)
        assert keys((await limited.get("/_history")).json()) == [(f"Organization/{org}", 'W/"1"')]


async def test_system_search_with_type(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    nurses = {await create(http, nurse(f"T{i}")) for i in range(3)}
    orgs = {
        await create(
            http,
            {
                "resourceType": "Organization",
                "name": f"W{i}",
                "identifier": [{"system": "urn:o", "value": f"T{i}"}],
            },
        )
        for i in range(2)
    }
    today = datetime.now(UTC).date().isoformat()
    body = (
        await http.get("", params={"_type": "Practitioner,Organization", "_lastUpdated": f"ge{today}"})
    ).json()
    assert body.get("type") == "searchset" and body["total"] == 5, body
    ClientBundle(body)
    found = {e["fullUrl"].split("/fhir/")[1] for e in body["entry"]}
    assert found == {f"Practitioner/{i}" for i in nurses} | {f"Organization/{i}" for i in orgs}

    # pages of 2 across the types: every match exactly once
    pages: list[str] = []
    url: str | None = "?_type=Practitioner,Organization&_count=2&_total=accurate"
    while url:
        page = (await http.get(url)).json()
        assert page["total"] == 5  # asked: the sum of the types' counts, on every page
        pages += [e["fullUrl"].split("/fhir/")[1] for e in page.get("entry", [])]
        url = next((lk["url"] for lk in page["link"] if lk["relation"] == "next"), None)
    assert sorted(pages) == sorted(found) and len(pages) == 5
    unasked = (await http.get("?_type=Practitioner,Organization&_count=2")).json()
    assert "total" not in unasked  # more pages and no _total: not counted
    counted = (await http.get("?_type=Practitioner,Organization&_summary=count")).json()
    assert counted["total"] == 5

    # a parameter every type declares; one that a type lacks is a 400 naming it
    only = (await http.get("", params={"_type": "Practitioner,Organization", "name": "W1"})).json()
    assert [e["resource"]["resourceType"] for e in only.get("entry", [])] == ["Organization"]
    outcome(
        await http.get("", params={"_type": "Practitioner,Organization", "gender": "female"}),
        400,
        "Organization",
    )
    outcome(await http.get("", params={"_type": "Shift"}), 404)

    # a type the token may not search is refused; without _type only the granted types are searched
    orgs_only = auth_headers(fhir_engine, scope="system/Organization.rs")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}/fhir", timeout=30, headers=orgs_only
    ) as limited:
        outcome(await limited.get("", params={"_type": "Practitioner"}), 403)
        every = (await limited.get("")).json()
        assert {e["resource"]["resourceType"] for e in every["entry"]} == {"Organization"}


async def test_fhirpy_patch_is_a_merge_patch(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("M1", "Osei", gender="female", birthDate="1980-05-01"))
    client = AsyncFHIRClient(
        f"http://127.0.0.1:{fhir_engine.http_port}/fhir",
        authorization=auth_headers(fhir_engine)["authorization"],
    )
    patched = await client.patch(
        "Practitioner", rid, name=[{"family": "Mensah", "given": ["Amara"]}], birthDate=None
    )
    assert patched["name"][0]["family"] == "Mensah" and "birthDate" not in patched
    assert patched["gender"] == "female" and patched["meta"]["versionId"] == "2"
    merge = {"content-type": "application/merge-patch+json"}
    resp = await http.patch(f"/Practitioner/{rid}", json={"gender": "male"}, headers=merge)
    assert resp.status_code == 200 and resp.json()["gender"] == "male"
    outcome(
        await http.patch(f"/Practitioner/{rid}", json=[{"op": "remove", "path": "/gender"}], headers=merge),
        400,
    )
    outcome(
        await http.patch(f"/Practitioner/{rid}", json={"id": "other"}, headers=merge), 400, "may not change"
    )


async def test_an_overlapping_shift_in_a_batch_names_it_as_basic(http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("O1"))

    def shift(number: str) -> dict[str, Any]:
        return basic_shift(number, rid, "2026-12-05T07:00:00Z", "2026-12-05T15:00:00Z", status=None)

    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": shift(n), "request": {"method": "POST", "url": "Basic"}} for n in ("O-1", "O-2")
        ],
    }
    resp = await http.post("", json=batch, headers=FHIR_JSON)
    assert resp.status_code == 200, resp.text
    first, second = resp.json()["entry"]
    assert first["response"]["status"] == "201 Created" and second["response"]["status"].startswith("422")
    assert f"Basic/{first['resource']['id']}" in second["response"]["outcome"]["issue"][0]["diagnostics"]
    assert "Shift" not in resp.text
    ClientBundle(resp.json())
