"""The FHIR R4 API over a real socket (uvicorn) against the real store (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import uvicorn
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhirpy import SyncFHIRClient
from sqlalchemy import func, select

from hms_ach.app.http import create_app
from hms_ach.auth.authenticate import Authenticator
from hms_ach.core.records import FHIR_SERVED, MappingResult, RecordWrite
from hms_ach.fhir import routes
from hms_ach.store import db, resources
from hms_ach.store.db import Store
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.repository import Repository
from hms_ach.store.search_params import SEARCH_PARAMS
from tests.integration.engine_helpers import READ_INTERACTIONS, auth_headers, local_authenticator

MRN = "urn:oid:1.2.3.mrn"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
FHIR_JSON = "application/fhir+json; charset=utf-8"


def _rec(alias: str, rtype: str, key: str | None, content: dict[str, Any]) -> RecordWrite:
    return RecordWrite(alias, rtype, f"urn:test:{rtype}" if key else None, key, content)


SEED = [
    _rec(
        "munoz",
        "Patient",
        "1001",
        {
            "identifier": [{"system": MRN, "value": "1001"}],
            "name": [{"family": "Muñoz", "given": ["José"]}],
            "gender": "male",
            "birthDate": "1980-02-29",
        },
    ),
    _rec(
        "munoz2",
        "Patient",
        "1002",
        {
            "identifier": [{"system": MRN, "value": "1002"}],
            "name": [{"family": "Muñoz-Pérez", "given": ["Ana"]}],
            "gender": "female",
            "birthDate": "1975-06",
        },
    ),
    _rec(
        "smith",
        "Patient",
        "1003",
        {
            "identifier": [
                {"system": MRN, "value": "1003"},
                {"system": "urn:ssn", "value": "999"},
                {"value": "LOCAL-7"},
                {"system": "urn:x", "value": "A,B"},
            ],
            "name": [{"family": "Smith", "given": ["John", "Q"]}],
            "gender": "male",
            "birthDate": "2001-11-26",
        },
    ),
    _rec(
        "obrien",
        "Patient",
        "1004",
        {
            "identifier": [{"system": MRN, "value": "1004"}],
            "name": [{"family": "O'Brien_", "given": ["Maeve"]}],
            "birthDate": "1990-01-01",
        },
    ),
    _rec(
        "gone",
        "Patient",
        "1005",
        {
            "identifier": [{"system": MRN, "value": "1005"}],
            "name": [{"family": "Muñoz", "given": ["Deleted"]}],
            "gender": "male",
            "birthDate": "1980-02-29",
        },
    ),
    _rec(
        "org",
        "Organization",
        "O1",
        {
            "identifier": [{"system": "urn:org", "value": "O1"}],
            "name": "Hôpital Général",
            "alias": ["HG"],
            "active": True,
        },
    ),
    _rec(
        "d1",
        "Practitioner",
        "D1",
        {
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
            "name": [{"family": "Nguyễn", "given": ["Thị"]}],
            "active": True,
        },
    ),
    _rec(
        "d2",
        "Practitioner",
        "D2",
        {
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1111111112"}],
            "name": [{"family": "Álvarez", "given": ["Luis"]}],
            "active": False,
        },
    ),
    _rec(
        "r1",
        "PractitionerRole",
        "R1",
        {
            "identifier": [{"system": "urn:role", "value": "R1"}],
            "practitioner": {"reference": "@d1"},
            "organization": {"reference": "@org"},
            "active": True,
            "code": [{"coding": [{"system": "urn:roles", "code": "doctor"}]}],
        },
    ),
    _rec(
        "ward",
        "Location",
        "4W",
        {
            "identifier": [{"system": "urn:loc", "value": "4W"}],
            "name": "Ward 4 Wést",
            "alias": ["Quatre"],
            "status": "active",
            "type": [{"coding": [{"system": "urn:loctype", "code": "WARD"}]}],
        },
    ),
    _rec(
        "bed",
        "Location",
        "4W-412-B",
        {
            "identifier": [{"system": "urn:loc", "value": "4W-412-B"}],
            "name": "Bed 412-B",
            "status": "suspended",
            "operationalStatus": {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": "O"},
            "partOf": {"reference": "@ward"},
        },
    ),
    _rec(
        "e1",
        "Encounter",
        "V1",
        {
            "identifier": [{"system": "urn:visit", "value": "V1"}],
            "status": "in-progress",
            "class": {"system": ACT, "code": "IMP"},
            "subject": {"reference": "@munoz"},
            "period": {"start": "2026-11-26T08:00:00Z"},
            "location": [{"location": {"reference": "@bed"}}],
            "participant": [{"individual": {"reference": "@d1"}}],
        },
    ),
    _rec(
        "e2",
        "Encounter",
        "V2",
        {
            "identifier": [{"system": "urn:visit", "value": "V2"}],
            "status": "finished",
            "class": {"system": ACT, "code": "AMB"},
            "subject": {"reference": "@smith"},
            "period": {"start": "2026-11-20T09:00:00Z", "end": "2026-11-20T10:00:00Z"},
            "location": [{"location": {"reference": "@ward"}}],
            "participant": [{"individual": {"reference": "@d2"}}],
        },
    ),
    _rec(
        "e3",
        "Encounter",
        "V3",
        {
            "identifier": [{"system": "urn:visit", "value": "V3"}],
            "status": "finished",
            "class": {"system": ACT, "code": "EMER"},
            "subject": {"reference": "@munoz2"},
            "period": {"start": "2026-10-01T00:00:00Z", "end": "2026-10-03T00:00:00Z"},
            "participant": [{"individual": {"reference": "@r1"}}],
        },
    ),
]


def _apply(store: Store, records: list[RecordWrite]) -> dict[str, str]:
    with store.writer.begin() as conn:
        outcomes = Repository(conn).apply(MappingResult(records=records))
    return {rec.alias: out.id for rec, out in zip(records, outcomes, strict=True)}


@pytest.fixture
def ids(store: Store) -> dict[str, str]:
    """Seed the store; the ``gone`` patient is deleted as a FHIR DELETE deletes it: a new version
    flagged deleted, whose search-index rows are removed (searches and their totals rely on that)."""
    found = _apply(store, SEED)
    with store.writer.begin() as conn:
        resources.delete(conn, "Patient", found["gone"], None)
    return found


def test_a_deleted_record_keeps_no_search_index_rows(store: Store, ids: dict[str, str]) -> None:
    with store.reader.connect() as conn:
        for model in INDEX_TABLES.values():
            t = model.__table__  # type: ignore[attr-defined]
            assert (
                conn.execute(
                    select(func.count()).select_from(t).where(t.c.resource_id == ids["gone"])
                ).scalar_one()
                == 0
            )
        flag = RECORD_TABLES["Patient"].__table__.c.deleted  # type: ignore[attr-defined]
        assert conn.execute(select(flag).where(flag.table.c.id == ids["gone"])).scalar_one() is True


class _Server:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    return local_authenticator(tmp_path / "data")


@pytest.fixture
def token(auth: Authenticator) -> dict[str, str]:
    """The headers of a token that may read everything."""
    return auth_headers(auth)


@pytest.fixture
def base(store: Store, auth: Authenticator) -> Iterator[str]:
    app = create_app(store, authenticator=auth)

    def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/boom", boom)
    with _Server(app) as url:
        yield url


@pytest.fixture
def http(base: str, token: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/fhir", timeout=10, headers=token) as client:
        yield client


def _search(http: httpx.Client, url: str, **kw: Any) -> dict[str, Any]:
    r = http.get(url, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == FHIR_JSON
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def _matches(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _found(http: httpx.Client, ids: dict[str, str], url: str) -> set[str]:
    """The aliases of the records ``url`` matches (total checked against the entries)."""
    bundle = _search(http, url)
    by_id = {v: k for k, v in ids.items()}
    assert bundle["total"] == len(_matches(bundle))
    return {by_id.get(i, i) for i in _matches(bundle)}


def _outcome(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "OperationOutcome"
    if code:
        assert body["issue"][0]["code"] == code
    return body


# ---------------------------------------------------------------------------- metadata, read, history
def test_capability_statement_is_valid_and_generated(http: httpx.Client) -> None:
    r = http.get("/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == FHIR_JSON
    cs = CapabilityStatement.model_validate(r.json())
    assert cs.software and cs.rest
    assert cs.fhirVersion == "4.0.1" and cs.kind == "instance" and cs.software.name == "hms-ach"
    resources = {res.type: res for res in cs.rest[0].resource or []}
    assert set(resources) == {*FHIR_SERVED, "AuditEvent"}
    for rtype in FHIR_SERVED:
        res = resources[rtype]
        assert {p.name for p in res.searchParam or []} == set(SEARCH_PARAMS[rtype])
        # no fhir_rest channel here: read-only, no write interactions, no transaction/batch
        assert {i.code for i in res.interaction or []} == READ_INTERACTIONS
        assert res.conditionalCreate is None and res.versioning == "versioned"
    assert {i.code for i in cs.rest[0].interaction or []} == {"history-system", "search-system"}
    assert [i.code for i in resources["AuditEvent"].interaction or []] == ["read", "search-type"]
    assert {p.name for p in resources["AuditEvent"].searchParam or []} == {
        "entity",
        "agent",
        "date",
        "_lastUpdated",
        "patient",
        "subtype",
    }
    qual = next(p for p in resources["Practitioner"].searchParam or [] if p.name == "qualification-period")
    assert qual.definition == "urn:hms-ach:fhir:SearchParameter/Practitioner-qualification-period"
    assert "Encounter:patient" in (resources["Encounter"].searchInclude or [])


def test_read_serves_stored_bytes_with_etag(store: Store, http: httpx.Client, ids: dict[str, str]) -> None:
    r = http.get(f"/Patient/{ids['munoz']}")
    assert r.status_code == 200 and r.headers["content-type"] == FHIR_JSON
    assert r.headers["etag"] == 'W/"1"' and r.headers["last-modified"].endswith("GMT")
    table = RECORD_TABLES["Patient"].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        stored = conn.execute(select(table.c.resource).where(table.c.id == ids["munoz"])).scalar_one()
    assert r.content == stored.encode()
    assert http.get(f"/Patient/{ids['munoz']}", headers={"If-None-Match": 'W/"1"'}).status_code == 304


def test_read_errors_are_operation_outcomes(http: httpx.Client, ids: dict[str, str]) -> None:
    _outcome(http.get("/Patient/does-not-exist"), 404, "not-found")
    _outcome(http.get(f"/Encounter/{ids['munoz']}"), 404, "not-found")
    _outcome(http.get(f"/Patient/{ids['gone']}"), 410, "deleted")
    _outcome(http.get("/Spaceship/1"), 404, "not-supported")
    _outcome(http.get("/Spaceship"), 404, "not-supported")
    _outcome(http.get("/Patient/" + quote("x' OR '1'='1", safe="")), 404, "not-found")
    _outcome(http.delete(f"/Patient/{ids['munoz']}"), 405)
    _outcome(http.get("/Patient/a/b/c/d"), 404)


def test_vread_and_history(store: Store, http: httpx.Client, ids: dict[str, str]) -> None:
    for gender in ("other", "unknown"):
        _apply(store, [_rec("munoz", "Patient", "1001", {"gender": gender})])
    pid = ids["munoz"]
    r = http.get(f"/Patient/{pid}/_history/1")
    assert r.status_code == 200 and r.json()["gender"] == "male" and r.headers["etag"] == 'W/"1"'
    assert http.get(f"/Patient/{pid}").json()["meta"]["versionId"] == "3"
    _outcome(http.get(f"/Patient/{pid}/_history/99"), 404)
    _outcome(http.get(f"/Patient/{pid}/_history/x"), 404)
    hist = http.get(f"/Patient/{pid}/_history").json()
    assert hist["type"] == "history" and hist["total"] == 3
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["3", "2", "1"]
    assert hist["entry"][-1]["request"]["method"] == "POST" and hist["entry"][0]["request"]["method"] == "PUT"
    page = http.get(f"/Patient/{pid}/_history", params={"_count": 2}).json()
    assert len(page["entry"]) == 2
    nxt = next(lk["url"] for lk in page["link"] if lk["relation"] == "next")
    rest = http.get(nxt).json()
    assert [e["resource"]["meta"]["versionId"] for e in rest["entry"]] == ["1"]
    assert not any(lk["relation"] == "next" for lk in rest["link"])
    _outcome(http.get("/Patient/nobody/_history"), 404)
    _outcome(http.get(f"/Patient/{pid}/_history", params={"_count": "-1"}), 400)


# ---------------------------------------------------------------------------- Patient parameters
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("identifier=urn:oid:1.2.3.mrn|1001", {"munoz"}),
        ("identifier=1001", {"munoz"}),
        ("identifier=wrong|1001", set()),
        ("identifier=|LOCAL-7", {"smith"}),
        ("identifier=|1001", set()),
        ("identifier=urn:ssn|", {"smith"}),
        ("identifier=urn:x|A\\,B", {"smith"}),
        ("identifier=1001,1004", {"munoz", "obrien"}),
        ("identifier:not=urn:oid:1.2.3.mrn|1001", {"munoz2", "smith", "obrien"}),
        ("name=jos", {"munoz"}),
        ("name=MUÑ", {"munoz", "munoz2"}),
        ("name=munoz", {"munoz", "munoz2"}),
        ("name=perez", set()),
        ("name:contains=PEREZ", {"munoz2"}),
        ("name:contains=o", {"munoz", "munoz2", "obrien", "smith"}),
        ("family:exact=Muñoz", {"munoz"}),
        ("family:exact=muñoz", set()),
        ("family=o'brien_", {"obrien"}),
        ("family=o'brie_", set()),
        ("family=%25", set()),
        ("family=_", set()),
        ("given=jose&family=munoz", {"munoz"}),
        ("given=ana,john", {"munoz2", "smith"}),
        ("given=ana&given=john", set()),
        ("gender=male", {"munoz", "smith"}),
        ("gender=male,female", {"munoz", "munoz2", "smith"}),
        ("gender:missing=true", {"obrien"}),
        ("gender:missing=false", {"munoz", "munoz2", "smith"}),
        ("birthdate=1980-02-29", {"munoz"}),
        ("birthdate=1975", {"munoz2"}),
        ("birthdate=1975-06-15", set()),
        ("birthdate=gt1985", {"smith", "obrien"}),
        ("birthdate=lt1980", {"munoz2"}),
        ("birthdate=ge1990-01-01", {"obrien", "smith"}),
        ("birthdate=le1980-02-29", {"munoz", "munoz2"}),
        ("birthdate=ne1980-02-29", {"munoz2", "smith", "obrien"}),
        ("birthdate=eb1990", {"munoz", "munoz2"}),
        ("birthdate=sa1990", {"smith"}),
        ("birthdate=ge1980&birthdate=lt2000", {"munoz", "obrien"}),
        ("_lastUpdated=gt2000", {"munoz", "munoz2", "smith", "obrien"}),
        ("_lastUpdated=lt2000", set()),
        ("_lastUpdated=ge9000-01-01", set()),
    ],
)
def test_patient_search(http: httpx.Client, ids: dict[str, str], query: str, expected: set[str]) -> None:
    assert _found(http, ids, f"/Patient?{query}") == expected


def test_id_search_and_deleted_never_match(http: httpx.Client, ids: dict[str, str]) -> None:
    assert _found(http, ids, f"/Patient?_id={ids['munoz']},{ids['smith']}") == {"munoz", "smith"}
    assert _found(http, ids, f"/Patient?_id={ids['gone']}") == set()
    assert "gone" not in _found(http, ids, "/Patient?family=munoz&_count=100")
    assert _found(http, ids, "/Patient") == {"munoz", "munoz2", "smith", "obrien"}


def test_last_updated_today(http: httpx.Client, ids: dict[str, str]) -> None:
    stamp = http.get(f"/Patient/{ids['munoz']}").json()["meta"]["lastUpdated"]
    assert "munoz" in _found(http, ids, f"/Patient?_lastUpdated={stamp[:10]}")
    assert _found(http, ids, f"/Patient?_lastUpdated=le{stamp[:10]}&_id={ids['munoz']}") == {"munoz"}


# ---------------------------------------------------------------------------- other resource types
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("identifier=urn:visit|V2", {"e2"}),
        ("status=finished", {"e2", "e3"}),
        ("status=finished,in-progress", {"e1", "e2", "e3"}),
        (f"class={ACT}|IMP", {"e1"}),
        ("class=AMB,EMER", {"e2", "e3"}),
        ("class=urn:other|IMP", set()),
        ("date=2026-11-20", {"e2"}),
        ("date=2026-11", {"e2"}),
        ("date=ge2026-11-21", {"e1"}),
        ("date=gt2026-11-20", {"e1"}),
        ("date=lt2026-11-01", {"e3"}),
        ("date=le2026-11-20", {"e2", "e3"}),
        ("date=ne2026-11-20", {"e1", "e3"}),
        ("date=sa2026-11-20", {"e1"}),
        ("date=eb2026-11-20", {"e3"}),
        ("date=ge2026-11-01&date=lt2026-11-25", {"e2"}),
        ("date=2026-11-26T08:00:00Z", set()),
        ("date=ge2026-11-26T09:00:00%2B01:00", {"e1"}),
        ("date=ge2026-11-26T09:00:00+01:00", {"e1"}),
    ],
)
def test_encounter_search(http: httpx.Client, ids: dict[str, str], query: str, expected: set[str]) -> None:
    assert _found(http, ids, f"/Encounter?{query}") == expected


def test_encounter_references(base: str, http: httpx.Client, ids: dict[str, str]) -> None:
    pid = ids["munoz"]
    for value in (
        f"Patient/{pid}",
        pid,
        f"{base}/fhir/Patient/{pid}",
        f"http://elsewhere.example/Patient/{pid}",
    ):
        assert _found(http, ids, f"/Encounter?patient={quote(value, safe='')}") == {"e1"}, value
        assert _found(http, ids, f"/Encounter?subject={quote(value, safe='')}") == {"e1"}, value
    assert _found(http, ids, f"/Encounter?subject:Patient={pid}") == {"e1"}
    assert _found(http, ids, f"/Encounter?patient=Practitioner/{pid}") == set()
    assert _found(http, ids, f"/Encounter?patient={pid},{ids['smith']}") == {"e1", "e2"}
    assert _found(http, ids, f"/Encounter?location=Location/{ids['ward']}") == {"e2"}
    assert _found(http, ids, f"/Encounter?practitioner={ids['d1']}") == {"e1"}
    assert _found(http, ids, f"/Encounter?participant=PractitionerRole/{ids['r1']}") == {"e3"}
    assert _found(http, ids, f"/Encounter?practitioner={ids['r1']}") == set()
    assert _found(http, ids, "/Encounter?location:missing=true") == {"e3"}


def test_location_practitioner_role_organization(http: httpx.Client, ids: dict[str, str]) -> None:
    assert _found(http, ids, "/Location?identifier=urn:loc|4W-412-B") == {"bed"}
    assert _found(http, ids, "/Location?name=ward 4 west") == {"ward"}
    assert _found(http, ids, "/Location?name=quatre") == {"ward"}
    assert _found(http, ids, "/Location?status=suspended") == {"bed"}
    assert _found(http, ids, "/Location?operational-status=O") == {"bed"}
    assert _found(http, ids, "/Location?type=urn:loctype|WARD") == {"ward"}
    assert _found(http, ids, f"/Location?partof={ids['ward']}") == {"bed"}
    assert _found(http, ids, "/Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893") == {"d1"}
    assert _found(http, ids, "/Practitioner?name=nguyen") == {"d1"}
    assert _found(http, ids, "/Practitioner?family=alv") == {"d2"}
    assert _found(http, ids, "/Practitioner?given=thi") == {"d1"}
    assert _found(http, ids, "/Practitioner?active=false") == {"d2"}
    assert _found(http, ids, f"/PractitionerRole?practitioner=Practitioner/{ids['d1']}") == {"r1"}
    assert _found(http, ids, "/PractitionerRole?role=urn:roles|doctor") == {"r1"}
    assert _found(http, ids, f"/PractitionerRole?organization={ids['org']}") == {"r1"}
    assert _found(http, ids, "/PractitionerRole?active=true&identifier=R1") == {"r1"}
    assert _found(http, ids, "/Organization?identifier=urn:org|O1") == {"org"}
    assert _found(http, ids, "/Organization?name=hopital") == {"org"}
    assert _found(http, ids, "/Organization?name=hg&active=true") == {"org"}


# ---------------------------------------------------------------------------- result parameters
def test_include(http: httpx.Client, ids: dict[str, str]) -> None:
    url = (
        "/Encounter?_include=Encounter:patient&_include=Encounter:practitioner"
        "&_include=Encounter:location&_sort=date"
    )
    bundle = _search(http, url)
    assert _matches(bundle) == [ids["e3"], ids["e2"], ids["e1"]]
    included = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle["entry"]
        if e["search"]["mode"] == "include"
    }
    assert included == {("Patient", ids[a]) for a in ("munoz", "munoz2", "smith")} | {
        ("Practitioner", ids["d1"]),
        ("Practitioner", ids["d2"]),
        ("Location", ids["bed"]),
        ("Location", ids["ward"]),
    }
    assert bundle["total"] == 3
    subject = _search(
        http, f"/Encounter?_id={ids['e3']}&_include=Encounter:subject&_include=Encounter:participant"
    )
    kinds = sorted(
        e["resource"]["resourceType"] for e in subject["entry"] if e["search"]["mode"] == "include"
    )
    assert kinds == ["Patient", "PractitionerRole"]
    for entry in subject["entry"]:
        assert entry["fullUrl"].endswith(f"/{entry['resource']['resourceType']}/{entry['resource']['id']}")
    _outcome(http.get("/Encounter?_include=Encounter:status"), 400)
    _outcome(http.get("/Encounter?_include=Patient:link"), 400)
    _outcome(http.get("/Encounter?_include:iterate=Encounter:name"), 400)


def test_sort(http: httpx.Client, ids: dict[str, str]) -> None:
    def order(url: str) -> list[str]:
        by_id = {v: k for k, v in ids.items()}
        return [by_id[i] for i in _matches(_search(http, url))]

    assert order("/Patient?_sort=family") == ["munoz", "munoz2", "obrien", "smith"]
    assert order("/Patient?_sort=-family") == ["smith", "obrien", "munoz2", "munoz"]
    assert order("/Patient?_sort=birthdate") == ["munoz2", "munoz", "obrien", "smith"]
    assert order("/Patient?_sort=-birthdate,family") == ["smith", "obrien", "munoz", "munoz2"]
    assert order("/Encounter?_sort=-date") == ["e1", "e2", "e3"]
    assert order("/Encounter?_sort=status,-date") == ["e2", "e3", "e1"]
    assert order("/Patient?_sort=_lastUpdated&family=munoz") == ["munoz", "munoz2"]
    assert order("/Patient?_sort=-_id") == sorted(order("/Patient"), key=lambda a: ids[a], reverse=True)
    for bad in ("nope", "-", "identifier,", "subject", ";DROP TABLE patient", "name desc"):
        _outcome(http.get("/Patient", params={"_sort": bad}), 400)


def test_count(http: httpx.Client, ids: dict[str, str]) -> None:
    zero = _search(http, "/Patient?_count=0")
    assert zero["total"] == 4 and "entry" not in zero
    assert not any(lk["relation"] == "next" for lk in zero["link"])
    assert _search(http, "/Patient?_summary=count")["total"] == 4
    assert len(_matches(_search(http, "/Patient?_count=1000"))) == 4
    assert "total" not in _search(http, "/Patient?_total=none")
    for bad in ("-1", "abc", "1.5", "", "1e3"):
        r = http.get("/Patient", params={"_count": bad})
        if bad == "":
            assert r.status_code == 200
        else:
            _outcome(r, 400, "invalid")


def _new_patients(store: Store, prefix: str, n: int) -> list[str]:
    records = [
        _rec(
            f"{prefix}{i}",
            "Patient",
            f"{prefix}-{i}",
            {"name": [{"family": f"Pager{prefix}{i:03d}"}], "birthDate": f"19{50 + i % 40}-01-01"},
        )
        for i in range(n)
    ]
    return list(_apply(store, records).values())


@pytest.mark.parametrize("sort", ["", "&_sort=-family", "&_sort=birthdate"])
def test_paging_never_skips_or_repeats_while_writing(store: Store, http: httpx.Client, sort: str) -> None:
    original = set(_new_patients(store, "a", 45))
    seen: list[str] = []
    url: str | None = f"/Patient?family=pager&_count=10&_total=accurate{sort}"
    pages = 0
    while url:
        bundle = _search(http, url)
        seen += _matches(bundle)
        url = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)
        pages += 1
        # concurrent writers: new matching records, and new versions of records already listed
        _new_patients(store, f"n{pages}x", 3)
        _apply(store, [_rec("a1", "Patient", "a-1", {"gender": ["male", "female"][pages % 2]})])
        assert pages < 50
    assert len(seen) == len(set(seen)), "a record was returned twice"
    assert original <= set(seen), "a record that existed throughout was skipped"
    assert bundle["total"] >= 45


def test_cursor_with_long_sort_keys(store: Store, http: httpx.Client) -> None:
    names = [{"family": "Long" + c * 300, "given": [c * 300]} for c in "abc"]
    _apply(store, [_rec(f"l{i}", "Patient", f"l-{i}", {"name": [n]}) for i, n in enumerate(names)])
    seen: list[str] = []
    url: str | None = "/Patient?family=long&_sort=family,given,-birthdate&_count=1"
    while url:
        bundle = _search(http, url)
        seen += [e["resource"]["name"][0]["family"][4] for e in bundle.get("entry", [])]
        url = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)
    assert seen == ["a", "b", "c"]


def test_cursor_is_checked(http: httpx.Client, ids: dict[str, str]) -> None:
    page = _search(http, "/Patient?_count=1")
    nxt = next(lk["url"] for lk in page["link"] if lk["relation"] == "next")
    cursor = httpx.URL(nxt).params["_cursor"]
    _outcome(http.get("/Patient", params={"_count": 1, "_cursor": cursor, "gender": "male"}), 400)
    _outcome(http.get("/Patient", params={"_cursor": "not-a-cursor"}), 400)
    _outcome(http.get("/Patient", params={"_cursor": cursor[:-3] + "AAA"}), 400)
    later = _search(http, "/Patient", params={"_count": 3, "_cursor": cursor})
    assert len(_matches(later)) == 3 and "total" not in later  # no total unless asked


def test_total_is_counted_only_when_asked(http: httpx.Client, ids: dict[str, str]) -> None:
    assert _search(http, "/Patient?_count=10")["total"] == 4  # every match on the first page: free
    assert "total" not in _search(http, "/Patient?_count=2")  # more pages: not counted unless asked
    assert _search(http, "/Patient?_count=2&_total=accurate")["total"] == 4
    assert _search(http, "/Patient?_count=2&_total=estimate")["total"] == 4  # under the bound: exact
    assert _search(http, "/Patient?_count=0")["total"] == 4  # the total is the whole answer
    assert "total" not in _search(http, "/Patient?_count=2&_total=none")
    assert "total" not in _search(http, "/Patient?_count=10&_total=none")


def test_post_search_form(http: httpx.Client, ids: dict[str, str]) -> None:
    r = http.post("/Patient/_search?gender=male", data={"family": "munoz"})
    assert r.status_code == 200 and _matches(r.json()) == [ids["munoz"]]
    r = http.post(
        "/Patient/_search", content=b'{"family": "munoz"}', headers={"Content-Type": "application/json"}
    )
    _outcome(r, 415, "not-supported")
    _outcome(
        http.post(
            "/Patient/_search",
            content=b"x" * 70000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        413,
    )
    _outcome(http.post("/Spaceship/_search", data={"a": "b"}), 404)


# ---------------------------------------------------------------------------- errors and negotiation
def test_content_negotiation(http: httpx.Client, ids: dict[str, str]) -> None:
    for fmt in ("json", "application/json", "application/fhir+json"):
        assert http.get("/Patient", params={"_format": fmt}).status_code == 200
    for fmt in ("xml", "application/fhir+xml", "html"):
        _outcome(http.get("/Patient", params={"_format": fmt}), 406, "not-supported")
    _outcome(http.get("/metadata", headers={"Accept": "application/fhir+xml"}), 406)
    _outcome(http.get(f"/Patient/{ids['munoz']}", headers={"Accept": "application/xml, text/xml"}), 406)
    assert http.get("/Patient", headers={"Accept": "application/xml, */*;q=0.1"}).status_code == 200
    assert http.get("/Patient", headers={"Accept": "application/json"}).status_code == 200


def test_unknown_parameters_and_strict_handling(http: httpx.Client, ids: dict[str, str]) -> None:
    lenient = _search(http, "/Patient?nickname=joe&family=smith")
    assert _matches(lenient) == [ids["smith"]]
    outcomes = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and "nickname" in outcomes[0]["resource"]["issue"][0]["diagnostics"]
    assert "nickname" not in lenient["link"][0]["url"]
    strict = http.get("/Patient?nickname=joe", headers={"Prefer": "handling=strict"})
    _outcome(strict, 400, "not-supported")
    assert http.get("/Patient?family=x", headers={"Prefer": "handling=strict"}).status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "name:text=x",
        "gender:below=m",
        "birthdate:exact=1980",
        "birthdate=1980-13",
        "birthdate=yesterday",
        "subject.name.family=x",
        "_has:Encounter:patient=x",
        "family:missing=maybe",
        "_total=some",
        "_revinclude=Encounter:location",
    ],
)
def test_unsupported_searches_are_400(http: httpx.Client, query: str) -> None:
    target = "Encounter" if query.startswith("subject") else "Patient"
    _outcome(http.get(f"/{target}?{query}"), 400)


@pytest.mark.parametrize(
    "params",
    [
        {"name": "' OR 1=1--"},
        {"family": "x'; DROP TABLE patient; --"},
        {"_id": "1' OR '1'='1"},
        {"identifier": "a|b|c' OR 1=1"},
        {"family": "\\"},
        {"family": "%%%"},
        {"given": "Robert'); DROP TABLE search_string;--"},
    ],
)
def test_injection_like_values_find_nothing(
    store: Store, http: httpx.Client, ids: dict[str, str], params: dict[str, str]
) -> None:
    bundle = _search(http, "/Patient", params=params)
    assert bundle["total"] == 0
    table = RECORD_TABLES["Patient"].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 5


@pytest.mark.parametrize(
    "params",
    [
        {"_sort": ";DROP TABLE patient"},
        {"_count": "-1"},
        {"name": "x" * 5000},
        {"family": "a\x00b"},
        {"birthdate": "ge' or 1=1"},
        {"_count": "99999999999999999999999x"},
    ],
)
def test_hostile_values_are_400(http: httpx.Client, params: dict[str, str]) -> None:
    _outcome(http.get("/Patient", params=params), 400)


def test_unexpected_errors_are_500_outcomes_without_details(base: str, token: dict[str, str]) -> None:
    r = httpx.get(f"{base}/boom", headers=token)
    body = _outcome(r, 500, "exception")
    assert "secret" not in r.text and "Traceback" not in r.text
    assert body["issue"][0]["severity"] == "error"


def test_a_search_that_finds_no_free_slot_in_time_is_answered_503_with_retry_after(
    store: Store, auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the searches that run past the event loop's deadline run again in a few slots
    (routes.search_slots): one that waits longer than SEARCH_SLOT_WAIT_SECONDS for one is answered
    503 ``transient`` with Retry-After, as a client expects of a busy server; a read by id takes no
    slot and still answers."""
    if store.dialect != "sqlite":
        pytest.skip("on PostgreSQL the searches have no slots (they wait on the network, not the GIL)")
    monkeypatch.setattr(routes, "INLINE_SEARCH_SECONDS", 0.0)  # every search past the deadline
    monkeypatch.setattr(db, "BUDGET_STEPS", 1)
    monkeypatch.setattr(routes, "SEARCH_SLOT_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(routes, "search_slots", lambda _store: asyncio.Semaphore(0))  # every slot taken
    with (
        _Server(create_app(store, authenticator=auth)) as url,
        httpx.Client(base_url=f"{url}/fhir", timeout=10, headers=auth_headers(auth)) as client,
    ):
        r = client.get("/Patient", params={"family": "Mu"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        issue = r.json()["issue"][0]
        assert issue["code"] == "transient" and "every search slot was busy for 0.2 s" in issue["diagnostics"]
        assert client.get("/Patient/no-such-id").status_code == 404


def test_health(base: str) -> None:
    r = httpx.get(f"{base}/health")
    assert r.status_code == 200 and orjson.loads(r.content) == {"status": "ok"}


# ---------------------------------------------------------------------------- a real FHIR client as peer
def test_fhirpy_client_pages_reads_and_counts(
    store: Store, base: str, token: dict[str, str], ids: dict[str, str]
) -> None:
    made = set(_new_patients(store, "f", 25))
    client = SyncFHIRClient(f"{base}/fhir", authorization=token["authorization"])
    found = client.resources("Patient").search(family="pagerf").limit(7).fetch_all()
    assert len(found) == 25 and {p["id"] for p in found} == made
    assert client.resources("Patient").search(name="muñoz").count() == 2
    patient = client.reference("Patient", ids["munoz"]).to_resource()
    assert patient["name"][0]["family"] == "Muñoz"
    encounters = (
        client.resources("Encounter").search(patient=ids["munoz"]).include("Encounter", "patient").fetch()
    )
    assert [e["id"] for e in encounters] == [ids["e1"]]
