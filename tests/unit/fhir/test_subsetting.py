"""_summary and _elements on one resource (hms_ach/fhir/subsetting.py)."""

from __future__ import annotations

from typing import Any

import orjson

from hms_ach.fhir.basic import as_fhir
from hms_ach.fhir.subsetting import Subset, cut, mandatory_elements, summary_elements

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "1", "tag": [{"system": "urn:x", "code": "keep"}]},
    "text": {"status": "generated", "div": "<div xmlns='http://www.w3.org/1999/xhtml'>x</div>"},
    "name": [{"family": "Osei"}],
    "gender": "female",
    "deceasedBoolean": False,
    "maritalStatus": {"text": "M"},
    "contact": [{"name": {"family": "Mensah"}}],
}


def codes(resource: dict[str, Any]) -> list[str]:
    return [t["code"] for t in resource["meta"].get("tag", [])]


def test_summary_keeps_the_summary_elements_and_tags_the_cut() -> None:
    assert {"name", "gender", "identifier"} <= summary_elements("Patient")
    assert "contact" not in summary_elements("Patient")
    out = cut(PATIENT, Subset("true"))
    assert set(out) == {"resourceType", "id", "meta", "name", "gender", "deceasedBoolean"}
    assert codes(out) == ["keep", "SUBSETTED"]
    assert PATIENT["meta"]["tag"] == [{"system": "urn:x", "code": "keep"}]  # the input is not changed


def test_text_data_and_elements() -> None:
    assert set(cut(PATIENT, Subset("text"))) == {"resourceType", "id", "meta", "text"}
    data = cut(PATIENT, Subset("data"))
    assert "text" not in data and "contact" in data and "SUBSETTED" in codes(data)
    assert cut(PATIENT, Subset("false")) is PATIENT
    picked = cut(PATIENT, Subset(None, ("gender", "deceased")))  # a choice element by its name
    assert set(picked) == {"resourceType", "id", "meta", "gender", "deceasedBoolean"}
    # mandatory elements are always kept
    assert "status" in mandatory_elements("Encounter")
    enc = cut(
        {"resourceType": "Encounter", "id": "e", "status": "finished", "class": {}}, Subset(None, ("id",))
    )
    assert set(enc) == {"resourceType", "id", "status", "class"}  # nothing left out: no tag


def test_a_shift_is_answered_as_basic() -> None:
    shift = (
        '{"resourceType":"Shift","id":"s1","meta":{"versionId":"2"},'
        '"identifier":[{"system":"urn:hms-ach:id:shift","value":"A"}],'
        '"practitioner":{"reference":"Practitioner/p"},"start":"2026-12-01T07:00:00Z",'
        '"end":"2026-12-01T15:00:00Z","status":"confirmed","role":{"text":"RN"},'
        '"department":{"display":"ICU"}}'
    )
    text = as_fhir("Shift", shift)
    assert text is not None
    basic = orjson.loads(text)
    assert basic["resourceType"] == "Basic" and basic["id"] == "s1"
    assert basic["subject"] == {"reference": "Practitioner/p"}
    assert {e["url"].rsplit("-", 1)[1] for e in basic["extension"]} == {
        "period",
        "status",
        "role",
        "department",
    }
    assert as_fhir("Timecard", '{"resourceType":"Timecard"}') is None
    assert as_fhir("Patient", '{"a":1}') == '{"a":1}'
