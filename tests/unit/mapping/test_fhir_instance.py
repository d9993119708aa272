"""The R4 check of a resource a client writes (and of stored versions): each problem names its element."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.mapping.fhir_instance import problems


def practitioner(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "urn:staff", "value": "E1"}],
        "name": [{"family": "Osei", "given": ["Amara"]}],
        "gender": "female",
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "expression", "code", "words"),
    [
        (practitioner(gendr="female"), "Practitioner.gendr", "structure", "did you mean 'gender'?"),
        (practitioner(gender=["female"]), "Practitioner.gender", "structure", "holds one value"),
        (practitioner(name={"family": "Osei"}), "Practitioner.name", "structure", "is a list"),
        (practitioner(active="yes"), "Practitioner.active", "value", "true or false"),
        (practitioner(active=None), "Practitioner.active", "structure", "null"),
        (practitioner(name=[{"family": 7}]), "Practitioner.name[0].family", "value", "JSON string"),
        (practitioner(name=[{"use": "robot"}]), "Practitioner.name[0].use", "code-invalid", "official"),
        (practitioner(gender="robot"), "Practitioner.gender", "code-invalid", "female"),
        (
            practitioner(birthDate="1980-02-31x"),
            "Practitioner.birthDate",
            "value",
            "birthDate: not a valid date",
        ),
        (
            practitioner(birthDate="1980-02-31"),
            "Practitioner.birthDate",
            "value",
            "not a date of the calendar",
        ),
        (practitioner(id="a b"), "Practitioner.id", "value", "not a valid id"),
        (practitioner(gender="fe  male"), "Practitioner.gender", "value", "not a valid code"),
        (
            practitioner(meta={"lastUpdated": "2026-12-06T10:61:00Z"}),
            "Practitioner.meta.lastUpdated",
            "value",
            "not a valid instant",
        ),
        (
            {"resourceType": "Patient", "multipleBirthInteger": 1.5},
            "Patient.multipleBirthInteger",
            "value",
            "is not one",
        ),
        (
            {"resourceType": "Patient", "deceasedBoolean": True, "deceasedDateTime": "2020"},
            "Patient.deceasedDateTime",
            "structure",
            "deceased[x] takes one value",
        ),
        (
            {"resourceType": "Patient", "_gender": {"extension": [{"valueString": "x"}]}},
            "Patient._gender.extension[0].url",
            "required",
            "required",
        ),
        (
            practitioner(qualification=[{"period": {"start": "2020"}}]),
            "Practitioner.qualification[0].code",
            "required",
            "required",
        ),
        (
            {"resourceType": "Encounter", "status": "done", "class": {"code": "IMP"}},
            "Encounter.status",
            "code-invalid",
            "entered-in-error",
        ),
        ({"resourceType": "Encounter", "class": {"code": "IMP"}}, "Encounter.status", "required", "required"),
        (
            {"resourceType": "Patient", "contained": [{"resourceType": "Location", "address": [{}]}]},
            "Patient.contained[0].address",
            "structure",
            "holds one value",
        ),
        ({"resourceType": "Patient", "_gendr": {}}, "Patient._gendr", "structure", "no primitive element"),
        ({"resourceType": "Shift"}, "resourceType", "structure", "not an R4 resource type"),
    ],
)
def test_each_problem_names_its_element(body: dict[str, Any], expression: str, code: str, words: str) -> None:
    found = problems(body)
    assert found, body
    assert (found[0].expression, found[0].code) == (expression, code), found
    assert words in found[0].message


def test_the_model_is_a_second_opinion_on_request() -> None:
    body = practitioner(birthDate="1980-02-30")
    assert problems(body, model_check=True)[0].expression == "Practitioner.birthDate"
    assert problems(practitioner(), model_check=True) == []


def test_valid_resources_pass() -> None:
    assert problems(practitioner()) == []
    assert problems(practitioner(_gender={"extension": [{"url": "urn:x", "valueString": "y"}]})) == []
    name: dict[str, Any] = {"family": "Osei", "given": ["Amara", None], "_given": [None, {"extension": []}]}
    assert problems(practitioner(name=[name])) == []
    location = {"resourceType": "Location", "address": {"city": "Springfield"}, "status": "active"}
    assert problems(location) == []


def test_every_problem_is_counted_up_to_the_limit() -> None:
    body = practitioner(gendr="x", activ=True, nam=[])
    assert [p.expression for p in problems(body)] == [
        "Practitioner.gendr",
        "Practitioner.activ",
        "Practitioner.nam",
    ]
    assert len(problems(body, limit=2)) == 2


def test_a_deeply_nested_body_is_refused_without_recursing_for_ever() -> None:
    ext: dict[str, Any] = {"url": "urn:x"}
    for _ in range(200):
        ext = {"url": "urn:x", "extension": [ext]}
    found = problems({"resourceType": "Patient", "extension": [ext]})
    assert found and "nested deeper" in found[0].message
