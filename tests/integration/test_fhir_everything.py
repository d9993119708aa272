"""``Patient/[id]/$everything`` and ``Encounter/[id]/$everything`` (issue 15, item 4) against a running
engine, through fhirpy and fhirclient: the compartment, ``_type``, ``_since``, paging that never
skips or repeats, the scopes and the patient compartment of a SMART token, and the access records.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fhirclient.models.bundle import Bundle as ClientBundle
from fhirpy import AsyncFHIRClient

from hms_ach.app.runtime import Engine
from hms_ach.core.records import RECORD_TYPES, RecordType
from hms_ach.fhir.capability import capability_statement
from hms_ach.fhir.everything import patient_params, reference_params
from tests.integration.engine_helpers import FHIR_JSON, STAFF, auth_headers

MRN = "urn:hms-ach:id:mrn"


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    resp = await http.post(f"/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["id"]
    return rid


def patient(mrn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "gender": "female"}


def encounter(number: str, patient_id: str, location: str, practitioner: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": "urn:hms-ach:id:visit", "value": number}],
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "location": [{"location": {"reference": f"Location/{location}"}}],
        "participant": [{"individual": {"reference": f"Practitioner/{practitioner}"}}],
    }


async def seed(http: httpx.AsyncClient) -> dict[str, Any]:
    """Two patients; the first with 5 encounters, the second with 1; one ward and one nurse."""
    ward = await create(
        http, {"resourceType": "Location", "identifier": [{"system": "urn:w", "value": "4W"}], "name": "4W"}
    )
    nurse = await create(
        http, {"resourceType": "Practitioner", "identifier": [{"system": STAFF, "value": "E1"}]}
    )
    alice, bob = await create(http, patient("P1")), await create(http, patient("P2"))
    visits = [await create(http, encounter(f"V{i}", alice, ward, nurse)) for i in range(5)]
    other = await create(http, encounter("V9", bob, ward, nurse))
    return {"ward": ward, "nurse": nurse, "alice": alice, "bob": bob, "visits": visits, "other": other}


def refs(body: dict[str, Any]) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])]


async def all_pages(http: httpx.AsyncClient, url: str) -> list[str]:
    out: list[str] = []
    next_url: str | None = url
    while next_url is not None:
        resp = await http.get(next_url)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        ClientBundle(body)  # fhirclient parses every page
        out += refs(body)
        next_url = next((link["url"] for link in body.get("link", []) if link["relation"] == "next"), None)
    return out


def test_the_capability_statement_declares_the_operations() -> None:
    rest = capability_statement("http://x/fhir")["rest"][0]
    ops = {r["type"]: [o["name"] for o in r.get("operation", [])] for r in rest["resource"]}
    assert ops["Patient"] == ["everything", "export"] and ops["Encounter"] == ["everything"]
    assert rest["operation"] == [
        {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
    ]


def test_the_compartment_comes_from_the_record_types(monkeypatch: pytest.MonkeyPatch) -> None:
    assert patient_params("Encounter") == ("patient", "subject")
    assert patient_params("Coverage") == ("beneficiary", "patient")
    assert patient_params("Location") == ()
    assert "subject" in reference_params("Encounter")
    # a new type with a patient parameter belongs with no change to $everything
    allergy = RecordType(
        name="AllergyIntolerance",
        table="allergy_intolerance",
        fhir=True,
        writable=False,
        mirrored=False,
        description="test",
        params={"patient": ("reference", "patient", ("Patient",)), "asserter": ("reference", "asserter")},
    )
    monkeypatch.setitem(RECORD_TYPES, "AllergyIntolerance", allergy)
    assert patient_params("AllergyIntolerance") == ("patient",)
    assert reference_params("AllergyIntolerance") == ("asserter", "patient")


async def test_patient_everything_with_fhirpy(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    ids = await seed(http)
    client = AsyncFHIRClient(
        f"http://127.0.0.1:{fhir_engine.http_port}/fhir",
        authorization=auth_headers(fhir_engine)["authorization"],
    )
    body = await client.execute(f"Patient/{ids['alice']}/$everything", method="get")
    got = refs(body)
    assert got[0] == f"Patient/{ids['alice']}"
    assert sorted(got[1:]) == sorted(f"Encounter/{v}" for v in ids["visits"])
    assert f"Patient/{ids['bob']}" not in got and f"Encounter/{ids['other']}" not in got

    # paging: every record once, whatever the page size
    for count in (1, 2, 3, 6, 7):
        pages = await all_pages(http, f"/Patient/{ids['alice']}/$everything?_count={count}")
        assert pages == got, count

    # _type and _since
    only = refs((await http.get(f"/Patient/{ids['alice']}/$everything?_type=Encounter")).json())
    assert sorted(only) == sorted(f"Encounter/{v}" for v in ids["visits"])
    await asyncio.sleep(0.05)
    mark = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    await asyncio.sleep(0.05)
    changed = encounter("V0", ids["alice"], ids["ward"], ids["nurse"]) | {"status": "finished"}
    assert (
        await http.put(
            f"/Encounter/{ids['visits'][0]}", json=changed | {"id": ids["visits"][0]}, headers=FHIR_JSON
        )
    ).status_code == 200
    since = await http.get(f"/Patient/{ids['alice']}/$everything", params={"_since": mark})
    assert refs(since.json()) == [f"Encounter/{ids['visits'][0]}"]
    assert (await http.get(f"/Patient/{ids['alice']}/$everything?_type=Nope")).status_code == 404
    assert (await http.get(f"/Patient/{ids['alice']}/$everything?_since=never")).status_code == 400
    assert (await http.get("/Patient/unknown/$everything")).status_code == 404


async def test_encounter_everything(http: httpx.AsyncClient) -> None:
    ids = await seed(http)
    visit = ids["visits"][2]
    got = await all_pages(http, f"/Encounter/{visit}/$everything?_count=2")
    assert sorted(got) == sorted(
        [
            f"Encounter/{visit}",
            f"Patient/{ids['alice']}",
            f"Location/{ids['ward']}",
            f"Practitioner/{ids['nurse']}",
        ]
    )
    assert len(got) == len(set(got))


async def test_scopes_and_patient_compartment(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    ids = await seed(http)
    base = f"http://127.0.0.1:{fhir_engine.http_port}/fhir"
    async with httpx.AsyncClient(base_url=base, timeout=30) as anon:
        # a patient/ grant sees its own compartment only
        mine = auth_headers(fhir_engine, "patient/*.rs", patient=ids["alice"], sub="app-1")
        resp = await anon.get(f"/Patient/{ids['alice']}/$everything", headers=mine)
        assert resp.status_code == 200
        assert sorted(refs(resp.json())) == sorted(
            [f"Patient/{ids['alice']}"] + [f"Encounter/{v}" for v in ids["visits"]]
        )
        assert (await anon.get(f"/Patient/{ids['bob']}/$everything", headers=mine)).status_code == 404
        # its encounter's $everything leaves out the ward and the nurse (outside the compartment)
        resp = await anon.get(f"/Encounter/{ids['visits'][0]}/$everything", headers=mine)
        assert sorted(refs(resp.json())) == sorted(
            [f"Encounter/{ids['visits'][0]}", f"Patient/{ids['alice']}"]
        )
        # a type the token may not search is left out; no read of the focal type is 403
        only_patients = auth_headers(fhir_engine, "user/Patient.rs", sub="app-2")
        resp = await anon.get(f"/Patient/{ids['alice']}/$everything", headers=only_patients)
        assert refs(resp.json()) == [f"Patient/{ids['alice']}"]
        no_read = auth_headers(fhir_engine, "user/Encounter.rs", sub="app-3")
        assert (await anon.get(f"/Patient/{ids['alice']}/$everything", headers=no_read)).status_code == 403

    # every record served is recorded as an access of app-1
    records: list[str] = []
    for _ in range(50):
        resp = await http.get(
            "/AuditEvent", params={"agent": "app-1", "subtype": "search-type", "_count": 50}
        )
        records = [
            what["what"]["reference"]
            for e in resp.json().get("entry", [])
            for what in e["resource"].get("entity", [])
            if "what" in what and "reference" in what["what"]
        ]
        if f"Encounter/{ids['visits'][4]}" in records:
            break
        await asyncio.sleep(0.1)
    assert f"Encounter/{ids['visits'][4]}" in records and f"Patient/{ids['alice']}" in records
