"""Complaints without a store: routing by category (and its checks in `hms-ach check`), the
complainant's record, the way to the resolved state, and the request's validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hms_ach.cases.assignment import Choice
from hms_ach.cases.complaints import (
    CATEGORY_EXT,
    COMPLAINANT_SYSTEM,
    ComplaintIn,
    ComplaintRefused,
    category_of,
    complainant_record,
    complaint_task,
    complaint_view,
    path_to,
    route,
)
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.core.errors import ConfigErrors
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def complaint() -> Workflow:
    return workflows(load_mappings(ROOT / "mappings"))["complaint"]


def _body(**changes: Any) -> ComplaintIn:
    body: dict[str, Any] = {
        "category": "billing",
        "description": "Charged twice.",
        "complainant": {"name": "A Person", "email": "a.person@example.org"},
        **changes,
    }
    return ComplaintIn.model_validate(body)


def test_routing_by_category(complaint: Workflow) -> None:
    assert route(complaint, "privacy", None) == ("PRIVACY", "asap")  # the category's priority
    assert route(complaint, "privacy", "stat") == ("PRIVACY", "stat")  # the request's wins
    assert route(complaint, "billing", None) == ("BILLING-OFFICE", "routine")
    assert route(complaint, "clinical-care", None) == ("PATIENT-RELATIONS", "urgent")  # the default
    with pytest.raises(ComplaintRefused) as caught:
        route(complaint, "parkng", None)
    assert caught.value.reason == "unknown-category"
    assert "expected one of clinical-care, staff-conduct, billing, facilities, privacy" in caught.value.detail


def test_the_complainant_is_a_related_person_of_the_patient_or_a_patient(complaint: Workflow) -> None:
    rtype, person = complainant_record(_body(patient="Patient/7"), "CMP-1")
    assert rtype == "RelatedPerson" and person["patient"] == {"reference": "Patient/7"}
    assert person["identifier"] == [{"system": COMPLAINANT_SYSTEM, "value": "CMP-1"}]
    assert person["telecom"] == [{"system": "email", "value": "a.person@example.org", "rank": 1}]
    sms = {"name": "B", "email": "b@example.org", "phone": "+44 20 7946 0018", "preferred": "sms"}
    rtype, person = complainant_record(_body(complainant=sms), "CMP-2")
    assert rtype == "Patient" and "patient" not in person
    assert person["telecom"] == [
        {"system": "email", "value": "b@example.org"},
        {"system": "sms", "value": "+44 20 7946 0018", "rank": 1},
    ]


def test_the_task_names_the_requester_not_the_person(complaint: Workflow) -> None:
    body = _body(patient="Patient/7", occurred_at="2026-12-01T10:30:00+01:00")
    task = complaint_task(
        complaint, body, "CMP-1", "RelatedPerson/3", "BILLING-OFFICE", "urgent", Choice(None, ()), NOW
    )
    assert task["requester"] == {"reference": "RelatedPerson/3"}
    assert task["focus"] == {"reference": "Patient/7"} and task["for"] == {"reference": "Patient/7"}
    assert (task["status"], task["priority"], category_of(task)) == ("received", "urgent", "billing")
    assert {"url": CATEGORY_EXT, "valueCode": "billing"} in task["extension"]
    assert task["input"] == [{"type": {"text": "occurred"}, "valueDateTime": "2026-12-01T09:30:00Z"}]
    assert "A Person" not in str(task) and "example.org" not in str(task)
    alone = complaint_task(
        complaint, _body(), "CMP-2", "Patient/9", "BILLING-OFFICE", "routine", Choice(None, ()), NOW
    )
    assert alone["focus"] == {"reference": "Patient/9"} and "for" not in alone


def test_the_view_of_a_task_written_over_fhir_with_odd_elements(complaint: Workflow) -> None:
    task = {
        "id": "t1",
        "code": complaint.code(),
        "requester": "RelatedPerson/1",
        "output": [{"type": "resolution", "valueReference": 5}, "x", {"type": {"text": "upheld"}}],
        "extension": [{"url": CATEGORY_EXT, "valueCode": "billing"}],
    }
    view = complaint_view(task, NOW)
    assert (view["complainant"], view["resolution"], view["upheld"], view["category"]) == (
        None,
        None,
        None,
        "billing",
    )


def test_the_way_to_resolved(complaint: Workflow) -> None:
    assert path_to(complaint, "logged", "resolved") == ["investigating", "resolved"]
    assert path_to(complaint, "investigating", "resolved") == ["resolved"]
    assert path_to(complaint, "escalated", "resolved") == ["resolved"]
    assert path_to(complaint, "resolved", "resolved") == []
    assert path_to(complaint, "rejected", "resolved") == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"complainant": {"name": "A"}}, "needs an email or a phone"),
        ({"complainant": {"name": "A", "email": "a@example.org", "preferred": "sms"}}, "no phone is given"),
        ({"complainant": {"name": "A", "phone": "+1 555 0100", "preferred": "email"}}, "no email is given"),
        ({"complainant": {"name": "A", "email": "a@@example"}}, "should match pattern"),
        ({"occurred_at": "2026-12-01T10:30:00"}, "needs a UTC offset"),
        ({"patient": "Practitioner/1"}, "should match pattern"),
    ],
)
def test_bad_requests(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _body(**changes)
    assert message in str(caught.value)


def _check_edited(tmp_path: Path, old: str, new: str) -> str:
    """What loading the shipped complaint workflow, with ``old`` replaced by ``new``, is refused for."""
    folder = tmp_path / "mappings" / "workflows"
    folder.mkdir(parents=True)
    shipped = (ROOT / "mappings" / "workflows" / "complaint.yaml").read_text(encoding="utf-8")
    assert old in shipped
    (folder / "complaint.yaml").write_text(shipped.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigErrors) as refused:
        load_mappings(tmp_path / "mappings")
    return str(refused.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "      priority: asap",
            "      priority: soon",
            "complaint.yaml:69:7: routing.categories.4.priority: Value error, unknown priority 'soon'",
        ),
        (
            "    - code: access",
            "    - code: billing",
            "complaint.yaml:53:3: routing.categories: Value error, category 'billing' is listed twice",
        ),
        (
            "    - code: access",
            "    - code: Access",
            "routing.categories.5.code: String should match pattern",
        ),
        (
            "  default_department: PATIENT-RELATIONS\n",
            "",
            "complaint.yaml:51:1: missing required key 'routing.default_department'",
        ),
        (
            "      department: PRIVACY\n",
            "      department: PRIVACY\n      queue: x\n",
            "complaint.yaml:69:7: unknown key 'queue' (expected one of code, display, department, priority)",
        ),
    ],
)
def test_routing_checks_name_file_line_col(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert expected in _check_edited(tmp_path, old, new)
