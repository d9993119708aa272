"""FHIR search across references (issue 15): ``_revinclude``, ``_include:iterate``, chained
parameters and ``_has``, against a running engine with a fhir_rest channel; fhirpy as a real client
for ``_revinclude`` and chaining, httpx for every form and every error. The CapabilityStatement's
``searchRevInclude``/``searchInclude`` values are each run. SQLite always, PostgreSQL when
HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from fhirpy import AsyncFHIRClient

from hms_ach.app.runtime import Engine
from hms_ach.store import search, search_query
from hms_ach.store.db import Store
from tests.integration.engine_helpers import FHIR_JSON, STAFF, auth_headers
from tests.integration.test_search_plans import _assert_indexed as assert_indexed
from tests.integration.test_search_plans import _fill as fill_plan_store
from tests.integration.test_search_plans import _plans as search_plans

MRN = "urn:oid:1.2.3.mrn"
ROLE = "http://terminology.hl7.org/CodeSystem/practitioner-role"


@dataclass
class World:
    """The ids of the records :func:`world` made (key: the ``fullUrl`` alias)."""

    engine: Engine
    ids: dict[str, str]

    def ref(self, alias: str) -> str:
        return f"{_TYPES[alias]}/{self.ids[alias]}"


_TYPES = {
    "ward": "Location",
    "icu": "Location",
    "okafor": "Patient",
    "lind": "Patient",
    "e1": "Encounter",
    "e2": "Encounter",
    "e3": "Encounter",
    "mensah": "Practitioner",
    "berg": "Practitioner",
    "r1": "PractitionerRole",
    "r2": "PractitionerRole",
}


def _resources() -> dict[str, dict[str, Any]]:
    def patient(mrn: str, family: str) -> dict[str, Any]:
        name = [{"family": family, "given": ["Sam"]}]
        return {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "name": name}

    def encounter(visit: str, subject: str, status: str, location: str) -> dict[str, Any]:
        return {
            "resourceType": "Encounter",
            "identifier": [{"system": "urn:test:visit", "value": visit}],
            "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": f"urn:uuid:{subject}"},
            "location": [{"location": {"reference": f"urn:uuid:{location}"}}],
        }

    def doctor(number: str, family: str) -> dict[str, Any]:
        name = [{"family": family, "given": ["Amara"]}]
        return {
            "resourceType": "Practitioner",
            "identifier": [{"system": STAFF, "value": number}],
            "name": name,
        }

    def role(number: str, who: str, code: str, where: str) -> dict[str, Any]:
        return {
            "resourceType": "PractitionerRole",
            "identifier": [{"system": "urn:test:role", "value": number}],
            "practitioner": {"reference": f"urn:uuid:{who}"},
            "code": [{"coding": [{"system": ROLE, "code": code}]}],
            "location": [{"reference": f"urn:uuid:{where}"}],
        }

    return {
        "ward": {"resourceType": "Location", "name": "Ward 5 North", "status": "active"},
        "icu": {"resourceType": "Location", "name": "Intensive Care", "status": "active"},
        "okafor": patient("A1", "Okafor"),
        "lind": patient("A2", "Lindqvist"),
        "e1": encounter("V1", "okafor", "in-progress", "ward"),
        "e2": encounter("V2", "okafor", "finished", "icu"),
        "e3": encounter("V3", "lind", "in-progress", "icu"),
        "mensah": doctor("D1", "Mensah"),
        "berg": doctor("D2", "Berg"),
        "r1": role("R1", "mensah", "nurse", "ward"),
        "r2": role("R2", "berg", "doctor", "icu"),
    }


@pytest.fixture
async def world(fhir_engine: Engine, http: httpx.AsyncClient) -> AsyncIterator[World]:
    """Two wards, two patients with three encounters, two practitioners with a role each: one
    transaction (urn:uuid references resolved by the engine)."""
    made = _resources()
    entries = [
        {
            "fullUrl": f"urn:uuid:{alias}",
            "resource": body,
            "request": {"method": "POST", "url": body["resourceType"]},
        }
        for alias, body in made.items()
    ]
    resp = await http.post(
        "", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR_JSON
    )
    assert resp.status_code == 200, resp.text
    ids = {}
    for alias, answer in zip(made, resp.json()["entry"], strict=True):
        ids[alias] = answer["response"]["location"].split("/")[1]
    yield World(fhir_engine, ids)


async def found(http: httpx.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
    resp = await http.get(url, **kw)
    for _ in range(5):  # a loop of searches may pass the client's rate limit (429): wait as told, bounded
        if resp.status_code != 429:
            break
        await asyncio.sleep(min(float(resp.headers.get("Retry-After", "1")), 2.0))
        resp = await http.get(url, **kw)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def refs(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    }


def refused(resp: httpx.Response, status: int, *texts: str) -> str:
    """The diagnostics of a refused search: ``status`` with an OperationOutcome naming ``texts``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error", body
    diagnostics: str = body["issue"][0]["diagnostics"]
    for text in texts:
        assert text in diagnostics, diagnostics
    return diagnostics


# ---------------------------------------------------------------------------- _revinclude
async def check_revinclude(world: World, http: httpx.AsyncClient) -> None:
    w = world
    bundle = await found(http, f"/Patient?_id={w.ids['okafor']}&_revinclude=Encounter:subject")
    assert refs(bundle) == {w.ref("okafor")}
    assert refs(bundle, "include") == {w.ref("e1"), w.ref("e2")}
    assert bundle["total"] == 1
    # the target type as third part; several directives; * (every link that may point at the type)
    both = await found(
        http,
        "/Practitioner?_revinclude=PractitionerRole:practitioner:Practitioner&_revinclude=Encounter:practitioner",
    )
    assert refs(both) == {w.ref("mensah"), w.ref("berg")}
    assert refs(both, "include") == {w.ref("r1"), w.ref("r2")}
    star = await found(http, f"/Location?_id={w.ids['icu']}&_revinclude=*")
    assert refs(star, "include") == {w.ref("e2"), w.ref("e3"), w.ref("r2")}
    # a system search: each type's revincludes, a record reached from two types served once
    system = await found(http, f"?_type=Patient,Location&_id={w.ids['okafor']},{w.ids['ward']}&_revinclude=*")
    assert refs(system) == {w.ref("okafor"), w.ref("ward")}
    included = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in system["entry"][2:]]
    assert sorted(included) == sorted([w.ref("e1"), w.ref("e2"), w.ref("r1")])
    every = await found(http, f"/Encounter?_id={w.ids['e1']}&_include=*")
    assert refs(every, "include") == {w.ref("okafor"), w.ref("ward")}
    # _include and _revinclude together, each included record once
    mixed = await found(
        http,
        f"/Encounter?_id={w.ids['e1']}&_include=Encounter:subject&_include=Encounter:patient&_revinclude=Claim:encounter",
    )
    assert refs(mixed, "include") == {w.ref("okafor")}
    located = await found(
        http,
        f"/Location?_id={w.ids['ward']}&_revinclude=Encounter:location&_revinclude=PractitionerRole:location",
    )
    assert refs(located, "include") == {w.ref("e1"), w.ref("r1")}


async def check_revinclude_errors(world: World, http: httpx.AsyncClient) -> None:
    refused(await http.get("/Patient?_revinclude=Encounter:location"), 400, "Encounter:subject")
    refused(await http.get("/Patient?_revinclude=Encounter"), 400, "expected Type:param")
    refused(await http.get("/Patient?_revinclude=Shift:practitioner"), 400, "not supported")
    refused(await http.get("/Patient?_revinclude=Encounter:subject:Location"), 400)
    refused(await http.get("/Patient?_revinclude:iterate=*"), 400)
    refused(await http.get("/Patient?_include=Encounter:subject"), 400, "Patient")


async def check_included_count_is_bounded_with_a_warning(
    world: World, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search_query, "MAX_INCLUDED", 2)
    bundle = await found(
        http, "/Location?_revinclude=Encounter:location&_revinclude=PractitionerRole:location"
    )
    assert len(refs(bundle, "include")) == 2 and len(refs(bundle)) == 2
    outcome = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and outcome[0]["issue"][0]["severity"] == "warning"
    assert outcome[0]["issue"][0]["code"] == "too-costly"
    assert "more than 2 included resources" in outcome[0]["issue"][0]["diagnostics"]


# ---------------------------------------------------------------------------- :iterate
async def check_include_and_revinclude_iterate(world: World, http: httpx.AsyncClient) -> None:
    w = world
    # Practitioner <- PractitionerRole -> Location: the role is reached by _revinclude, its location by iterate
    bundle = await found(
        http,
        f"/Practitioner?_id={w.ids['mensah']}&_revinclude=PractitionerRole:practitioner"
        "&_include:iterate=PractitionerRole:location",
    )
    assert refs(bundle, "include") == {w.ref("r1"), w.ref("ward")}
    # without :iterate the directive starts from the matches only, and so is refused for another type
    refused(
        await http.get(
            "/Practitioner?_revinclude=PractitionerRole:practitioner&_include=PractitionerRole:location"
        ),
        400,
    )
    # two levels of iterate: Patient <- Encounter -> Location <- PractitionerRole
    deep = await found(
        http,
        f"/Patient?_id={w.ids['lind']}&_revinclude=Encounter:subject&_include:iterate=Encounter:location"
        "&_revinclude:iterate=PractitionerRole:location",
    )
    assert refs(deep, "include") == {w.ref("e3"), w.ref("icu"), w.ref("r2")}
    # the STU3 name :recurse is the same
    recurse = await found(
        http,
        f"/Practitioner?_id={w.ids['mensah']}&_revinclude=PractitionerRole:practitioner"
        "&_include:recurse=PractitionerRole:location",
    )
    assert refs(recurse, "include") == refs(bundle, "include")


async def check_iterate_stops_at_the_depth_bound(
    world: World, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    monkeypatch.setattr("hms_ach.store.search.MAX_INCLUDE_DEPTH", 1)
    bundle = await found(
        http,
        f"/Patient?_id={w.ids['lind']}&_revinclude=Encounter:subject&_include:iterate=Encounter:location",
    )
    assert refs(bundle, "include") == {w.ref("e3")}
    outcome = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "stopped at 1 links" in outcome[0]["issue"][0]["diagnostics"]


# ---------------------------------------------------------------------------- chaining
async def check_chained_parameters(world: World, http: httpx.AsyncClient) -> None:
    w = world
    cases = {
        "/Encounter?subject:Patient.family=okafor": {"e1", "e2"},
        "/Encounter?subject.family=lindqvist": {"e3"},
        f"/Encounter?subject.identifier={MRN}|A2": {"e3"},
        "/Encounter?patient.name=okafor&status=in-progress": {"e1"},
        "/Encounter?location.name=intensive": {"e2", "e3"},
        "/Encounter?location.name:exact=Ward 5 North": {"e1"},
        f"/PractitionerRole?practitioner.identifier={STAFF}|D2": {"r2"},
        "/PractitionerRole?practitioner.family=mensah,berg": {"r1", "r2"},
        f"/Encounter?subject._id={w.ids['okafor']}": {"e1", "e2"},
        "/Encounter?subject.family=nobody": set(),
    }
    for url, aliases in cases.items():
        bundle = await found(http, url)
        assert refs(bundle) == {w.ref(a) for a in aliases}, url
        assert bundle["total"] == len(aliases), url


async def check_chain_errors(world: World, http: httpx.AsyncClient) -> None:
    # several target types: the type modifier is required
    refused(await http.get("/Encounter?participant.family=x"), 400, "needs a type modifier", "participant:")
    refused(
        await http.get("/Encounter?subject.nickname=x"), 400, "Patient has no search parameter 'nickname'"
    )
    refused(await http.get("/Encounter?subject:Location.name=x"), 400, "does not point at 'Location'")
    refused(await http.get("/Encounter?status.name=x"), 400, "not a reference parameter")
    lenient = await found(http, "/Encounter?nickname.name=x&status=finished")  # unknown: ignored, as usual
    assert refs(lenient) == {world.ref("e2")}
    assert [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    refused(await http.get("/Encounter?nickname.name=x", headers={"Prefer": "handling=strict"}), 400)
    refused(await http.get("/Encounter?subject.organization.name=x"), 400, "one level")
    refused(await http.get("/Encounter?subject.birthdate=soon"), 400, "date search value")
    refused(await http.get("/Encounter?subject.family:below=x"), 400, "modifier")


# ---------------------------------------------------------------------------- _has
async def check_has(world: World, http: httpx.AsyncClient) -> None:
    w = world
    cases = {
        "/Patient?_has:Encounter:subject:status=in-progress": {"okafor", "lind"},
        "/Patient?_has:Encounter:subject:status=finished": {"okafor"},
        "/Patient?_has:Encounter:patient:status=finished&family=lindqvist": set(),
        f"/Practitioner?_has:PractitionerRole:practitioner:role={ROLE}|nurse": {"mensah"},
        "/Practitioner?_has:PractitionerRole:practitioner:role=doctor": {"berg"},
        "/Location?_has:PractitionerRole:location:role=nurse&_has:Encounter:location:status=in-progress": {
            "ward"
        },
        "/Location?_has:Encounter:location:status:not=in-progress": {"icu"},
    }
    for url, aliases in cases.items():
        bundle = await found(http, url)
        assert refs(bundle) == {w.ref(a) for a in aliases}, url
        assert bundle["total"] == len(aliases), url


async def check_has_errors(world: World, http: httpx.AsyncClient) -> None:
    refused(await http.get("/Patient?_has:Encounter:subject=x"), 400, "_has:Type:reference:parameter=value")
    refused(await http.get("/Patient?_has=x"), 400, "_has:Type:reference:parameter=value")
    refused(await http.get("/Patient?_has:Encounter::status=x"), 400, "expected")
    refused(await http.get("/Patient?_has:Encounter:subject:_has:Claim:encounter:status=x"), 400, "one level")
    refused(await http.get("/Patient?_has:Shift:practitioner:status=x"), 400, "not a served resource type")
    refused(await http.get("/Patient?_has:Encounter:location:status=x"), 400, "subject")
    refused(await http.get("/Patient?_has:Encounter:subject:colour=x"), 400, "no search parameter 'colour'")


# ---------------------------------------------------------------------------- paging, links, access
async def _pages(http: httpx.AsyncClient, url: str, kept: list[str]) -> list[str]:
    """The matches of every page of ``url``, following the next links; each self and next link
    holds every parameter of ``kept``, and each page included resources."""
    served: list[str] = []
    page = await found(http, url)
    while True:
        links = {link["relation"]: link["url"] for link in page["link"]}
        asked = dict(parse_qsl(urlsplit(links["self"]).query))
        assert all(k in asked for k in kept), (kept, asked)
        served += sorted(refs(page))
        assert refs(page, "include"), page
        if "next" not in links:
            return served
        assert dict(parse_qsl(urlsplit(links["next"]).query)).keys() >= set(kept)
        page = await found(http, links["next"])


async def check_paging_keeps_the_parameters(world: World, http: httpx.AsyncClient) -> None:
    w = world
    url = (
        f"/Encounter?subject.identifier={MRN}|A1,{MRN}|A2&_include=Encounter:subject"
        "&_include:iterate=Encounter:location&_count=1"
    )
    kept = ["subject.identifier", "_include", "_include:iterate", "_count"]
    served = await _pages(http, url, kept)
    assert (
        served == sorted(served)
        and set(served) == {w.ref("e1"), w.ref("e2"), w.ref("e3")}
        and len(served) == 3
    )
    url = "/Patient?_has:Encounter:subject:status=in-progress&_revinclude=Encounter:subject&_count=1"
    served = await _pages(http, url, ["_has:Encounter:subject:status", "_revinclude"])
    assert set(served) == {w.ref("okafor"), w.ref("lind")} and len(served) == 2


async def check_links_to_types_the_token_may_not_read(world: World) -> None:
    w = world
    headers = auth_headers(w.engine, "system/Encounter.rs", ())
    base = f"http://127.0.0.1:{w.engine.http_port}/fhir"
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as limited:
        refused(await limited.get("/Encounter?subject.family=okafor"), 403, "may not read")
        refused(await limited.get("/Patient?_has:Encounter:subject:status=x"), 403)
        bundle = await found(limited, f"/Encounter?_id={w.ids['e1']}&_include=Encounter:subject")
        assert refs(bundle, "include") == set()
    headers = auth_headers(w.engine, "patient/*.rs", (), patient=w.ids["lind"])
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as mine:
        # the included and chained records are limited to the compartment too
        bundle = await found(mine, "/Patient?_revinclude=Encounter:subject")
        assert refs(bundle) == {w.ref("lind")} and refs(bundle, "include") == {w.ref("e3")}
        assert refs(await found(mine, "/Encounter?subject.family=okafor")) == set()
        assert refs(await found(mine, "/Patient?_has:Encounter:subject:status=in-progress")) == {
            w.ref("lind")
        }


async def check_access_audit_records_included_resources(world: World, http: httpx.AsyncClient) -> None:
    """The access record of a search names the revincluded records, as it names _include-d ones
    (the records are written in the background: polled)."""
    w = world
    await found(http, f"/Patient?_id={w.ids['lind']}&_revinclude=Encounter:subject")
    deadline = time.monotonic() + 15
    while True:
        audit = await found(http, f"/AuditEvent?subtype=search-type&entity={w.ref('e3')}")
        if audit.get("entry") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    entities = {e["what"]["reference"] for e in audit["entry"][0]["resource"]["entity"] if "what" in e}
    assert {w.ref("e3"), w.ref("lind")} <= entities


# ---------------------------------------------------------------------------- a real client, the CapabilityStatement
async def check_fhirpy_revinclude_and_chaining(world: World) -> None:
    w = world
    client = AsyncFHIRClient(
        f"http://127.0.0.1:{w.engine.http_port}/fhir", authorization=auth_headers(w.engine)["authorization"]
    )
    patients = client.resources("Patient").search(_id=w.ids["okafor"]).revinclude("Encounter", "subject")
    fetched = await patients.fetch_raw()
    assert {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in fetched["entry"]} == {
        w.ref("okafor"),
        w.ref("e1"),
        w.ref("e2"),
    }
    chained = await client.resources("Encounter").search(subject__Patient__family="okafor").fetch_all()
    assert {e["id"] for e in chained} == {w.ids["e1"], w.ids["e2"]}
    roles = await client.resources("PractitionerRole").search(practitioner__identifier=f"{STAFF}|D1").fetch()
    assert [r["id"] for r in roles] == [w.ids["r1"]]
    has_doctor = {"_has:PractitionerRole:practitioner:role": "doctor"}
    has = await client.resources("Practitioner").search(**has_doctor).fetch()
    assert [p["id"] for p in has] == [w.ids["berg"]]


async def check_declared_include_values_work(world: World, http: httpx.AsyncClient) -> None:
    statement = (await http.get("/metadata")).json()
    declared = 0
    for resource in statement["rest"][0]["resource"]:
        rtype = resource["type"]
        if "searchParam" not in resource or rtype == "AuditEvent":
            continue
        for value in resource.get("searchRevInclude", []):
            await found(http, f"/{rtype}", params={"_revinclude": value, "_count": "2"})
            if value != "*":
                await found(http, f"/{rtype}", params={"_revinclude:iterate": value, "_count": "2"})
                source, _, param = value.partition(":")
                await found(http, f"/{rtype}", params={f"_has:{source}:{param}:_id": "x"})
            declared += 1
        for value in resource.get("searchInclude", []):
            await found(http, f"/{rtype}", params={"_include": value, "_count": "2"})
            if value != "*":
                await found(http, f"/{rtype}", params={"_include:iterate": value, "_count": "2"})
            declared += 1
        for param in resource["searchParam"]:
            if param["type"] == "reference" and "chains" in param["documentation"]:
                for target in (
                    param["documentation"].split("chains one level to ")[1].split(": ")[0].split(", ")
                ):
                    await found(http, f"/{rtype}", params={f"{param['name']}:{target}._id": "x"})
                    declared += 1
    assert declared > 20


# ---------------------------------------------------------------------------- the tests
# One engine and one world per test; the checks above only read, so a test runs several of them.
async def test_revinclude_and_iterate(world: World, http: httpx.AsyncClient) -> None:
    await check_revinclude(world, http)
    await check_revinclude_errors(world, http)
    await check_include_and_revinclude_iterate(world, http)


async def test_include_bounds(world: World, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    await check_included_count_is_bounded_with_a_warning(world, http, monkeypatch)
    monkeypatch.undo()
    await check_iterate_stops_at_the_depth_bound(world, http, monkeypatch)


async def test_chains_and_has(world: World, http: httpx.AsyncClient) -> None:
    await check_chained_parameters(world, http)
    await check_chain_errors(world, http)
    await check_has(world, http)
    await check_has_errors(world, http)


async def test_paging_access_and_audit(world: World, http: httpx.AsyncClient) -> None:
    await check_access_audit_records_included_resources(world, http)  # first: the only search yet
    await check_paging_keeps_the_parameters(world, http)
    await check_links_to_types_the_token_may_not_read(world)


async def test_a_real_client_and_the_declared_values(world: World, http: httpx.AsyncClient) -> None:
    await check_fhirpy_revinclude_and_chaining(world)
    await check_declared_include_values_work(world, http)


# ---------------------------------------------------------------------------- query plans
@pytest.mark.parametrize(
    ("resource_type", "params", "tables"),
    [
        (
            "Encounter",
            [("subject.family", "osei")],
            ["search_reference", "search_string", "encounter", "patient"],
        ),
        (
            "Encounter",
            [("location.name", "4w")],
            ["search_reference", "search_string", "encounter", "location"],
        ),
        (
            "Patient",
            [("_has:Encounter:subject:status", "in-progress")],
            ["search_reference", "search_token", "patient"],
        ),
    ],
)
def test_chain_and_has_are_sub_selects_served_by_indexes(
    store: Store, resource_type: str, params: list[tuple[str, str]], tables: list[str]
) -> None:
    """A chain and a _has are sub-selects of the page statement: each table read through an index."""
    fill_plan_store(store)
    assert_indexed(search_plans(store, resource_type, params), tables, store.dialect)


def test_revinclude_is_one_indexed_statement(store: Store) -> None:
    ids = fill_plan_store(store)
    params = [("_id", ids["Patient"]), ("_revinclude", "Encounter:subject")]
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query("Patient", params))
    assert len(page.included) == 12 and {t for t, _, _ in page.included} == {"Encounter"}
    plan = search_plans(store, "Patient", params)
    assert_indexed(plan, ["search_reference", "encounter"], store.dialect)
