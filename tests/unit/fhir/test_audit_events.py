"""The BALP rendering of access records and the interaction of a request refused before routing."""

from __future__ import annotations

import base64

import pytest

from hms_ach.fhir.audit_events import as_access_event, interaction_of
from hms_ach.store import access_log


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/fhir/Patient", ("search-type", "Patient")),
        ("POST", "/fhir/Patient/_search", ("search-type", "Patient")),
        ("GET", "/fhir/Patient/1", ("read", "Patient")),
        ("GET", "/fhir/Patient/1/_history", ("history", "Patient")),
        ("GET", "/fhir/Patient/1/_history/2", ("vread", "Patient")),
        ("DELETE", "/fhir/Patient/1", ("delete", "Patient")),
        ("GET", "/api/v1/shifts", ("search-type", "shifts")),
        ("GET", "/api/v1/employees/E-1", ("read", "employees")),
    ],
)
def test_interaction_of_a_refused_request(method: str, path: str, expected: tuple[str, str]) -> None:
    assert interaction_of(method, path) == expected


def test_an_access_record_renders_in_the_balp_pattern() -> None:
    sub, actor = access_log.http_actor(None, "10.0.0.7")
    access = access_log.Access(
        "search-type",
        "Encounter",
        200,
        "dr-x",
        actor,
        ["Encounter/9", "Patient/4"],
        1,
        "/fhir/Encounter?patient=4",
    )
    row = {"seq": 7, **access.row(), "hash": "0" * 64}
    event = as_access_event(row)
    assert event["id"] == "access-7" and event["type"]["code"] == "rest"
    assert event["subtype"][0]["code"] == "search-type" and event["outcome"] == "0"
    requestor = next(a for a in event["agent"] if a["requestor"])
    assert requestor["who"]["identifier"]["value"] == "dr-x" and requestor["network"]["address"] == "10.0.0.7"
    patient = next(e for e in event["entity"] if e.get("what", {}).get("reference") == "Patient/4")
    assert patient["role"]["code"] == "1"
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert base64.b64decode(query["query"]).decode() == "/fhir/Encounter?patient=4"
    refused = as_access_event({**row, "outcome": 403})
    assert refused["outcome"] == "4" and refused["outcomeDesc"] == "HTTP 403"
