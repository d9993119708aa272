"""Group-level Bulk Data ``$export`` (issue 15, item 4): ``Group/[id]/$export`` exports the
compartments of the Group's active Patient members, with the same kick-off, status, manifest,
files and cancel as the other levels. SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is
set."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from hms_ach.app.runtime import Engine
from hms_ach.fhir.export import ExportManager, ExportSettings, member_patients
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, start_fhir_engine
from tests.integration.test_fhir_bulk_export import ASYNC, kick_off, read_files, seed, wait_done
from tests.integration.test_fhir_everything import create

COHORT = "urn:test:cohort"


def group(members: list[dict[str, Any]], value: str = "G1") -> dict[str, Any]:
    return {
        "resourceType": "Group",
        "identifier": [{"system": COHORT, "value": value}],
        "type": "person",
        "actual": True,
        "member": members,
    }


def member(reference: str, inactive: bool = False) -> dict[str, Any]:
    return {"entity": {"reference": reference}} | ({"inactive": True} if inactive else {})


def test_the_members_are_the_active_patients() -> None:
    base = "http://h/fhir"
    body = group(
        [
            member("Patient/b"),
            member("Patient/a/_history/3"),
            member(f"{base}/Patient/c"),
            member("Patient/d", inactive=True),
            member("Practitioner/n1"),
            member("http://elsewhere/fhir/Patient/x"),
            member("Patient/b"),
            {"entity": {"display": "no reference"}},
        ]
    )
    assert member_patients(body, base) == ["a", "b", "c"]


async def test_group_export_holds_only_the_members_compartments(
    fhir_engine: Engine, http: httpx.AsyncClient
) -> None:
    first, second, left, outsider = await seed(http, 4)
    gid = await create(
        http,
        group([member(f"Patient/{first}"), member(f"Patient/{second}"), member(f"Patient/{left}", True)]),
    )
    assert (await http.get("/Group", params={"member": f"Patient/{first}"})).json()["total"] == 1

    status_url = await kick_off(http, f"/Group/{gid}/$export")
    done = await wait_done(http, status_url)
    assert done.status_code == 200, done.text
    manifest = done.json()
    assert manifest["request"].endswith(f"/fhir/Group/{gid}/$export")
    files = await read_files(http, manifest)  # every line parsed by fhir.resources.R4B
    assert sorted(p["id"] for p in files["Patient"]) == sorted([first, second])
    subjects = {e["subject"]["reference"] for e in files["Encounter"]}
    assert subjects == {f"Patient/{first}", f"Patient/{second}"}
    assert [g["id"] for g in files["Group"]] == [gid]  # in its members' compartment
    assert "Location" not in files  # the ward is no patient's compartment
    assert outsider not in {p["id"] for p in files["Patient"]}

    # _type and _since; POST with a Parameters body
    typed = (await wait_done(http, await kick_off(http, f"/Group/{gid}/$export", _type="Patient"))).json()
    assert [(o["type"], o["count"]) for o in typed["output"]] == [("Patient", 2)]
    later = await kick_off(http, f"/Group/{gid}/$export", _since="2999-01-01T00:00:00Z")
    assert (await wait_done(http, later)).json()["output"] == []
    params = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Encounter"}]}
    posted = await http.post(
        f"/Group/{gid}/$export", json=params, headers={**ASYNC, "content-type": "application/fhir+json"}
    )
    assert posted.status_code == 202, posted.text
    by_post = (await wait_done(http, posted.headers["content-location"])).json()
    assert [(o["type"], o["count"]) for o in by_post["output"]] == [("Encounter", 2)]

    # an unknown Group: 404 OperationOutcome; a deleted one too
    unknown = await http.get("/Group/nope/$export", headers=ASYNC)
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
    assert "nope" in unknown.json()["issue"][0]["diagnostics"]

    # scopes: a token that may not read Group may not export one
    only = auth_headers(fhir_engine, "system/Patient.read")
    refused = await http.get(f"/Group/{gid}/$export", headers={**ASYNC, **only})
    assert refused.status_code == 403 and "Group" in refused.json()["issue"][0]["diagnostics"]

    # cancel: the files go, the status is then 404
    export_dir = fhir_engine.config.data_dir / "exports" / status_url.rsplit("/", 1)[1]
    assert export_dir.is_dir()
    assert (await http.delete(status_url)).status_code == 202
    assert not export_dir.exists() and (await http.get(status_url)).status_code == 404

    # every kick-off (the refusals too) and download is recorded as an export access of its type
    for _ in range(50):
        audit = await http.get("/AuditEvent", params={"subtype": "export", "_count": 100})
        if audit.json().get("total", 0) >= 7:
            break
        await asyncio.sleep(0.1)
    assert audit.json().get("total", 0) >= 7, audit.text[:300]

    assert (await http.delete(f"/Group/{gid}")).status_code in (200, 204)
    assert (await http.get(f"/Group/{gid}/$export", headers=ASYNC)).status_code == 404


async def test_a_group_export_keeps_its_members_across_a_restart(tmp_path: Path, store: Store) -> None:
    """The members are fixed at kick-off: a worker that starts after the engine is gone (as on the
    next start) exports them, even when the Group changed in between."""
    engine = await start_fhir_engine(tmp_path, store)
    base = f"http://127.0.0.1:{engine.http_port}/fhir"
    assert engine.exports is not None
    root = engine.exports.root
    engine.exports.stop()  # no worker: the kick-off waits
    try:
        async with httpx.AsyncClient(base_url=base, headers=auth_headers(engine), timeout=30) as http:
            kept, dropped = await seed(http, 2)
            gid = await create(http, group([member(f"Patient/{kept}")]))
            status_url = await kick_off(http, f"/Group/{gid}/$export", _type="Patient")
            changed = group([member(f"Patient/{dropped}")]) | {"id": gid}
            assert (await http.put(f"/Group/{gid}", json=changed)).status_code == 200
    finally:
        await engine.stop()
    ExportManager(store, root, ExportSettings(batch_size=1)).run_pending()
    export_file = root / status_url.rsplit("/", 1)[1] / "Patient.ndjson"
    assert kept in export_file.read_text() and dropped not in export_file.read_text()
