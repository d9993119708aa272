"""Clinical content from ADT end to end: AL1, DG1, NK1 and OBX through the pipeline into the store,
then served under /fhir, searchable by patient (and the other declared parameters), valid R4.

Maria's admission (A01) brings her penicillin allergy, her pneumonia and her husband; the A08 moves
him and adds her height; a resent A01 (new control id) and the discharge (A03, the same diagnosis,
now final) update those records rather than add new ones. Encounter.diagnosis and
Condition.encounter refer to each other, both resolved. Runs on SQLite, and on PostgreSQL when
HMS_ACH_TEST_POSTGRES_URL is set (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fhir.resources.R4B import get_fhir_model_class

from hms_ach.app.http import create_app
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.search_params import SEARCH_PARAMS
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import auth_headers, local_authenticator
from tests.integration.pipeline_helpers import process_sync

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
CLINICAL = ("AllergyIntolerance", "Condition", "RelatedPerson", "Observation")

#: Maria's height, sent with an A08 (the OBX of an ADT)
A08_HEIGHT = (
    "MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126120000-0500||ADT^A08^ADT_A01|T-CLIN-1|P|2.5.1\r"
    "EVN|A08|20261126120000-0500\r"
    "PID|1||100001^^^GENHOSP^MR||Rivera^Maria||19750314|F\r"
    "PV1|1|I|4W^412^A^GENHOSP^^N^MAIN^4||||||||||||||||V5001^^^GENHOSP^VN\r"
    "OBX|1|NM|8302-2^Body height^LN||165|cm^centimeter^UCUM|||||F|||20261126115500-0500\r"
)


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle", bundle
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") != "include"]


def _ingest(store: Store) -> None:
    writer = StoreWriter(store)
    try:
        pipeline = Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
        policy = Hl7Policy("adt_in")
        a01 = (SAMPLES / "adt_a01.hl7").read_bytes()
        messages = [
            a01,
            (SAMPLES / "adt_a08.hl7").read_bytes(),
            A08_HEIGHT.encode(),
            a01.replace(b"S-A01-0001", b"S-A01-0001-RESENT"),  # the same admission, resent
            (SAMPLES / "adt_a03.hl7").read_bytes(),
        ]
        codes = [process_sync(pipeline, raw, policy).ack_code for raw in messages]
        assert codes == ["AA"] * len(messages)
    finally:
        writer.stop()


async def test_clinical_content_is_stored_linked_and_searchable_by_patient(
    tmp_path: Path, store: Store
) -> None:
    _ingest(store)
    auth = local_authenticator(tmp_path / "data")
    transport = httpx.ASGITransport(app=create_app(store, authenticator=auth))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost/fhir", headers=auth_headers(auth)
    ) as http:

        async def search(rtype: str, **params: str) -> list[dict[str, Any]]:
            r = await http.get(f"/{rtype}", params=params)
            assert r.status_code == 200, r.text
            return _entries(r.json())

        (patient,) = await search("Patient", identifier="urn:hms-ach:id:GENHOSP|100001")
        pat = f"Patient/{patient['id']}"
        (encounter,) = await search("Encounter", identifier="urn:hms-ach:id:GENHOSP|V5001")
        enc = f"Encounter/{encounter['id']}"

        # one record each, however often the messages named them
        (allergy,) = await search("AllergyIntolerance", patient=pat)
        (condition,) = await search("Condition", patient=pat)
        (kin,) = await search("RelatedPerson", patient=pat)
        (height,) = await search("Observation", patient=pat)
        for res in (allergy, condition, kin, height):
            get_fhir_model_class(res["resourceType"]).model_validate(res)  # valid R4
        assert (await search("AllergyIntolerance", patient="Patient/nobody")) == []

        assert allergy["patient"]["reference"] == pat
        assert allergy["code"]["coding"][0]["code"] == "70618"
        assert allergy["clinicalStatus"]["coding"][0]["code"] == "active"
        assert allergy["category"] == ["medication"]

        # the diagnosis and the visit refer to each other; the discharge made it final
        cond = f"Condition/{condition['id']}"
        assert condition["subject"]["reference"] == pat
        assert condition["encounter"]["reference"] == enc
        assert condition["code"]["coding"][0]["code"] == "J18.9"
        assert [d["condition"]["reference"] for d in encounter["diagnosis"]] == [cond]
        assert encounter["diagnosis"][0]["use"]["coding"][0]["code"] == "F"
        assert encounter["status"] == "finished"

        # the A08 moved Daniel; the resent A01 then named his old address, which it keeps (merge)
        assert kin["patient"]["reference"] == pat
        assert kin["relationship"][0]["coding"][0]["code"] == "SPS"
        assert kin["name"][0]["family"] == "Rivera"

        assert height["encounter"]["reference"] == enc
        assert height["valueQuantity"] == {
            "value": 165,
            "unit": "centimeter",
            "code": "cm",
            "system": "http://unitsofmeasure.org",
        }

        # the other declared parameters
        ids = {
            "AllergyIntolerance": allergy["id"],
            "Condition": condition["id"],
            "RelatedPerson": kin["id"],
            "Observation": height["id"],
        }
        queries: list[tuple[str, dict[str, str]]] = [
            ("AllergyIntolerance", {"code": "70618", "clinical-status": "active", "category": "medication"}),
            ("Condition", {"encounter": enc, "code": "http://hl7.org/fhir/sid/icd-10-cm|J18.9"}),
            ("Condition", {"category": "encounter-diagnosis", "subject": pat}),
            ("RelatedPerson", {"name": "rivera", "relationship": "SPS"}),
            ("Observation", {"encounter": enc, "code": "http://loinc.org|8302-2", "date": "2026-11-26"}),
            ("Observation", {"subject": pat, "status": "final"}),
        ]
        for rtype, params in queries:
            assert [r["id"] for r in await search(rtype, **params)] == [ids[rtype]], (rtype, params)
        assert await search("Condition", encounter="Encounter/other") == []
        assert await search("Observation", date="lt2026-11-26") == []

        # a patient/ token sees these types only in its patient's compartment
        for who, expected in ((patient["id"], 1), ("someone-else", 0)):
            scoped = auth_headers(auth, "patient/*.read", (), patient=who)
            for rtype in CLINICAL:
                r = await http.get(f"/{rtype}", headers=scoped)
                assert r.status_code == 200, r.text
                assert len(_entries(r.json())) == expected, (who, rtype)

        declared = {r["type"]: r for r in (await http.get("/metadata")).json()["rest"][0]["resource"]}
        for rtype in CLINICAL:
            assert {p["name"] for p in declared[rtype]["searchParam"]} == set(SEARCH_PARAMS[rtype])
            assert "create" not in {i["code"] for i in declared[rtype]["interaction"]}  # read-only


async def test_a_resend_changes_no_clinical_record(tmp_path: Path, store: Store) -> None:
    """The second of two identical admissions (new control id) makes no new version of anything."""
    writer = StoreWriter(store)
    try:
        pipeline = Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
        a01 = (SAMPLES / "adt_a01.hl7").read_bytes()
        first = process_sync(pipeline, a01, Hl7Policy("adt_in"))
        again = process_sync(pipeline, a01.replace(b"S-A01-0001", b"S-A01-0002-X"), Hl7Policy("adt_in"))
    finally:
        writer.stop()
    assert first.ack_code == again.ack_code == "AA"
    made = {w.reference.split("/")[0] for w in first.writes}
    assert set(CLINICAL) - {"Observation"} <= made  # the sample has no OBX
    assert {w.reference.split("/")[0] for w in again.writes} >= set(CLINICAL) - {"Observation"}
    assert [w.reference for w in again.writes if w.changed] == []
