"""Sample sequences end to end over the store, without network: parse -> map -> Repository.apply.

Each step runs in its own transaction, as the pipeline does. After the sequence the stored FHIR
JSON is checked (bed operationalStatus O/H/U, Encounter status and period.end, patient links,
encounter subjects), and every stored resource must validate as an R4 (R4B models) resource.
Runs on SQLite, and on PostgreSQL too when HMS_ACH_TEST_POSTGRES_URL is set (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from hms_ach.hl7v2.parse import parse
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.fhir_structure import COMPLETED_CODES
from hms_ach.mapping.loader import MappingSet, load_mappings
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.repository import Repository

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"

VISIT = "urn:hms-ach:id:GENHOSP"
MRN = "urn:hms-ach:id:GENHOSP"
LOC = "urn:hms-ach:location"
NPI = "http://hl7.org/fhir/sid/us-npi"

# Required value-set bindings that fhir.resources does not enforce (see GUIDE.md section 4).
CODES = {
    ("Encounter", "status"): COMPLETED_CODES[("Encounter", "status")],
    ("Location", "status"): {"active", "suspended", "inactive"},
    ("Location", "mode"): {"instance", "kind"},
    ("Patient", "gender"): {"male", "female", "other", "unknown"},
    ("Practitioner", "gender"): {"male", "female", "other", "unknown"},
}
LOCATION_STATUS = {"planned", "active", "reserved", "completed"}
LINK_TYPES = {"replaced-by", "replaces", "refer", "seealso"}


@pytest.fixture(scope="module")
def engine() -> MappingEngine:
    mset: MappingSet = load_mappings(ROOT / "mappings")
    return MappingEngine(mset)


class Steps:
    """Apply samples one transaction each and read what the store holds."""

    def __init__(self, store: Store, engine: MappingEngine):
        self.store = store
        self.engine = engine

    def send(self, *names: str, **replace: str) -> None:
        for name in names:
            raw = (SAMPLES / name).read_bytes()
            for old, new in replace.items():
                raw = raw.replace(old.encode(), new.encode())
            result = self.engine.map_message(parse(raw))
            with self.store.writer.begin() as conn:
                Repository(conn).apply(result)

    def get(self, resource_type: str, system: str, value: str) -> dict[str, Any]:
        with self.store.reader.connect() as conn:
            found = Repository(conn).find_by_key(resource_type, system, value)
        assert found is not None, f"no {resource_type} {system}|{value} in the store"
        return found[1]

    def ref(self, resource_type: str, system: str, value: str) -> str:
        return f"{resource_type}/{self.get(resource_type, system, value)['id']}"

    def bed_status(self, key: str) -> str | None:
        status = self.get("Location", LOC, key).get("operationalStatus")
        return None if status is None else str(status["code"])

    def all(self) -> list[dict[str, Any]]:
        out = []
        with self.store.reader.connect() as conn:
            for model in RECORD_TABLES.values():
                table = model.__table__  # type: ignore[attr-defined]
                out += [orjson.loads(r) for r in conn.execute(select(table.c.resource)).scalars()]
        return out

    def count(self, resource_type: str) -> int:
        return sum(1 for r in self.all() if r["resourceType"] == resource_type)


@pytest.fixture
def steps(store: Store, engine: MappingEngine) -> Steps:
    return Steps(store, engine)


def assert_valid_fhir(steps: Steps) -> None:
    """Every stored record is a valid R4 resource, with the coded fields we must check ourselves."""
    resources = steps.all()
    assert resources
    for res in resources:
        rt = res["resourceType"]
        get_fhir_model_class(rt).model_validate(res)
        for (t, element), allowed in CODES.items():
            if t == rt and element in res:
                assert res[element] in allowed, f"{rt}.{element} = {res[element]!r}"
        for loc in res.get("location", []) if rt == "Encounter" else []:
            assert loc.get("status", "active") in LOCATION_STATUS
        for link in res.get("link", []) if rt == "Patient" else []:
            assert link["type"] in LINK_TYPES


def test_admit_transfer_discharge(steps: Steps) -> None:
    steps.send("adt_a01.hl7")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress"
    assert enc["class"]["code"] == "IMP"
    assert enc["subject"]["reference"] == steps.ref("Patient", MRN, "100001")
    assert enc["location"][0]["location"]["reference"] == steps.ref("Location", LOC, "GENHOSP/4W/412/A")
    assert steps.bed_status("GENHOSP/4W/412/A") == "O"
    bed = steps.get("Location", LOC, "GENHOSP/4W/412/A")
    assert bed["physicalType"]["coding"][0]["code"] == "bd"
    room = steps.get("Location", LOC, "GENHOSP/4W/412")
    assert bed["partOf"]["reference"] == f"Location/{room['id']}"
    assert room["partOf"]["reference"] == steps.ref("Location", LOC, "GENHOSP/4W")
    attending = enc["participant"][0]["individual"]["reference"]
    assert attending == steps.ref("Practitioner", NPI, "1234567893")

    steps.send("adt_a02.hl7")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress"
    assert [(loc["location"]["reference"], loc["status"]) for loc in enc["location"]] == [
        (steps.ref("Location", LOC, "GENHOSP/4W/414/B"), "active"),
        (steps.ref("Location", LOC, "GENHOSP/4W/412/A"), "completed"),
    ]
    assert steps.bed_status("GENHOSP/4W/414/B") == "O"
    assert steps.bed_status("GENHOSP/4W/412/A") == "H"
    # the A02 also brought Maria's new address
    assert steps.get("Patient", MRN, "100001")["address"][0]["city"] == "Dublin"

    steps.send("adt_a03.hl7")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "finished"
    assert enc["period"] == {"start": "2026-11-26T08:15:00-05:00", "end": "2026-11-29T11:30:00-05:00"}
    assert enc["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "home"
    assert enc["location"][0]["status"] == "completed"
    assert steps.bed_status("GENHOSP/4W/414/B") == "H"
    assert steps.count("Encounter") == 1
    assert steps.count("Patient") == 1
    assert_valid_fhir(steps)


def test_cancel_discharge_reopens_the_encounter(steps: Steps) -> None:
    steps.send("adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7")
    assert steps.bed_status("GENHOSP/4W/414/B") == "H"
    steps.send("adt_a13.hl7")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress"
    assert enc["location"][0]["status"] == "active"
    assert steps.bed_status("GENHOSP/4W/414/B") == "O"
    assert_valid_fhir(steps)
    assert "dischargeDisposition" not in enc.get("hospitalization", {})
    assert enc["period"] == {"start": "2026-11-26T08:15:00-05:00"}


def test_cancel_admit(steps: Steps) -> None:
    steps.send("adt_a05.hl7")
    enc = steps.get("Encounter", VISIT, "V5002")
    assert enc["status"] == "planned"
    assert "location" not in enc
    steps.send("adt_a11.hl7")
    enc = steps.get("Encounter", VISIT, "V5002")
    assert enc["status"] == "entered-in-error"
    assert enc["location"][0]["location"]["reference"] == steps.ref("Location", LOC, "GENHOSP/4W/414/A")
    assert enc["location"][0]["status"] == "completed"
    assert steps.bed_status("GENHOSP/4W/414/A") == "U"
    assert_valid_fhir(steps)


def test_cancel_transfer_undoes_the_transfer(steps: Steps) -> None:
    steps.send("adt_a01.hl7", "adt_a02.hl7")
    assert (steps.bed_status("GENHOSP/4W/412/A"), steps.bed_status("GENHOSP/4W/414/B")) == ("H", "O")
    steps.send("adt_a12.hl7")
    assert (steps.bed_status("GENHOSP/4W/412/A"), steps.bed_status("GENHOSP/4W/414/B")) == ("O", "U")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress"
    current = enc["location"][0]
    assert {k: current[k] for k in ("location", "status")} == {
        "location": {"reference": steps.ref("Location", LOC, "GENHOSP/4W/412/A")},
        "status": "active",
    }
    # back in the first bed: the stay there counts from the admission (the history keeps its start)
    assert current["period"] == {"start": "2026-11-26T08:15:00-05:00"}
    assert enc["location"][1]["location"]["reference"] == steps.ref("Location", LOC, "GENHOSP/4W/414/B")
    assert_valid_fhir(steps)


def test_merge_moves_encounters_to_the_surviving_patient(steps: Steps) -> None:
    steps.send("adt_a05.hl7", "adt_a04.hl7")
    survivor = steps.ref("Patient", MRN, "100002")
    retired = steps.ref("Patient", MRN, "100003")
    assert steps.get("Encounter", VISIT, "V5003")["subject"]["reference"] == retired

    steps.send("adt_a40.hl7")
    old = steps.get("Patient", MRN, "100003")
    assert old["active"] is False
    assert old["link"] == [{"other": {"reference": survivor}, "type": "replaced-by"}]
    new = steps.get("Patient", MRN, "100002")
    assert new["active"] is True
    assert {"other": {"reference": retired}, "type": "replaces"} in new["link"]
    assert steps.get("Encounter", VISIT, "V5003")["subject"]["reference"] == survivor
    assert steps.get("Encounter", VISIT, "V5002")["subject"]["reference"] == survivor
    assert steps.count("Patient") == 2
    assert_valid_fhir(steps)


def test_merge_of_an_unknown_patient_creates_nobody(steps: Steps) -> None:
    steps.send("adt_a40.hl7")
    assert steps.count("Patient") == 1
    assert "link" not in steps.get("Patient", MRN, "100002")


def test_update_never_creates_an_encounter(steps: Steps) -> None:
    steps.send("adt_a08.hl7")
    assert steps.count("Encounter") == 0
    assert steps.get("Patient", MRN, "100001")["address"][0]["city"] == "Dublin"
    steps.send("adt_a01.hl7", "adt_a08.hl7")
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress"  # A08 does not touch the status
    assert steps.bed_status("GENHOSP/4W/412/A") == "O"
    assert_valid_fhir(steps)


def test_staff_master_file_and_adt_share_practitioners(steps: Steps) -> None:
    steps.send("adt_a01.hl7", "mfn_m02.hl7")
    assert steps.count("Practitioner") == 4  # Chen, Patel, Novak from the A01; Osei from the M02
    chen = steps.get("Practitioner", NPI, "1234567893")
    assert chen["active"] is True
    assert chen["birthDate"] == "1979-02-11"
    assert [q["code"]["coding"][0]["code"] for q in chen["qualification"]] == ["DEA", "SL"]
    assert chen["qualification"][1]["period"]["end"] == "2026-12-15"
    role = steps.get("PractitionerRole", "urn:hms-ach:practitioner-role", "1234567893/MD")
    assert role["practitioner"]["reference"] == f"Practitioner/{chen['id']}"
    assert role["active"] is True
    # the encounter's attending doctor is the same record the staff file updated
    enc = steps.get("Encounter", VISIT, "V5001")
    assert enc["participant"][0]["individual"]["reference"] == f"Practitioner/{chen['id']}"

    steps.send("mfn_m02.hl7", **{"MFE|MUP|": "MFE|MDL|"})
    chen = steps.get("Practitioner", NPI, "1234567893")
    assert chen["active"] is False
    assert steps.get("PractitionerRole", "urn:hms-ach:practitioner-role", "1234567893/MD")["active"] is False
    assert steps.get("Practitioner", NPI, "1356702989")["active"] is True

    steps.send("mfn_m02.hl7", **{"MFE|MUP|": "MFE|MAC|"})
    assert steps.get("Practitioner", NPI, "1234567893")["active"] is True
    assert_valid_fhir(steps)
