"""Valid R4 by construction, against a running engine: client writes are checked before they are
stored, what a client reads it can PUT back, and a mapping typo is refused at reload and never
reaches the store. SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, ResourceHistory
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import (
    FHIR_JSON,
    ROOT,
    auth_headers,
    mllp_channel,
    mllp_yaml,
    running_engine,
)
from tests.integration.pipeline_helpers import process_sync


def count(store: Store, rtype: str) -> int:
    with store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(RECORD_TABLES[rtype])).scalar_one())


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:hms-ach:id:mrn", "value": "M-1"}],
        "name": [{"family": "Rivera", "given": ["Ana"]}],
        "gender": "female",
        **extra,
    }


def encounter(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": "urn:hms-ach:id:visit", "value": "V-1"}],
        "status": "planned",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "status", "expression", "words"),
    [
        (patient(gendr="female"), 400, "Patient.gendr", "did you mean 'gender'?"),
        (patient(gender=["female"]), 400, "Patient.gender", "holds one value"),
        (patient(name={"family": "Rivera"}), 400, "Patient.name", "is a list"),
        (patient(active="yes"), 400, "Patient.active", "boolean"),
        (
            patient(name=[{"family": "Rivera", "use": "robot"}]),
            422,
            "Patient.name[0].use",
            "required binding",
        ),
        (patient(birthDate="1975-13-45"), 400, "Patient.birthDate", None),
        (encounter(status="done"), 422, "Encounter.status", "required binding"),
        (encounter(serviceType=[{"text": "x"}]), 400, "Encounter.serviceType", "holds one value"),
        (
            encounter(location=[{"status": "active"}]),
            400,
            "Encounter.location[0].location",
            "is required",
        ),
        (
            {"resourceType": "Location", "name": "4W", "address": [{"city": "Springfield"}]},
            400,
            "Location.address",
            "holds one value",
        ),
    ],
)
async def test_invalid_r4_is_refused_naming_the_element(
    http: httpx.AsyncClient,
    store: Store,
    body: dict[str, Any],
    status: int,
    expression: str,
    words: str | None,
) -> None:
    rtype = body["resourceType"]
    resp = await http.post(f"/{rtype}", json=body, headers=FHIR_JSON)
    assert resp.status_code == status, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["expression"] == [expression], outcome
    if words:
        assert words in issue["diagnostics"], outcome
    assert count(store, rtype) == 0


async def test_a_transaction_with_one_invalid_entry_stores_nothing(
    http: httpx.AsyncClient, store: Store
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": encounter(location=[{"status": "gone", "location": {"reference": "Location/x"}}]),
                "request": {"method": "POST", "url": "Encounter"},
            },
        ],
    }
    resp = await http.post("", json=bundle, headers=FHIR_JSON)
    assert resp.status_code == 422, resp.text
    expression = resp.json()["issue"][0]["expression"][0]
    assert "entry[1]" in expression and expression.endswith("Encounter.location[0].status"), expression
    assert count(store, "Patient") == 0 and count(store, "Encounter") == 0


async def test_what_a_client_reads_it_can_put_back(http: httpx.AsyncClient) -> None:
    """Location.address and Encounter.serviceType came back as arrays (issue 15); now as sent."""
    location = {
        "resourceType": "Location",
        "identifier": [{"system": "urn:hms-ach:location", "value": "CLINIC-1"}],
        "name": "Main clinic",
        "address": {"line": ["1 Main St"], "city": "Springfield"},
    }
    resp = await http.post("/Location", json=location, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    read = (await http.get(f"/Location/{resp.json()['id']}")).json()
    assert read["address"] == {"line": ["1 Main St"], "city": "Springfield"}, read
    put = await http.put(f"/Location/{read['id']}", json=read, headers=FHIR_JSON)
    assert put.status_code == 200, put.text

    visit = encounter(serviceType={"coding": [{"system": "urn:svc", "code": "57"}]})
    resp = await http.post("/Encounter", json=visit, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    read = (await http.get(f"/Encounter/{resp.json()['id']}")).json()
    assert read["serviceType"] == {"coding": [{"system": "urn:svc", "code": "57"}]}, read
    put = await http.put(f"/Encounter/{read['id']}", json=read, headers=FHIR_JSON)
    assert put.status_code == 200, put.text


async def test_a_target_typo_is_refused_at_reload_and_never_reaches_the_store(
    tmp_path: Path, store: Store
) -> None:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in")) as engine:
        mapping = engine.config.mappings_dir / "resources" / "patient.yaml"
        mapping.write_text(mapping.read_text().replace("  - target: gender\n", "  - target: gendr\n", 1))
        assert engine.reload_mappings() is False
        error = str(engine.health["reload_error"])
        assert "patient.yaml:" in error and "did you mean 'gender'?" in error
        code, out = run_cli("check", "--config", str(tmp_path / "channels.yaml"))
        assert code != 0 and "Patient has no element 'gendr'" in out, out

        raw = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes().decode("latin-1").replace("\n", "\r")
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", int(mllp_channel(engine).port))
        try:
            writer.writemessage(hl7.parse(raw))
            await writer.drain()
            ack = str(await asyncio.wait_for(reader.readmessage(), 10))
        finally:
            writer.close()
        assert "|AA|" in ack.replace("\r", "\n"), ack

        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{engine.http_port}/fhir", timeout=10, headers=auth_headers(engine)
        ) as client:
            bundle = (await client.get("/Patient")).json()
        stored = [e["resource"] for e in bundle["entry"]]
        assert stored and all("gendr" not in p and p.get("gender") for p in stored), stored


def test_reindex_validate_lists_the_stored_versions_that_fail_r4(store: Store) -> None:
    """Every sample message ingested: all clean. A version stored the old way (an address array) is
    reported with type/id/version and the element, and the command exits 1."""
    writer = StoreWriter(store)
    pipeline = Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    for path in sorted((ROOT / "samples" / "hl7").glob("*.hl7")):
        process_sync(pipeline, path.read_bytes(), Hl7Policy("adt_in"))
    writer.stop()
    assert count(store, "Patient") > 0 and count(store, "Location") > 0

    code, out = run_cli("reindex", "--validate", "--database", store.url)
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("0 invalid version(s) of ")

    history = ResourceHistory.__table__  # type: ignore[attr-defined]
    with store.writer.begin() as conn:
        row = conn.execute(
            select(history.c.id, history.c.version_id, history.c.resource)
            .where(history.c.resource_type == "Location")
            .order_by(history.c.id, history.c.version_id)
            .limit(1)
        ).one()
        body = json.loads(row.resource)
        body["address"] = [{"city": "Springfield"}]
        conn.execute(
            update(history)
            .where(
                history.c.resource_type == "Location",
                history.c.id == row.id,
                history.c.version_id == row.version_id,
            )
            .values(resource=json.dumps(body))
        )
    code, out = run_cli("reindex", "--validate", "--type", "Location", "--database", store.url)
    assert code == 1, out
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"Location/{row.id}/_history/{row.version_id}  Location.address: "), out
    assert "holds one value" in lines[0] and lines[-1].startswith("1 invalid version(s)")


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_the_validation_benchmark_runs() -> None:
    from benchmarks.fhir_validation import run

    figures = run(20, 1)
    assert figures["r4_check_us"] > 0 and figures["creates_per_s_validating"] > 0
    assert figures["prepares_per_s_not_validating"] > 0
