"""SMART App Launch scopes on every /fhir interaction, against a running engine (uvicorn on a
loopback port, the fhir_rest channel on): tokens of the engine's local issuer (its signing key in the
test's temporary data directory), httpx and fhirpy as clients. SQLite always, PostgreSQL when
HMS_ACH_TEST_POSTGRES_URL is set.

The world of every test: patients A and B, a practitioner, and one Encounter of each patient seen
by that practitioner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fhirpy import AsyncFHIRClient
from sqlalchemy import event, func, select

from hms_ach.app.runtime import Engine
from hms_ach.core.records import FHIR_SERVED, MappingResult, RecordWrite
from hms_ach.store import search
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.repository import Repository
from tests.integration.engine_helpers import FHIR_JSON, auth_headers

pytestmark = pytest.mark.timeout(120)

MRN = "urn:hms-ach:id:mrn"
STAFF = "urn:hms-ach:id:staff"
VISIT = "urn:hms-ach:id:visit"


@dataclass
class World:
    base: str
    engine: Engine
    patient_a: str
    patient_b: str
    practitioner: str
    encounter_a: str
    encounter_b: str

    def client(self, scope: str, patient: str | None = None) -> httpx.AsyncClient:
        """An httpx client whose token carries ``scope`` (and the ``patient`` launch context)."""
        headers = auth_headers(self.engine, scope, (), patient=patient)
        return httpx.AsyncClient(base_url=self.base, timeout=30, headers=headers)


def patient(mrn: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": ["Sam"]}],
        "gender": "female",
    }


def practitioner(number: str, family: str = "Osei") -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": STAFF, "value": number}],
        "active": True,
        "name": [{"family": family, "given": ["Amara"]}],
    }


def encounter(visit: str, patient_id: str, practitioner_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Encounter",
        "identifier": [{"system": VISIT, "value": visit}],
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": "2026-11-26T08:30:00-05:00"},
    }
    if practitioner_id:
        body["participant"] = [{"individual": {"reference": f"Practitioner/{practitioner_id}"}}]
    return body


async def _created(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    resp = await http.post(f"/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["id"]
    return rid


@pytest.fixture
async def world(fhir_engine: Engine) -> AsyncIterator[World]:
    base = f"http://127.0.0.1:{fhir_engine.http_port}/fhir"
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(fhir_engine)) as admin:
        a = await _created(admin, patient("MRN-A", "Rivera"))
        b = await _created(admin, patient("MRN-B", "Rivera"))
        doc = await _created(admin, practitioner("E1"))
        enc_a = await _created(admin, encounter("V-A", a, doc))
        enc_b = await _created(admin, encounter("V-B", b, doc))
    yield World(base, fhir_engine, a, b, doc, enc_a, enc_b)


def assert_insufficient_scope(resp: httpx.Response, scope: str) -> None:
    """403 with the RFC 6750 challenge naming ``scope``, and a forbidden OperationOutcome."""
    assert resp.status_code == 403, resp.text
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="insufficient_scope"' in challenge, challenge
    assert f'scope="{scope}"' in challenge, challenge
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "forbidden", body


def ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    }


async def searched(http: httpx.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
    resp = await http.get(url, **kw)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["type"] == "searchset"
    return body


def rows(store: Store, resource_type: str) -> int:
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# ---------------------------------------------------------------------------- patient/ scopes
async def test_patient_token_sees_only_its_compartment(world: World) -> None:
    w = world
    async with w.client("patient/*.read", patient=w.patient_a) as http:
        # reads: inside the compartment 200, outside 404 (as if the record did not exist)
        for url in (
            f"/Patient/{w.patient_a}",
            f"/Patient/{w.patient_a}/_history/1",
            f"/Patient/{w.patient_a}/_history",
            f"/Encounter/{w.encounter_a}",
            f"/Encounter/{w.encounter_a}/_history/1",
        ):
            assert (await http.get(url)).status_code == 200, url
        for url in (
            f"/Patient/{w.patient_b}",
            f"/Encounter/{w.encounter_b}",
            f"/Encounter/{w.encounter_b}/_history/1",
            f"/Encounter/{w.encounter_b}/_history",
            f"/Patient/{w.patient_b}/_history",
            f"/Practitioner/{w.practitioner}",  # not in the Patient compartment
        ):
            resp = await http.get(url)
            assert resp.status_code == 404, (url, resp.text)
            assert resp.json()["issue"][0]["code"] == "not-found"
        history = (await http.get(f"/Encounter/{w.encounter_a}/_history")).json()
        assert len(history["entry"]) == 1

        # searches: only A's records, with totals counted inside the compartment
        found = await searched(http, "/Patient", params={"family": "rivera"})
        assert ids(found) == {f"Patient/{w.patient_a}"} and found["total"] == 1
        found = await searched(http, "/Encounter", params={"_total": "accurate", "status": "in-progress"})
        assert ids(found) == {f"Encounter/{w.encounter_a}"} and found["total"] == 1
        assert (await searched(http, "/Encounter", params={"subject": f"Patient/{w.patient_b}"}))[
            "total"
        ] == 0
        assert (await searched(http, "/Encounter", params={"_summary": "count"}))["total"] == 1
        counted = await searched(http, "/Patient", params={"family": "rivera", "_summary": "count"})
        assert counted["total"] == 1
        page = await searched(http, "/Encounter", params={"_count": "1"})
        assert ids(page) == {f"Encounter/{w.encounter_a}"} and "next" not in {
            link["relation"] for link in page["link"]
        }
        assert (await searched(http, "/Practitioner"))["total"] == 0
        resp = await http.post(
            "/Encounter/_search",
            content="status=in-progress",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert resp.status_code == 200 and ids(resp.json()) == {f"Encounter/{w.encounter_a}"}

        # _include: A's Patient comes along; the Practitioner is outside the compartment
        found = await searched(
            http,
            "/Encounter",
            params=[("_include", "Encounter:patient"), ("_include", "Encounter:practitioner")],
        )
        assert ids(found) == {f"Encounter/{w.encounter_a}"}
        assert ids(found, "include") == {f"Patient/{w.patient_a}"}

        # the audit trail is not in the compartment: an empty searchset
        assert (await searched(http, "/AuditEvent")).get("entry", []) == []

        # writes need write scopes
        assert_insufficient_scope(
            await http.post("/Encounter", json=encounter("V-A2", w.patient_a), headers=FHIR_JSON),
            "user/Encounter.c",
        )
        assert_insufficient_scope(
            await http.put(
                f"/Patient/{w.patient_a}",
                json={**patient("MRN-A", "Rivera"), "id": w.patient_a},
                headers=FHIR_JSON,
            ),
            "user/Patient.u",
        )
        assert_insufficient_scope(await http.delete(f"/Encounter/{w.encounter_a}"), "user/Encounter.d")

    # a foreign client: fhirpy with the same kind of token
    headers = auth_headers(w.engine, "patient/*.read", (), patient=w.patient_a)
    client = AsyncFHIRClient(
        w.base, authorization=headers["authorization"], extra_headers={"Accept": "application/fhir+json"}
    )
    encounters = await client.resources("Encounter").search(status="in-progress").fetch_all()
    assert [e["id"] for e in encounters] == [w.encounter_a]
    patients = await client.resources("Patient").search(family="rivera").fetch_all()
    assert [p["id"] for p in patients] == [w.patient_a]


async def test_patient_write_token_stays_in_its_compartment(world: World, store: Store) -> None:
    w = world
    async with w.client("patient/*.cruds", patient=w.patient_a) as http:
        # inside the compartment: create, update and delete work
        mine = await _created(http, encounter("V-A2", w.patient_a))
        changed = {**encounter("V-A2", w.patient_a), "id": mine, "status": "finished"}
        assert (await http.put(f"/Encounter/{mine}", json=changed, headers=FHIR_JSON)).status_code == 200
        assert (await http.delete(f"/Encounter/{mine}")).status_code == 204
        assert (await http.get(f"/Encounter/{mine}")).status_code == 410  # deleted, and in the compartment

        # content for another patient: 403; another patient's record: 404
        resp = await http.post("/Encounter", json=encounter("V-B2", w.patient_b), headers=FHIR_JSON)
        assert resp.status_code == 403 and resp.json()["issue"][0]["code"] == "forbidden", resp.text
        moved = {**encounter("V-B", w.patient_a), "id": w.encounter_b}
        assert (
            await http.put(f"/Encounter/{w.encounter_b}", json=moved, headers=FHIR_JSON)
        ).status_code == 404
        assert (await http.delete(f"/Encounter/{w.encounter_b}")).status_code == 404
        resp = await http.put(
            "/Encounter",
            params={"identifier": f"{VISIT}|V-B"},
            json=encounter("V-B", w.patient_a),
            headers=FHIR_JSON,
        )
        assert resp.status_code == 404, resp.text
        # a conditional create whose identifier matches B's encounter would answer with it: 404
        resp = await http.post(
            "/Encounter",
            json=encounter("V-B", w.patient_a),
            headers={**FHIR_JSON, "If-None-Exist": f"identifier={VISIT}|V-B"},
        )
        assert resp.status_code == 404 and w.patient_b not in resp.text, resp.text

        # a transaction with one entry outside the compartment writes nothing
        before = rows(store, "Encounter")
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": encounter("V-A3", w.patient_a),
                    "request": {"method": "POST", "url": "Encounter"},
                },
                {
                    "resource": encounter("V-B3", w.patient_b),
                    "request": {"method": "POST", "url": "Encounter"},
                },
            ],
        }
        resp = await http.post("", json=bundle, headers=FHIR_JSON)
        assert resp.status_code == 403, resp.text
        assert rows(store, "Encounter") == before

    async with w.client("system/*.read") as http:  # B's encounter is untouched
        assert (await http.get(f"/Encounter/{w.encounter_b}")).json()["subject"]["reference"] == (
            f"Patient/{w.patient_b}"
        )


async def test_patient_scope_without_patient_claim_grants_nothing(world: World) -> None:
    async with world.client("patient/*.read") as http:
        assert_insufficient_scope(await http.get("/Encounter"), "user/Encounter.s")
        assert_insufficient_scope(await http.get(f"/Patient/{world.patient_a}"), "user/Patient.r")


# ---------------------------------------------------------------------------- user/ and system/ scopes
async def test_practitioner_token_sees_no_patient(world: World) -> None:
    w = world
    async with w.client("user/Practitioner.read") as http:
        assert_insufficient_scope(await http.get("/Patient", params={"family": "rivera"}), "user/Patient.s")
        assert_insufficient_scope(await http.post("/Patient/_search"), "user/Patient.s")
        assert_insufficient_scope(await http.get(f"/Patient/{w.patient_a}"), "user/Patient.r")
        assert_insufficient_scope(await http.get(f"/Patient/{w.patient_a}/_history/1"), "user/Patient.r")
        assert_insufficient_scope(await http.get(f"/Patient/{w.patient_a}/_history"), "user/Patient.r")
        assert_insufficient_scope(await http.get("/Encounter"), "user/Encounter.s")
        assert_insufficient_scope(await http.get("/AuditEvent"), "user/AuditEvent.s")
        found = await searched(http, "/Practitioner")
        assert ids(found) == {f"Practitioner/{w.practitioner}"}
        assert (await http.get(f"/Practitioner/{w.practitioner}")).status_code == 200

    # _include is filtered by the types the token may search
    async with w.client("user/Encounter.rs user/Practitioner.rs") as http:
        found = await searched(
            http,
            "/Encounter",
            params=[("_include", "Encounter:patient"), ("_include", "Encounter:practitioner")],
        )
        assert ids(found) == {f"Encounter/{w.encounter_a}", f"Encounter/{w.encounter_b}"}
        assert ids(found, "include") == {f"Practitioner/{w.practitioner}"}


async def test_v2_letters_rs_and_cud(world: World) -> None:
    w = world
    path = f"/Practitioner/{w.practitioner}"
    async with w.client("user/Practitioner.rs") as http:
        assert (await http.get(path)).status_code == 200
        assert (await http.get("/Practitioner")).status_code == 200
        assert_insufficient_scope(
            await http.post("/Practitioner", json=practitioner("E2"), headers=FHIR_JSON),
            "user/Practitioner.c",
        )
        assert_insufficient_scope(await http.delete(path), "user/Practitioner.d")
    async with w.client("user/Practitioner.cud") as http:
        new = await _created(http, practitioner("E2"))
        body = {**practitioner("E2", "Mensah"), "id": new}
        assert (await http.put(f"/Practitioner/{new}", json=body, headers=FHIR_JSON)).status_code == 200
        assert_insufficient_scope(await http.get(path), "user/Practitioner.r")
        assert_insufficient_scope(await http.get("/Practitioner"), "user/Practitioner.s")
        assert (await http.delete(f"/Practitioner/{new}")).status_code == 204
    async with w.client("user/Practitioner.r") as http:  # read without search
        assert (await http.get(path)).status_code == 200
        assert_insufficient_scope(await http.get("/Practitioner"), "user/Practitioner.s")
    async with w.client("user/Practitioner.c") as http:  # a conditional update may create: needs c and u
        resp = await http.put(
            "/Practitioner", params={"identifier": f"{STAFF}|E3"}, json=practitioner("E3"), headers=FHIR_JSON
        )
        assert_insufficient_scope(resp, "user/Practitioner.u")


async def test_transaction_and_batch_are_decided_entry_by_entry(world: World, store: Store) -> None:
    entries = [
        {"resource": practitioner("E7"), "request": {"method": "POST", "url": "Practitioner"}},
        {"resource": patient("MRN-C", "Ng"), "request": {"method": "POST", "url": "Patient"}},
    ]
    async with world.client("user/Practitioner.cruds") as http:
        before = (rows(store, "Practitioner"), rows(store, "Patient"))
        resp = await http.post(
            "", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR_JSON
        )
        assert_insufficient_scope(resp, "user/Patient.c")
        assert (rows(store, "Practitioner"), rows(store, "Patient")) == before

        resp = await http.post(
            "", json={"resourceType": "Bundle", "type": "batch", "entry": entries}, headers=FHIR_JSON
        )
        assert resp.status_code == 200, resp.text
        results = resp.json()["entry"]
        assert [r["response"]["status"] for r in results] == ["201 Created", "403"]
        assert results[1]["response"]["outcome"]["issue"][0]["code"] == "forbidden"
        assert (rows(store, "Practitioner"), rows(store, "Patient")) == (before[0] + 1, before[1])


async def test_system_token_may_do_everything(world: World) -> None:
    w = world
    async with w.client("system/*.cruds") as http:
        found = await searched(http, "/Encounter", params={"_include": "Encounter:patient"})
        assert ids(found) == {f"Encounter/{w.encounter_a}", f"Encounter/{w.encounter_b}"}
        assert ids(found, "include") == {f"Patient/{w.patient_a}", f"Patient/{w.patient_b}"}
        assert (await searched(http, "/Patient"))["total"] == 2
        for url in (
            f"/Patient/{w.patient_b}",
            f"/Encounter/{w.encounter_b}/_history/1",
            f"/Patient/{w.patient_b}/_history",
        ):
            assert (await http.get(url)).status_code == 200, url
        assert (await searched(http, "/AuditEvent")).get("entry"), "the trail holds the seeding writes"
        new = await _created(http, patient("MRN-D", "Diallo"))
        assert (await http.delete(f"/Patient/{new}")).status_code == 204
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": practitioner("E9"), "request": {"method": "POST", "url": "Practitioner"}}],
        }
        assert (await http.post("", json=bundle, headers=FHIR_JSON)).status_code == 200


# ---------------------------------------------------------------------------- in the store
def _fill(store: Store) -> dict[str, str]:
    """Two patients with 6 and 3 encounters, all at one location; returns alias -> id."""
    records = [
        RecordWrite("a", "Patient", MRN, "A", {"name": [{"family": "Rivera"}]}),
        RecordWrite("b", "Patient", MRN, "B", {"name": [{"family": "Rivera"}]}),
        RecordWrite("bed", "Location", "urn:bed", "B1", {"name": "4W-1"}),
    ]
    records += [
        RecordWrite(
            f"e{i}",
            "Encounter",
            VISIT,
            f"V{i}",
            {
                "status": "in-progress",
                "subject": {"reference": "@a" if i < 6 else "@b"},
                "location": [{"location": {"reference": "@bed"}}],
                "period": {"start": f"2026-0{1 + i}-01T10:00:00Z", "end": f"2026-0{1 + i}-01T12:00:00Z"},
            },
        )
        for i in range(9)
    ]
    with store.writer.begin() as conn:
        out = Repository(conn).apply(MappingResult(records=records))
    return {r.alias: o.id for r, o in zip(records, out, strict=True)}


def _run(
    store: Store, query: search.SearchQuery, plans: list[str] | None = None
) -> tuple[search.SearchPage, list[str]]:
    """The page of ``query`` and the SELECT statements (with their bound values) it ran; with
    ``plans``, the query plan lines of those statements are added to it."""
    seen: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    with store.reader.connect() as conn:
        event.listen(conn, "before_cursor_execute", grab)
        with conn.begin():
            page = search.execute(conn, query)
        event.remove(conn, "before_cursor_execute", grab)
        for statement, parameters in seen:
            if plans is None:
                break
            with conn.begin():
                if conn.dialect.name == "sqlite":
                    explained = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
                    plans += [str(row[-1]) for row in explained]
                else:
                    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # the tables are tiny
                    plans += [str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters)]
    return page, [f"{statement} {parameters!r}" for statement, parameters in seen]


def test_user_and_system_grants_add_nothing_to_the_sql(store: Store) -> None:
    """Cost: a caller whose grants are not limited to a compartment runs exactly the statements of an
    unrestricted search; a patient/ caller runs as many statements, each with one more condition."""
    ids = _fill(store)
    params = [
        ("status", "in-progress"),
        ("_count", "2"),
        ("_include", "Encounter:location"),
        ("_total", "accurate"),
    ]
    unlimited = search.Access(dict.fromkeys(FHIR_SERVED))
    page, plain = _run(store, search.parse_query("Encounter", params))
    same, scoped = _run(store, search.parse_query("Encounter", params, access=unlimited))
    assert scoped == plain and page.total == same.total == 9

    limited = search.Access({"Encounter": ids["a"], "Patient": ids["a"]})  # no Location: not included
    plans: list[str] = []
    mine, statements = _run(store, search.parse_query("Encounter", params, access=limited), plans)
    assert mine.total == 6 and len(mine.matches) == 2 and mine.included == []
    assert len(statements) == len(plain) - 1  # no include statement at all: Location is not visible
    assert all(ids["a"] in s for s in statements), "the patient id is a bound value of every statement"
    text = "\n".join(plans)  # the compartment is read through the reference lookup index, no scan
    if store.dialect == "sqlite":
        assert "SCAN search_reference" not in text and "SEARCH search_reference USING" in text, text
    else:
        assert "Seq Scan on search_reference" not in text and "search_reference" in text, text

    # paging through the compartment returns each of its records exactly once
    seen: list[str] = []
    query = search.parse_query("Encounter", [("_count", "4")], access=limited)
    while True:
        page, _ = _run(store, query)
        seen += [rid for rid, _text in page.matches]
        if page.next_cursor is None:
            break
        query = search.parse_query(
            "Encounter", [("_count", "4"), ("_cursor", page.next_cursor)], access=limited
        )
    assert sorted(seen) == sorted(ids[f"e{i}"] for i in range(6))

    # a date criterion is checked per candidate of the compartment; the total is counted inside it
    dated = [("date", "ge2026-04-01"), ("_count", "1"), ("_total", "accurate")]
    page, _ = _run(store, search.parse_query("Encounter", dated, access=limited))
    assert page.total == 3 and len(page.matches) == 1  # A's visits in months 4, 5 and 6
    page, _ = _run(store, search.parse_query("Encounter", dated))
    assert page.total == 6  # everyone's: months 4 to 9

    # a type outside the compartment matches nothing; the Patient compartment holds the patient itself
    bed = search.Access({"Location": ids["a"]})
    assert _run(store, search.parse_query("Location", [], access=bed))[0].total == 0
    who = search.Access({"Patient": ids["b"]})
    found, _ = _run(
        store, search.parse_query("Patient", [("family", "rivera"), ("_total", "accurate")], access=who)
    )
    assert [rid for rid, _t in found.matches] == [ids["b"]] and found.total == 1
