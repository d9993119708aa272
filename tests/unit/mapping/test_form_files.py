"""The form files of the workflows: checked with the mappings, each problem at its file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.mapping.form_files import form_paths
from hms_ach.mapping.loader import load_mappings
from tests.unit.cases.test_workflow import _broken

ROOT = Path(__file__).resolve().parents[3]
FORM = "workflows/forms/clinical-review-findings.json"


def test_the_shipped_forms_are_loaded_by_id() -> None:
    mset = load_mappings(ROOT / "mappings")
    assert sorted(mset.forms) == ["clinical-review-findings", "complaint-resolution"]
    assert mset.forms["complaint-resolution"].model["resourceType"] == "Questionnaire"
    assert [p.name for p in form_paths(ROOT / "mappings")] == [
        "clinical-review-findings.json",
        "complaint-resolution.json",
    ]


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "workflows/clinical-review.yaml",
            "form: clinical-review-findings",
            "form: clinical-review-finding",
            "clinical-review.yaml:7:1: unknown form 'clinical-review-finding'; did you mean "
            "'clinical-review-findings'? (expected the id of a form file in",
        ),
        (
            FORM,
            '"type": "integer"',
            '"type": "int"',
            "clinical-review-findings.json:27:7: unknown item type 'int'",
        ),
        (
            FORM,
            '"id": "clinical-review-findings"',
            '"id": "other"',
            "json:3:3: the form's id is not its file name",
        ),
        (FORM, '"linkId": "comment"', '"linkId": "score"', "json:34:6: linkId 'score' is used twice"),
        (FORM, '"status": "active"', '"status": "live"', "json:9:3: Questionnaire.status"),
        (
            FORM,
            '"resourceType": "Questionnaire"',
            '"resourceType": "Basic"',
            "a form is a FHIR R4 Questionnaire",
        ),
        (
            FORM,
            '"valueInteger": 0}',
            '"valueDecimal": 0.5}',
            "the bound of an item of type 'integer' is a valueInteger",
        ),
        (
            FORM,
            '"required": true,\n      "answerOption"',
            '"required": true,\n      "x"',
            "choice item 'outcome' has no answerOption",
        ),
        (FORM, "{", "{,", "YAML syntax error"),
    ],
)
def test_broken_forms_are_refused_with_their_place(
    tmp_path: Path, file: str, old: str, new: str, expected: str
) -> None:
    assert expected in _broken(tmp_path, old, new, file)
