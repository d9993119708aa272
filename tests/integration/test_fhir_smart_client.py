"""Issue 15's acceptance through the two Python clients it names, against a running engine: fhirpy's
``resource.patch`` honouring ``If-Match`` (a stale version refused, the current one applied), and
fhirclient (the SMART Python client) searching with ``_revinclude`` (``FHIRSearch.include(...,
reverse=True)``), a chained parameter, and reading ``$everything`` into its models. fhirclient has no
PATCH; fhirpy's ``patch`` sends a merge patch. Both clients are synchronous or own their loop, so
fhirclient runs in a worker thread while the engine serves on the test's loop. SQLite always,
PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fhirclient.models.bundle import Bundle
from fhirclient.models.encounter import Encounter
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRServer
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound

from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import auth_headers, nurse
from tests.integration.test_fhir_everything import create

MRN = "urn:hms-ach:id:mrn"
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


def base(engine: Engine) -> str:
    return f"http://127.0.0.1:{engine.http_port}/fhir"


async def test_fhirpy_resource_patch_honours_if_match(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    rid = await create(http, nurse("P1", "Osei"))
    token = auth_headers(fhir_engine)["authorization"]

    def client(version: str) -> AsyncFHIRClient:
        return AsyncFHIRClient(
            base(fhir_engine), authorization=token, extra_headers={"If-Match": f'W/"{version}"'}
        )

    stale = await client("7").reference("Practitioner", rid).to_resource()
    with pytest.raises(MultipleResourcesFound) as refused:  # fhirpy's name for any 412
        await stale.patch(active=False)
    assert "does not match the current version" in str(refused.value), refused.value
    current = await client("1").reference("Practitioner", rid).to_resource()
    await current.patch(active=False)
    assert current["active"] is False and current["meta"]["versionId"] == "2"
    read = (await http.get(f"/Practitioner/{rid}")).json()
    assert read["active"] is False and read["name"][0]["family"] == "Osei"


def fhirclient_server(engine: Engine) -> FHIRServer:
    server = FHIRServer(None, base_uri=base(engine) + "/")
    server.session.headers.update(auth_headers(engine))
    return server


def search_pages(server: FHIRServer, search: FHIRSearch) -> list[str]:
    """Type/id of every entry of every page of ``search`` (fhirclient follows the next links)."""
    return [
        f"{e.resource.resource_type}/{e.resource.id}"
        for page in search.perform_iter(server)
        for e in page.entry or []
    ]


async def test_fhirclient_revinclude_chaining_and_everything(
    fhir_engine: Engine, http: httpx.AsyncClient
) -> None:
    def patient(mrn: str, family: str) -> dict[str, Any]:
        return {
            "resourceType": "Patient",
            "identifier": [{"system": MRN, "value": mrn}],
            "name": [{"family": family}],
        }

    def encounter(pid: str) -> dict[str, Any]:
        return {
            "resourceType": "Encounter",
            "status": "finished",
            "class": AMB,
            "subject": {"reference": f"Patient/{pid}"},
        }

    okafor = await create(http, patient("C1", "Okafor"))
    lind = await create(http, patient("C2", "Lindqvist"))
    visits = [await create(http, encounter(okafor)) for _ in range(2)]
    other = await create(http, encounter(lind))
    server = fhirclient_server(fhir_engine)

    rev = FHIRSearch(Patient, {"_id": okafor}).include("subject", Encounter, reverse=True)
    assert rev.construct() == f"Patient?_id={okafor}&_revinclude=Encounter:subject"
    found = await asyncio.to_thread(search_pages, server, rev)
    assert sorted(found) == sorted([f"Patient/{okafor}", *(f"Encounter/{v}" for v in visits)])

    chained = Encounter.where({"subject:Patient.family": "Okafor"})
    assert chained.construct() == "Encounter?subject:Patient.family=Okafor"
    found = await asyncio.to_thread(search_pages, server, chained)
    assert sorted(found) == sorted(f"Encounter/{v}" for v in visits) and f"Encounter/{other}" not in found

    def everything() -> Bundle:
        return Bundle(server.request_json(f"Patient/{okafor}/$everything"))

    bundle = await asyncio.to_thread(everything)
    assert bundle.type == "searchset"
    refs = {f"{e.resource.resource_type}/{e.resource.id}" for e in bundle.entry or []}
    assert refs == {f"Patient/{okafor}", *(f"Encounter/{v}" for v in visits)}
