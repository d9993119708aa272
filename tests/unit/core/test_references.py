"""The shared FHIR reference walker of the REST write path and the fhir_push sink."""

from __future__ import annotations

import copy
from typing import Any

from hms_ach.core.references import references, rewrite_references

ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "e1",
    "subject": {"reference": "Patient/p1", "display": "A patient"},
    "participant": [
        {"individual": {"reference": "Practitioner/d1"}},
        {"individual": {"display": "no reference here"}},
        {"individual": {"reference": "urn:uuid:8c4f7a2e-0000-4000-8000-000000000001"}},
    ],
    "location": [
        {
            "location": {
                "reference": "Location/l1",
                "extension": [{"valueReference": {"reference": "Organization/o1"}}],
            }
        }
    ],
    "serviceProvider": {"reference": 42},  # not a string: not a reference text
    "status": "finished",
}


def test_references_lists_every_reference_with_its_path_in_document_order() -> None:
    assert references(ENCOUNTER) == [
        ("subject", "Patient/p1"),
        ("participant[0].individual", "Practitioner/d1"),
        ("participant[2].individual", "urn:uuid:8c4f7a2e-0000-4000-8000-000000000001"),
        ("location[0].location", "Location/l1"),
        ("location[0].location.extension[0].valueReference", "Organization/o1"),
    ]


def test_references_prefixes_a_given_path_and_sees_a_top_level_reference() -> None:
    assert references({"reference": "Patient/p1"}) == [("", "Patient/p1")]
    assert references([{"subject": {"reference": "Patient/p1"}}], "entry") == [
        ("entry[0].subject", "Patient/p1")
    ]
    assert references({"a": [1, "x", None]}) == []
    assert references("Patient/p1") == []


def test_rewrite_references_replaces_mapped_texts_only_and_leaves_the_input_alone() -> None:
    before = copy.deepcopy(ENCOUNTER)
    out = rewrite_references(
        ENCOUNTER,
        {
            "Patient/p1": "Patient/remote-9",
            "Organization/o1": "urn:uuid:org",
            "Location/other": "Location/unused",
        },
    )
    assert ENCOUNTER == before
    assert out["subject"] == {"reference": "Patient/remote-9", "display": "A patient"}
    assert out["location"][0]["location"]["extension"][0]["valueReference"] == {"reference": "urn:uuid:org"}
    assert out["participant"] == before["participant"]
    assert out["location"][0]["location"]["reference"] == "Location/l1"
    assert out["serviceProvider"] == {"reference": 42}
    assert out["participant"] is not ENCOUNTER["participant"]  # a copy, not a view
    assert [ref for _path, ref in references(out)] == [
        "Patient/remote-9",
        "Practitioner/d1",
        "urn:uuid:8c4f7a2e-0000-4000-8000-000000000001",
        "Location/l1",
        "urn:uuid:org",
    ]


def test_rewrite_references_with_an_empty_mapping_is_an_equal_copy() -> None:
    out = rewrite_references(ENCOUNTER, {})
    assert out == ENCOUNTER and out is not ENCOUNTER
