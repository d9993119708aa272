"""The policies of a workflow over a case's findings (pure), where they send the case, and the checks
`hms-ach check` runs on a workflow's policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hms_ach.cases.findings import counts, evaluate, holds, outcome_state, path_to, reason_of
from hms_ach.cases.signatures import SIGNATURE_EXT
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.mapping.loader import load_mappings
from hms_ach.mapping.spec import WorkflowPolicy
from tests.unit.cases.test_workflow import ROOT, _broken


@pytest.fixture(scope="module")
def review() -> Workflow:
    return workflows(load_mappings(ROOT / "mappings"))["clinical-review"]


def findings(score: Any = 7, attest: bool | None = True, signed: bool = False) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"linkId": "finding", "answer": [{"valueString": "ok"}]}]
    if score is not None:
        items.append({"linkId": "group", "item": [{"linkId": "score", "answer": [{"valueInteger": score}]}]})
    if attest is not None:
        items.append({"linkId": "physician-attestation", "answer": [{"valueBoolean": attest}]})
    qr: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "status": "completed", "item": items}
    if signed:
        qr["extension"] = [{"url": SIGNATURE_EXT, "valueReference": {"reference": "Provenance/p1"}}]
    return qr


@pytest.mark.parametrize(
    ("qr", "broken"),
    [
        (findings(signed=True), []),
        (findings(), [("signature-required", "error")]),
        (findings(score=11, signed=True), [("score-range", "error")]),
        (
            findings(score=-1, attest=False),
            [("signature-required", "error"), ("score-range", "error"), ("attestation", "warning")],
        ),
        (
            findings(score=None, attest=None, signed=True),
            [("attestation", "warning")],
        ),  # the form requires a score
    ],
)
def test_the_shipped_policies(review: Workflow, qr: dict[str, Any], broken: list[tuple[str, str]]) -> None:
    assert [(v.policy, v.severity) for v in evaluate(review.spec.policies, qr)] == broken


def test_where_the_findings_send_the_case(review: Workflow) -> None:
    unsigned = evaluate(review.spec.policies, findings())
    assert outcome_state(review, unsigned) == "escalated"
    assert reason_of(unsigned) == "policy signature-required (error)"
    assert counts(unsigned) == {"error": 1, "warning": 0, "information": 0}
    warned = evaluate(review.spec.policies, findings(attest=False, signed=True))
    assert outcome_state(review, warned) == "resolved"
    assert reason_of(warned) == "findings passed the policies (with attestation)"
    # the shortest chain of transitions; none out of a final state
    assert path_to(review, "triage", "escalated") == ["escalated"]
    assert path_to(review, "triage", "resolved") == ["in-review", "resolved"]
    assert path_to(review, "escalated", "resolved") == ["resolved"]
    assert path_to(review, "escalated", "escalated") == []
    assert path_to(review, "resolved", "escalated") is None


def test_a_rule_that_is_empty_false_or_fails_does_not_hold() -> None:
    def rule(expression: str) -> WorkflowPolicy:
        return WorkflowPolicy(id="r", expression=expression, message="m")

    qr = findings()
    assert holds(rule("status = 'completed'"), qr)
    assert not holds(rule("status = 'amended'"), qr)
    assert not holds(rule("item.where(linkId = 'none').exists().not().not() and {}"), qr)  # empty
    assert not holds(rule("item.linkId"), qr)  # not booleans
    assert not holds(rule("item.answer.valueString.toInteger() + 1 > 0"), qr)  # not a true


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "valueInteger.all($this >= 0",
            "valueInteger.all($this >>= 0",
            "clinical-review.yaml:61:5: the FHIRPath does not compile",
        ),
        ("on_violation: escalated", "on_violation: escalate", "unknown state 'escalate'; did you mean"),
        ("on_findings: resolved", "on_findings: done", "unknown state 'done'"),
        ("id: score-range", "id: signature-required", "policy 'signature-required' is declared twice"),
        ("severity: warning", "severity: fatal", "severity"),
        ("on_findings: resolved\n", "", "policies need on_findings and on_violation"),
    ],
)
def test_broken_policies_are_refused_with_their_place(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert expected in _broken(tmp_path, old, new)
