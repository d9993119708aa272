"""The survivorship merge and match policy of a Practitioner (hms_ach.workforce.survivorship), pure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.config import load_config
from hms_ach.core.errors import ConfigErrors
from hms_ach.core.records import MergeInput, Mode
from hms_ach.workforce import settings
from hms_ach.workforce.settings import SurvivorshipSettings, WorkforceSettings
from hms_ach.workforce.survivorship import conflicts_of, match_identifiers, merge, sources_of

NPI = "http://hl7.org/fhir/sid/us-npi"
STAFF = "urn:hms-ach:id:staff"
RULES = {
    "name": ["hr", "mfn", "fhir"],
    "telecom": ["hr", "mfn", "fhir"],
    "identifier": ["mfn", "hr", "fhir"],
    "qualification": ["mfn", "fhir", "hr"],
    "qualification.verification": ["fhir"],
    "gender": ["nobody"],
}
VERIFIED = {"url": "urn:hms-ach:fhir:StructureDefinition/verification-status", "valueCode": "verified"}


@pytest.fixture(autouse=True)
def rules() -> Iterator[None]:
    before = settings.current()
    settings.use(WorkforceSettings(survivorship=SurvivorshipSettings(elements=RULES)))
    yield
    settings.use(before)


def write(old: dict[str, Any], source: str, new: dict[str, Any], mode: Mode = "merge") -> dict[str, Any]:
    return merge(MergeInput("Practitioner", old, new, source, mode))


def licence(number: str, **more: Any) -> dict[str, Any]:
    return {"identifier": [{"value": number}], **more}


def test_the_declared_source_wins_whatever_the_order() -> None:
    hr = {"name": [{"family": "Osei"}], "telecom": [{"system": "phone", "use": "work", "value": "1"}]}
    mfn = {
        "name": [{"family": "OSEI", "use": "official"}],
        "telecom": [
            {"system": "phone", "use": "work", "value": "2"},
            {"system": "pager", "use": "work", "value": "3"},
        ],
    }
    one = write(write({}, "hr", hr), "mfn", mfn)
    other = write(write({}, "mfn", mfn), "hr", hr)
    assert one == other
    assert one["name"] == [{"family": "Osei"}]
    # telecom merges by system+use: HR's phone wins, the master file's pager stays
    assert {(t["system"], t["value"]) for t in one["telecom"]} == {("phone", "1"), ("pager", "3")}
    assert sources_of(one) == {"name": "hr", "telecom[phone|work]": "hr", "telecom[pager|work]": "mfn"}


def test_qualifications_merge_by_identifier_and_verification_is_its_own_element() -> None:
    mfn = {"qualification": [licence("RN-1", period={"end": "2027-12-31"}, code={"text": "SL"})]}
    fhir = {
        "qualification": [
            licence("RN-1", period={"start": "2025-01-01", "end": "2027-06-30"}, extension=[VERIFIED]),
            licence("BLS-2"),
        ]
    }
    for merged in (write(write({}, "mfn", mfn), "fhir", fhir), write(write({}, "fhir", fhir), "mfn", mfn)):
        quals = {q["identifier"][0]["value"]: q for q in merged["qualification"]}
        assert sorted(quals) == ["BLS-2", "RN-1"]
        # the master file's end date wins; the start only onboarding knows fills the gap
        assert quals["RN-1"]["period"] == {"start": "2025-01-01", "end": "2027-12-31"}
        assert quals["RN-1"]["extension"] == [VERIFIED]
        src = sources_of(merged)
        assert src["qualification[RN-1]"] == "mfn" and src["qualification[RN-1].verification"] == "fhir"


def test_identifiers_merge_by_system_and_two_of_one_system_from_one_source_both_stay() -> None:
    mfn = {"identifier": [{"system": NPI, "value": "1356702989"}, {"system": STAFF, "value": "E2001"}]}
    merged = write({}, "mfn", mfn)
    merged = write(merged, "hr", {"identifier": [{"system": STAFF, "value": "E1002"}]})
    assert {i["system"]: i["value"] for i in merged["identifier"]} == {NPI: "1356702989", STAFF: "E2001"}
    two = write(
        {}, "hr", {"identifier": [{"system": STAFF, "value": "S1"}, {"system": STAFF, "value": "E3"}]}
    )
    assert [i["value"] for i in two["identifier"]] == ["S1", "E3"]


def test_a_replace_source_withdraws_only_what_it_set() -> None:
    stored = write({}, "mfn", {"qualification": [licence("RN-1")]})
    stored = write(stored, "fhir", {"qualification": [licence("BLS-2")], "gender": "female"}, "replace")
    again = write(stored, "fhir", {"gender": "female"}, "replace")  # onboarding drops the BLS certificate
    assert [q["identifier"][0]["value"] for q in again["qualification"]] == ["RN-1"]
    assert "qualification[BLS-2]" not in sources_of(again)


def test_an_unranked_disagreement_keeps_the_stored_value_and_stores_the_other() -> None:
    stored = write({}, "mfn", {"gender": "female"})
    merged = write(stored, "hr", {"gender": "male"})
    assert merged["gender"] == "female"
    assert conflicts_of(merged) == [{"element": "gender", "kept": "mfn", "refused": "hr", "value": '"male"'}]
    # the same write again changes nothing
    assert write(merged, "hr", {"gender": "male"}) == merged


def test_an_element_without_a_rule_takes_the_last_write_and_provenance_is_not_forged() -> None:
    stored = write({}, "mfn", {"birthDate": "1988-07-09"})
    forged = {"url": "urn:hms-ach:fhir:StructureDefinition/element-source", "extension": []}
    merged = write(stored, "fhir", {"birthDate": "1988-07-10", "extension": [forged]})
    assert merged["birthDate"] == "1988-07-10" and sources_of(merged) == {"birthDate": "fhir"}


def test_the_match_policy_tries_the_systems_in_order() -> None:
    content = {"identifier": [{"system": STAFF, "value": "E2001"}, {"system": NPI, "value": "1356702989"}]}
    assert match_identifiers(content) == [(NPI, "1356702989"), (STAFF, "E2001")]


def test_an_unknown_element_is_refused_with_its_place(tmp_path: Path) -> None:
    path = tmp_path / "channels.yaml"
    path.write_text("workforce:\n  survivorship:\n    elements:\n      gendr: [hr]\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert f"{path}:3:5:" in str(caught.value) and "unknown element 'gendr'" in str(caught.value)


def test_mapping_preview_shows_where_a_source_stands(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    result = CliRunner().invoke(
        app,
        [
            "mapping",
            "preview",
            str(root / "samples" / "hl7" / "mfn_m02.hl7"),
            "--config",
            str(root / "channels.yaml"),
            "--mapping-dir",
            str(root / "mappings"),
            "--source",
            "adt_in",
        ],
    )
    assert result.exit_code == 0, result.output
    section = result.output.split("== survivorship (as source adt_in)")[1]
    assert "Practitioner key http://hl7.org/fhir/sid/us-npi|1356702989" in section
    assert (
        "qualification[RN-884213] <- adt_in: rank 1 of 4 in [adt_in, fhir_in, staff_roster_sftp, drop_in]"
    ) in section
    assert "qualification[RN-884213].verification <- adt_in: not listed, below all in [fhir_in]" in section
