"""The reference texts the ordering of a Bundle's entries reads (hms_ach/fhir/write.py): the same
as the full walk (hms_ach.core.references), the walk skipped only where it cannot find any."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.core.references import references
from hms_ach.fhir.write import _reference_texts

RESOURCES: list[dict[str, Any] | None] = [
    None,
    {},
    {"resourceType": "Practitioner", "name": [{"family": "Osei"}]},
    {"resourceType": "PractitionerRole", "practitioner": {"reference": "urn:uuid:a"}},
    {"resourceType": "Encounter", "location": [{"location": {"reference": "Location/1", "display": "x"}}]},
    {"resourceType": "Basic", "text": {"div": '{"reference":"urn:uuid:b"}'}},  # a string, not a Reference
    {"resourceType": "Basic", "extension": [{"valueReference": {"reference": 'Patient/"odd"'}}]},
    {"resourceType": "Basic", "reference": 7},  # not a string: no reference
]


@pytest.mark.parametrize("resource", RESOURCES)
def test_reference_texts_are_those_the_walk_finds(resource: dict[str, Any] | None) -> None:
    assert _reference_texts(resource) == [ref for _path, ref in references(resource or {})]
