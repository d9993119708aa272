"""The shipped workflow files, and the checks `hms-ach check` runs on a workflow file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hms_ach.cases.workflow import Workflow, case_type_of, state_of, workflows
from hms_ach.core.errors import ConfigErrors
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def shipped() -> dict[str, Workflow]:
    return workflows(load_mappings(ROOT / "mappings"))


def test_shipped_workflows(shipped: dict[str, Workflow]) -> None:
    assert set(shipped) == {"clinical-review", "complaint"}
    review = shipped["clinical-review"]
    assert review.initial.name == "triage" and review.initial.status == "ready"
    assert review.spec.form == "clinical-review-findings"
    assert review.spec.assignment.credentials == ["MD"]
    assert review.may_move("triage", "in-review", ["reviewer"])
    assert not review.may_move("escalated", "in-review", ["reviewer"])
    assert review.may_move("escalated", "in-review", ["auditor", "supervisor"])
    assert not review.may_move("resolved", "in-review", ["supervisor"])
    assert review.sla_minutes("in-review", "urgent") == 480
    assert review.sla_minutes("escalated", "urgent") is None
    assert "resolved" not in review.open_states()
    task = {"code": review.code(), "businessStatus": review.business_status("triage")}
    assert case_type_of(task) == "clinical-review" and state_of(task) == "triage"
    assert case_type_of({}) is None and state_of({"businessStatus": {"text": "x"}}) is None


def _broken(tmp_path: Path, old: str, new: str, file: str = "workflows/clinical-review.yaml") -> str:
    """The errors of the shipped mappings with ``old`` replaced by ``new`` in ``file``."""
    root = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", root)
    path = root / file
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigErrors) as caught:
        load_mappings(root)
    return str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "initial: triage",
            "initial: triag",
            "clinical-review.yaml:8:1: unknown state 'triag'; did you mean 'triage'?",
        ),
        ("status: on-hold", "status: paused", "unknown Task.status 'paused'"),
        ("{stat: 30,", "{soon: 30,", "unknown priority 'soon'"),
        ("escalate_to: escalated", "escalate_to: late", "unknown state 'late'"),
        ("{from: triage, to: in-review", "{from: resolved, to: in-review", "state 'resolved' is final"),
        ("to: cancelled, roles: [supervisor]}", "to: cancel, roles: [supervisor]}", "unknown state 'cancel'"),
        (
            "  - {from: triage, to: escalated, roles: [supervisor]}\n",
            "",
            "clinical-review.yaml:19:7: a late 'triage' case escalates to 'escalated', but no transition"
            " triage -> escalated is declared",
        ),
    ],
)
def test_broken_workflows_are_refused_with_their_place(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert expected in _broken(tmp_path, old, new)
