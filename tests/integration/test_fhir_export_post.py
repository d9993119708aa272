"""Bulk Data ``$export`` kicked off by POST with a ``Parameters`` body (issue 15, item 4): the same
export as the GET kick-off, its refusals (a query string, a body that is not Parameters, an unknown
parameter, a wrong content type), every NDJSON line read back through ``fhir.resources.R4B``.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.test_fhir_bulk_export import ASYNC, read_files, seed, wait_done

POST = {**ASYNC, "content-type": "application/fhir+json"}


def parameters(*pairs: tuple[str, str, str]) -> dict[str, Any]:
    """A Parameters body: (name, value[x] key, value) per parameter."""
    return {"resourceType": "Parameters", "parameter": [{"name": n, key: v} for n, key, v in pairs]}


async def test_post_kick_off_exports_like_get(http: httpx.AsyncClient) -> None:
    patients = await seed(http, patients=2)
    body = parameters(
        ("_type", "valueString", "Patient"),
        ("_type", "valueString", "Encounter"),
        ("_outputFormat", "valueString", "application/fhir+ndjson"),
        ("_since", "valueInstant", "2000-01-01T00:00:00Z"),
    )
    resp = await http.post("/$export", json=body, headers=POST)
    assert resp.status_code == 202, resp.text
    done = await wait_done(http, resp.headers["content-location"])
    assert done.status_code == 200, done.text
    files = await read_files(http, done.json())
    assert sorted(p["id"] for p in files["Patient"]) == sorted(patients)
    assert len(files["Encounter"]) == 2 and "Location" not in files

    # patient level, and an empty body (everything the token may export)
    level = await http.post("/Patient/$export", content=b"", headers=ASYNC)
    assert level.status_code == 202, level.text
    manifest = (await wait_done(http, level.headers["content-location"])).json()
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Encounter"}
    later = parameters(("_since", "valueInstant", "2999-01-01T00:00:00Z"))
    resp = await http.post("/$export", json=later, headers=POST)
    assert (await wait_done(http, resp.headers["content-location"])).json()["output"] == []


async def test_post_kick_off_refusals(http: httpx.AsyncClient) -> None:
    def diagnostics(resp: httpx.Response, status: int) -> str:
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert body["resourceType"] == "OperationOutcome"
        return str(body["issue"][0]["diagnostics"])

    ok = parameters(("_type", "valueString", "Patient"))
    assert "Prefer" in diagnostics(
        await http.post("/$export", json=ok, headers={"accept": "application/fhir+json"}), 400
    )
    assert "body" in diagnostics(await http.post("/$export?_type=Patient", json=ok, headers=POST), 400)
    patient = {"resourceType": "Patient"}
    assert "Parameters" in diagnostics(await http.post("/$export", json=patient, headers=POST), 400)
    bad = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueInteger": 3}]}
    assert "parameter[0]" in diagnostics(await http.post("/$export", json=bad, headers=POST), 400)
    unknown = parameters(("_typeFilter", "valueString", "Patient?gender=male"))
    assert "_typeFilter" in diagnostics(await http.post("/$export", json=unknown, headers=POST), 400)
    text = {**ASYNC, "content-type": "text/plain"}
    assert "content type" in diagnostics(
        await http.post("/$export", content=b"_type=Patient", headers=text), 415
    )
    assert "JSON" in diagnostics(await http.post("/$export", content=b"{nope", headers=POST), 400)
