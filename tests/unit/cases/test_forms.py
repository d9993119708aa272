"""The shipped forms, what their items ask, and checking findings against them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hms_ach.cases.forms import FormItem, Issue, form_items, validate_response

ROOT = Path(__file__).resolve().parents[3]
FORMS = ROOT / "mappings" / "workflows" / "forms"


def _form(name: str) -> dict[str, Any]:
    return dict(json.loads((FORMS / f"{name}.json").read_text(encoding="utf-8")))


def _response(**answers: Any) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [{"linkId": k.replace("_", "-"), "answer": v} for k, v in answers.items()],
    }


OUTCOME = "urn:hms-ach:code:review-outcome"
GOOD = {
    "outcome": [{"valueCoding": {"system": OUTCOME, "code": "appropriate"}}],
    "score": [{"valueInteger": 7}],
    "comment": [{"valueString": "fine"}],
    "physician_attestation": [{"valueBoolean": True}],
}


def test_the_clinical_review_form_items() -> None:
    items = {i.link_id: i for i in form_items(_form("clinical-review-findings"))}
    assert list(items) == ["outcome", "score", "comment", "physician-attestation"]
    assert items["outcome"].required and items["outcome"].answer_key == "valueCoding"
    assert [c for _, c in items["outcome"].options] == ["appropriate", "inappropriate", "needs-discussion"]
    assert (items["score"].type, items["score"].min_value, items["score"].max_value) == ("integer", 0, 10)
    assert not items["comment"].required and items["physician-attestation"].answer_key == "valueBoolean"
    complaint = form_items(_form("complaint-resolution"))
    assert [(i.link_id, i.type, i.required) for i in complaint] == [
        ("resolution", "text", True),
        ("upheld", "boolean", True),
    ]


def test_a_complete_response_has_no_issues() -> None:
    assert validate_response(_form("clinical-review-findings"), _response(**GOOD)) == []
    upheld = _response(resolution=[{"valueString": "apology sent"}], upheld=[{"valueBoolean": False}])
    assert validate_response(_form("complaint-resolution"), upheld) == []


@pytest.mark.parametrize(
    ("change", "issue"),
    [
        ({"score": None}, Issue("score", "is required but has no answer")),
        ({"score": [{"valueInteger": 11}]}, Issue("score", "the answer is above the maximum 10")),
        ({"score": [{"valueInteger": -1}]}, Issue("score", "the answer is below the minimum 0")),
        (
            {"score": [{"valueString": "7"}]},
            Issue("score", "the answer must be a valueInteger (a integer item)"),
        ),
        ({"score": [{"valueInteger": True}]}, Issue("score", "the answer is not a valid valueInteger")),
        (
            {"score": [{"valueInteger": 1}, {"valueInteger": 2}]},
            Issue("score", "takes one answer, 2 were given"),
        ),
        (
            {"outcome": [{"valueCoding": {"system": OUTCOME, "code": "splendid"}}]},
            Issue(
                "outcome",
                "the answer is not one of the options (appropriate, inappropriate, needs-discussion)",
            ),
        ),
        ({"verdict": [{"valueString": "x"}]}, Issue("verdict", "not an item of the form")),
    ],
)
def test_each_issue_names_the_item_and_never_the_answer(change: dict[str, Any], issue: Issue) -> None:
    answers = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    issues = validate_response(_form("clinical-review-findings"), _response(**answers))
    assert issues == [issue]
    assert "splendid" not in str(issues) and "11" not in issue.message.replace("maximum 10", "")


def test_malformed_input_is_an_issue_not_a_crash() -> None:
    form = _form("complaint-resolution")
    assert validate_response(form, {"resourceType": "Patient"}) == [
        Issue("", "a QuestionnaireResponse is expected")
    ]
    odd = {
        "resourceType": "QuestionnaireResponse",
        "item": [{"linkId": "upheld", "answer": 5}, "x", {"linkId": 3}],
    }
    assert [i.link_id for i in validate_response(form, odd)] == ["resolution", "upheld"]
    assert form_items({"item": "nope"}) == [] and form_items(
        {"item": [{"linkId": "a", "type": "string"}]}
    ) == [FormItem("a", "string")]
