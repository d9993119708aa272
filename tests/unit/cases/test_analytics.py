"""The definitions of the review figures on plain histories (docs/review-cases.md, "Analytics")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hms_ach.cases.analytics import (
    Rules,
    Step,
    Window,
    percentile,
    reopened,
    sla_breaches,
    violating_findings,
)
from hms_ach.cases.findings import POLICY_VIOLATION_EXT
from hms_ach.store.case_audit_queries import RecordVersion

RULES = Rules(final=frozenset({"resolved"}), escalation=frozenset({"escalated"}))
NOV = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


def _step(day: int, state: str, notes: tuple[str, ...] = (), **extra: Any) -> Step:
    task = {"note": [{"text": n} for n in notes], **extra}
    return Step(datetime(2026, 11, day, tzinfo=UTC), state, None, task)


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0  # even count: the lower middle value
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile(range(1, 11), 90) == 9  # ceil(0.9 * 10) = 9th smallest
    assert percentile(range(1, 12), 90) == 10  # ceil(9.9) = 10th


def test_a_reopen_leaves_a_final_or_an_escalation_state_in_the_window() -> None:
    back = [_step(1, "in-review"), _step(2, "escalated"), _step(3, "in-review")]
    assert reopened(back, RULES, NOV)
    again = [_step(1, "in-review"), _step(2, "resolved"), _step(3, "in-review")]
    assert reopened(again, RULES, NOV)
    closed = [_step(1, "in-review"), _step(2, "escalated"), _step(3, "resolved")]
    assert not reopened(closed, RULES, NOV)
    before = Window(datetime(2026, 11, 3, 12, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert not reopened(back, RULES, before)  # the reopen was before the window


def test_sla_breaches_by_the_extension_or_the_engines_escalation() -> None:
    by_timer = [
        _step(1, "in-review", ("a",)),
        _step(2, "escalated", ("a", "in-review -> escalated by hms-ach")),
    ]
    assert sla_breaches(by_timer, RULES, NOV) == 1
    by_person = [
        _step(1, "in-review", ("a",)),
        _step(2, "escalated", ("a", "in-review -> escalated by sup-1")),
    ]
    assert sla_breaches(by_person, RULES, NOV) == 0
    flag = [{"url": "urn:hms-ach:fhir:StructureDefinition/case-sla-breached", "valueDateTime": "x"}]
    flagged = [
        _step(1, "in-review"),
        _step(2, "escalated", ("in-review -> escalated by hms-ach",), extension=flag),
        _step(3, "escalated", ("in-review -> escalated by hms-ach",), extension=flag),  # still flagged
    ]
    assert sla_breaches(flagged, RULES, NOV) == 1


def test_a_policy_violation_is_the_extension_of_the_findings_output() -> None:
    def version(*outputs: dict[str, Any]) -> RecordVersion:
        return RecordVersion(
            "Task", "t", 1, datetime(2026, 11, 1, tzinfo=UTC), False, {"output": list(outputs)}
        )

    flagged = {
        "type": {"text": "findings"},
        "valueReference": {"reference": "QuestionnaireResponse/q1"},
        "extension": [{"url": POLICY_VIOLATION_EXT, "valueCode": "signature-required"}],
    }
    clean = {"type": {"text": "findings"}, "valueReference": {"reference": "QuestionnaireResponse/q2"}}
    assert violating_findings({"t": [version(flagged, clean)]}) == {"q1"}
    assert violating_findings({"t": [version(clean)]}) == set()
