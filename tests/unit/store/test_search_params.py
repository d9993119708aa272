"""Search-parameter declarations and the index rows they produce."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.search_params import (
    COMMON_PARAMS,
    FAR_FUTURE,
    FAR_PAST,
    SEARCH_PARAMS,
    date_range,
    index_rows,
    normalise,
    parse_reference,
    search_param,
    walk,
)

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MRN = "urn:oid:1.2.3.mrn"

#: One resource per type that fills every declared parameter.
FULL: dict[str, dict[str, Any]] = {
    "Patient": {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": "12345"}, {"value": "no-system"}],
        "name": [
            {
                "family": "Muñoz",
                "given": ["José", "Ángel"],
                "prefix": ["Sr."],
                "suffix": ["Jr"],
                "text": "José Ángel Muñoz",
            }
        ],
        "gender": "male",
        "birthDate": "1980-02-29",
    },
    "Encounter": {
        "resourceType": "Encounter",
        "identifier": [{"system": "urn:visit", "value": "V1"}],
        "status": "in-progress",
        "class": {"system": ACT, "code": "IMP"},
        "period": {"start": "2026-11-26T08:00:00+01:00"},
        "subject": {"reference": "Patient/p1"},
        "location": [{"location": {"reference": "Location/l1"}}],
        "participant": [
            {"individual": {"reference": "Practitioner/d1"}},
            {"individual": {"reference": "PractitionerRole/r1"}},
        ],
    },
    "Location": {
        "resourceType": "Location",
        "identifier": [{"system": "urn:loc", "value": "4W-412-B"}],
        "name": "Ward 4 Wést",
        "alias": ["4W"],
        "status": "active",
        "operationalStatus": {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": "O"},
        "physicalType": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "bd"}
            ]
        },
        "type": [
            {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "HOSP"}],
                "text": "Hospital",
            }
        ],
        "partOf": {"reference": "Location/ward4"},
    },
    "Practitioner": {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "name": [{"family": "Nguyễn", "given": ["Thị"]}],
        "active": True,
        "gender": "female",
        "qualification": [{"code": {"text": "RN"}, "period": {"start": "2024-01-01", "end": "2026-12-31"}}],
    },
    "PractitionerRole": {
        "resourceType": "PractitionerRole",
        "identifier": [{"system": "urn:role", "value": "R1"}],
        "practitioner": {"reference": "Practitioner/d1"},
        "organization": {"reference": "Organization/o1"},
        "code": [{"coding": [{"system": "urn:roles", "code": "doctor"}]}],
        "specialty": [{"coding": [{"system": "http://snomed.info/sct", "code": "394802001"}]}],
        "location": [{"reference": "Location/l1"}],
        "period": {"start": "2025-01-01"},
        "active": False,
    },
    "Organization": {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:org", "value": "O1"}],
        "name": "Hôpital Général",
        "alias": ["HG"],
        "active": True,
    },
    "Shift": {
        "resourceType": "Shift",
        "identifier": [{"system": "urn:shift", "value": "S1"}],
        "practitioner": {"reference": "Practitioner/p1"},
        "status": "planned",
        "start": "2026-12-01T07:00:00-05:00",
        "end": "2026-12-01T19:00:00-05:00",
    },
    "Timecard": {
        "resourceType": "Timecard",
        "identifier": [{"system": "urn:tc", "value": "T1"}],
        "practitioner": {"reference": "Practitioner/p1"},
        "clockIn": "2026-12-01T06:55:00-05:00",
        "clockOut": "2026-12-01T19:10:00-05:00",
    },
    "Charge": {
        "resourceType": "Charge",
        "identifier": [{"system": "urn:hms-ach:charge", "value": "T1"}],
        "encounter": {"reference": "Encounter/e1"},
        "patient": {"reference": "Patient/p1"},
    },
    "ChargeItem": {
        "resourceType": "ChargeItem",
        "identifier": [{"system": "urn:hms-ach:charge", "value": "T1"}],
        "status": "billable",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99223"}]},
        "subject": {"reference": "Patient/p1"},
        "context": {"reference": "Encounter/e1"},
        "occurrenceDateTime": "2026-11-26T09:30:00-05:00",
        "enteredDate": "2026-11-27T02:00:00-05:00",
        "performer": [{"actor": {"reference": "Practitioner/d1"}}],
    },
    "Coverage": {
        "resourceType": "Coverage",
        "identifier": [{"system": "urn:hms-ach:coverage", "value": "M1"}],
        "status": "active",
        "beneficiary": {"reference": "Patient/p1"},
    },
    "Claim": {
        "resourceType": "Claim",
        "identifier": [{"system": "urn:hms-ach:claim", "value": "e1"}],
        "status": "active",
        "use": "claim",
        "created": "2026-11-27",
        "patient": {"reference": "Patient/p1"},
        "insurer": {"reference": "Organization/o1"},
        "provider": {"reference": "Practitioner/pr1"},
        "item": [{"sequence": 1, "encounter": [{"reference": "Encounter/e1"}]}],
    },
    "AllergyIntolerance": {
        "resourceType": "AllergyIntolerance",
        "identifier": [{"system": "urn:hms-ach:allergy", "value": "a1"}],
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "type": "allergy",
        "category": ["medication"],
        "criticality": "high",
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "70618"}]},
        "patient": {"reference": "Patient/p1"},
        "recordedDate": "2026-11-26",
        "reaction": [{"manifestation": [{"text": "Hives"}], "onset": "2026-11-20"}],
    },
    "Condition": {
        "resourceType": "Condition",
        "identifier": [{"system": "urn:hms-ach:diagnosis", "value": "c1"}],
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J18.9"}]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "asserter": {"reference": "Practitioner/pr1"},
        "onsetDateTime": "2026-11-26T08:15:00-05:00",
        "recordedDate": "2026-11-26",
    },
    "RelatedPerson": {
        "resourceType": "RelatedPerson",
        "identifier": [{"system": "urn:hms-ach:related-person", "value": "r1"}],
        "active": True,
        "patient": {"reference": "Patient/p1"},
        "relationship": [{"coding": [{"code": "SPS"}]}],
        "name": [{"family": "Rivera", "given": ["Daniel"]}],
        "gender": "male",
        "birthDate": "1974-05-01",
    },
    "Observation": {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:hms-ach:observation", "value": "o1"}],
        "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2026-11-26T08:20:00-05:00",
        "valueCodeableConcept": {"coding": [{"code": "Y"}]},
        "valueString": "see report",
        "valueDateTime": "2026-11-26",
    },
    "Task": {
        "resourceType": "Task",
        "identifier": [{"system": "urn:hms-ach:id:case", "value": "c1"}],
        "status": "in-progress",
        "businessStatus": {"coding": [{"system": "urn:hms-ach:code:case-state", "code": "in-review"}]},
        "intent": "order",
        "priority": "urgent",
        "code": {"coding": [{"system": "urn:hms-ach:code:case-type", "code": "clinical-review"}]},
        "focus": {"reference": "Encounter/e1"},
        "for": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "owner": {"reference": "Practitioner/d1"},
        "requester": {"reference": "Organization/o1"},
        "performerType": [{"coding": [{"code": "reviewer"}]}],
        "authoredOn": "2026-12-06T09:00:00Z",
        "lastModified": "2026-12-06T09:05:00Z",
        "executionPeriod": {"start": "2026-12-06T09:00:00Z"},
        "partOf": [{"reference": "Task/t0"}],
        "basedOn": [{"reference": "ServiceRequest/s1"}],
    },
    "Questionnaire": {
        "resourceType": "Questionnaire",
        "identifier": [{"system": "urn:hms-ach:id:form", "value": "f1"}],
        "url": "urn:hms-ach:Questionnaire/clinical-review-findings",
        "name": "ClinicalReviewFindings",
        "title": "Clinical review findings",
        "status": "active",
        "version": "1",
        "date": "2026-12-01",
        "subjectType": ["Patient"],
        "item": [{"linkId": "1", "code": [{"code": "finding"}], "type": "string"}],
    },
    "QuestionnaireResponse": {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": "urn:hms-ach:id:findings", "value": "r1"},
        "questionnaire": "Questionnaire/q1|1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "author": {"reference": "Practitioner/d1"},
        "source": {"reference": "Practitioner/d1"},
        "authored": "2026-12-06T10:00:00Z",
        "basedOn": [{"reference": "ServiceRequest/s1"}],
        "partOf": [{"reference": "Procedure/x1"}],
    },
    "Provenance": {
        "resourceType": "Provenance",
        "target": [
            {"reference": "QuestionnaireResponse/r1/_history/1"},
            {"reference": "Task/t1"},
            {"reference": "Patient/p1"},
        ],
        "recorded": "2026-12-06T10:05:00Z",
        "agent": [{"who": {"reference": "Practitioner/d1"}}],
        "entity": [{"role": "source", "what": {"reference": "QuestionnaireResponse/r1/_history/1"}}],
        "signature": [
            {
                "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
                "when": "2026-12-06T10:05:00Z",
                "who": {"reference": "Practitioner/d1"},
                "sigFormat": "application/jose",
                "data": "ZXhhbXBsZQ==",
            }
        ],
    },
    "Communication": {
        "resourceType": "Communication",
        "identifier": [{"system": "urn:hms-ach:id:case-comment", "value": "c2"}],
        "status": "completed",
        "category": [
            {"coding": [{"system": "urn:hms-ach:code:communication-category", "code": "case-comment"}]}
        ],
        "about": [{"reference": "Task/t1"}],
        "partOf": [{"reference": "Communication/c1"}],
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "sender": {"reference": "Practitioner/d1"},
        "recipient": [{"reference": "Practitioner/d2"}],
        "sent": "2026-12-06T10:00:00Z",
        "payload": [{"contentString": "see the notes"}],
    },
    "Group": {
        "resourceType": "Group",
        "identifier": [{"system": "urn:hms-ach:cohort", "value": "g1"}],
        "type": "person",
        "actual": True,
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73211009"}]},
        "characteristic": [
            {"code": {"coding": [{"code": "diabetic"}]}, "valueBoolean": True, "exclude": False}
        ],
        "member": [{"entity": {"reference": "Patient/p1"}}],
    },
}


def _rows(rtype: str, kind: str, param: str) -> list[dict[str, Any]]:
    return [r for r in index_rows(rtype, FULL[rtype]).get(kind, []) if r["param"] == param]


def test_every_record_type_declares_parameters() -> None:
    assert set(SEARCH_PARAMS) == set(RECORD_TABLES)


@pytest.mark.parametrize(("rtype", "name"), [(t, n) for t, params in SEARCH_PARAMS.items() for n in params])
def test_every_declared_parameter_yields_rows(rtype: str, name: str) -> None:
    param = SEARCH_PARAMS[rtype][name]
    assert _rows(rtype, param.type, name), f"{rtype}.{name} ({param.expression}) produced no index row"


def test_required_parameters_are_declared() -> None:
    required = {
        "Patient": {"identifier", "name", "family", "given", "birthdate", "gender"},
        "Encounter": {
            "identifier",
            "patient",
            "subject",
            "status",
            "class",
            "date",
            "location",
            "practitioner",
            "participant",
        },
        "Location": {"identifier", "name", "status", "operational-status", "type", "partof"},
        "Practitioner": {"identifier", "name", "family", "given", "active"},
        "PractitionerRole": {"practitioner", "role", "organization", "active", "identifier"},
        "Organization": {"identifier", "name", "active"},
    }
    for rtype, names in required.items():
        assert names <= set(SEARCH_PARAMS[rtype]), rtype


def test_common_parameters_apply_to_every_type() -> None:
    assert search_param("Patient", "_id") is COMMON_PARAMS["_id"]
    assert search_param("Location", "_lastUpdated") is COMMON_PARAMS["_lastUpdated"]
    assert search_param("Patient", "nope") is None
    assert search_param("Nope", "name") is None


def test_walk_follows_lists_and_dicts() -> None:
    assert list(walk(FULL["Encounter"], "participant.individual")) == [
        {"reference": "Practitioner/d1"},
        {"reference": "PractitionerRole/r1"},
    ]
    assert list(walk(FULL["Patient"], "name.given")) == ["José", "Ángel"]
    assert list(walk(FULL["Patient"], "address.city")) == []
    assert list(walk({"a": None}, "a")) == []


def test_identifier_tokens() -> None:
    assert _rows("Patient", "token", "identifier") == [
        {"param": "identifier", "system": MRN, "value": "12345"},
        {"param": "identifier", "system": None, "value": "no-system"},
    ]


def test_coding_codeable_concept_code_and_boolean_tokens() -> None:
    assert _rows("Encounter", "token", "class") == [{"param": "class", "system": ACT, "value": "IMP"}]
    assert _rows("Location", "token", "type") == [
        {"param": "type", "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "value": "HOSP"}
    ]
    assert _rows("Patient", "token", "gender") == [{"param": "gender", "system": None, "value": "male"}]
    assert _rows("PractitionerRole", "token", "active") == [
        {"param": "active", "system": None, "value": "false"}
    ]
    assert _rows("PractitionerRole", "token", "role") == [
        {"param": "role", "system": "urn:roles", "value": "doctor"}
    ]


def test_human_name_parts_are_each_a_string_row() -> None:
    exact = [r["exact"] for r in _rows("Patient", "string", "name")]
    assert exact == ["Muñoz", "José", "Ángel", "Sr.", "Jr", "José Ángel Muñoz"]
    assert [r["norm"] for r in _rows("Patient", "string", "family")] == ["munoz"]
    assert [r["norm"] for r in _rows("Location", "string", "name")] == ["ward 4 west", "4w"]
    assert [r["norm"] for r in _rows("Practitioner", "string", "family")] == ["nguyen"]


def test_normalise_drops_accents_and_case() -> None:
    assert normalise("MUÑOZ") == "munoz"
    assert normalise("Ærøskøbing Ç") == normalise("ærøskøbing ç")
    assert normalise("Crème Brûlée") == "creme brulee"


def test_long_values_are_truncated_to_255() -> None:
    rows = index_rows("Patient", {"name": [{"family": "x" * 400}], "identifier": [{"value": "9" * 300}]})
    assert {len(r["norm"]) for r in rows["string"]} == {255}
    assert len(rows["token"][0]["value"]) == 255


def test_reference_rows_and_target_restriction() -> None:
    assert _rows("Encounter", "reference", "patient") == [
        {"param": "patient", "target_type": "Patient", "target_id": "p1"}
    ]
    assert len(_rows("Encounter", "reference", "participant")) == 2
    assert _rows("Encounter", "reference", "practitioner") == [
        {"param": "practitioner", "target_type": "Practitioner", "target_id": "d1"}
    ]
    group = index_rows("Encounter", {"subject": {"reference": "Group/g1"}})["reference"]
    assert [r["param"] for r in group] == ["subject"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Patient/1", ("Patient", "1")),
        ("http://example.org/fhir/Patient/1", ("Patient", "1")),
        ("http://example.org/fhir/Patient/1/_history/3", ("Patient", "1")),
        ("123", (None, "123")),
    ],
)
def test_parse_reference(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_reference(text) == expected


def _utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, microsecond: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026", _utc(2026, 1, 1), _utc(2027, 1, 1)),
        ("2026-12", _utc(2026, 12, 1), _utc(2027, 1, 1)),
        ("2026-02", _utc(2026, 2, 1), _utc(2026, 3, 1)),
        ("2026-11-26", _utc(2026, 11, 26), _utc(2026, 11, 27)),
        ("2026-11-26T10:15", _utc(2026, 11, 26, 10, 15), _utc(2026, 11, 26, 10, 16)),
        ("2026-11-26T10:15:30Z", _utc(2026, 11, 26, 10, 15, 30), _utc(2026, 11, 26, 10, 15, 31)),
        ("2026-11-26T10:15:30+02:00", _utc(2026, 11, 26, 8, 15, 30), _utc(2026, 11, 26, 8, 15, 31)),
        (
            "2026-11-26T10:15:30.5-05:00",
            _utc(2026, 11, 26, 15, 15, 30, 500000),
            _utc(2026, 11, 26, 15, 15, 30, 600000),
        ),
        ("9999", _utc(9999, 1, 1), FAR_FUTURE),
    ],
)
def test_date_ranges_follow_precision(text: str, start: datetime, end: datetime) -> None:
    assert date_range(text) == (start, end)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "26-11-2026",
        "2026-13",
        "2026-02-30",
        "0000",
        "2026-11-26T25:00Z",
        "2026-11-26T10:00+25:00",
        "yesterday",
        "2026-11-26 10:00",
    ],
)
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        date_range(text)


def test_period_rows_with_open_ends() -> None:
    rows = _rows("Encounter", "date", "date")
    assert rows == [{"param": "date", "start": _utc(2026, 11, 26, 7), "end": FAR_FUTURE}]
    closed = index_rows("Encounter", {"period": {"end": "2026-11-26"}})["date"]
    assert closed == [{"param": "date", "start": FAR_PAST, "end": _utc(2026, 11, 27)}]
    assert rows[0]["start"].utcoffset() == timedelta(0)


def test_birthdate_is_a_day_range() -> None:
    assert _rows("Patient", "date", "birthdate") == [
        {"param": "birthdate", "start": _utc(1980, 2, 29), "end": _utc(1980, 3, 1)}
    ]


def test_unparseable_values_make_no_rows() -> None:
    rows = index_rows(
        "Patient",
        {
            "birthDate": "not a date",
            "gender": None,
            "name": [{"family": " "}],
            "identifier": [{"system": "x"}],
        },
    )
    assert rows == {}
    assert index_rows("Encounter", {"subject": {"reference": "urn:uuid:abc"}}) == {}


def test_offset_timezone_is_converted() -> None:
    tz = timezone(timedelta(hours=-3))
    start, _ = date_range("2026-01-01T00:00:00-03:00")
    assert start == datetime(2026, 1, 1, tzinfo=tz)
