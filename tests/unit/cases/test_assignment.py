"""The choice of the next available reviewer, from plain facts (no store)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from hms_ach.cases.assignment import Candidate, Credential, choose, judge
from hms_ach.mapping.spec import WorkflowAssignment

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ON_SHIFT = ((NOW - timedelta(hours=2), NOW + timedelta(hours=6)),)
RULE = WorkflowAssignment(role="reviewer", credentials=["MD"])
MD = Credential("MD", date(2025, 1, 1), date(2027, 1, 1), "verified")


def test_only_the_licensed_add_reviewer_is_chosen_and_the_others_are_explained() -> None:
    ok = Candidate("a", credentials=(MD,), shifts=ON_SHIFT)
    expired = Candidate("b", credentials=(Credential("MD", None, date(2026, 11, 30)),), shifts=ON_SHIFT)
    off = Candidate("c", credentials=(MD,), shifts=((NOW + timedelta(hours=3), NOW + timedelta(hours=11)),))
    choice = choose([off, expired, ok], RULE, None, NOW)
    assert choice.chosen == "a"
    reasons = {c.practitioner_id: c.reasons for c in choice.considered}
    assert reasons == {
        "a": (),
        "b": ("credential MD expired on 2026-11-30",),
        "c": ("not on shift now",),
    }
    text = choice.explanation()
    assert text.startswith("assigned to Practitioner/a: the only qualified reviewer; 3 holder(s)")
    assert "Passed over Practitioner/b: credential MD expired on 2026-11-30." in text
    assert "Passed over Practitioner/c: not on shift now." in text


def test_fewest_open_cases_then_longest_since_last_assignment() -> None:
    busy = Candidate("a", credentials=(MD,), shifts=ON_SHIFT, open_cases=3)
    recent = Candidate("b", credentials=(MD,), shifts=ON_SHIFT, open_cases=1, last_assigned=NOW)
    earlier = Candidate(
        "c", credentials=(MD,), shifts=ON_SHIFT, open_cases=1, last_assigned=NOW - timedelta(1)
    )
    assert choose([busy, recent, earlier], RULE, None, NOW).chosen == "c"
    never = Candidate("d", credentials=(MD,), shifts=ON_SHIFT, open_cases=1)
    assert choose([busy, recent, earlier, never], RULE, None, NOW).chosen == "d"


def test_nobody_qualifies_the_case_is_queued() -> None:
    choice = choose([Candidate("a", active=False, credentials=(MD,), shifts=ON_SHIFT)], RULE, None, NOW)
    assert choice.chosen is None
    assert choice.explanation() == (
        "queued: none of the 1 holder(s) of the role qualified. Passed over Practitioner/a: not active."
    )
    assert choose([], RULE, None, NOW).chosen is None


def test_window_department_verification_and_missing_credentials() -> None:
    soon = ((NOW + timedelta(minutes=30), NOW + timedelta(hours=8)),)
    windowed = WorkflowAssignment(role="reviewer", credentials=["MD"], shift_window_minutes=60)
    assert judge(Candidate("a", credentials=(MD,), shifts=soon), windowed, None, NOW).qualified
    assert not judge(Candidate("a", credentials=(MD,), shifts=soon), RULE, None, NOW).qualified
    other = judge(Candidate("a", department="ICU", credentials=(MD,), shifts=ON_SHIFT), RULE, "CARD", NOW)
    assert other.reasons == ("not in department CARD",)
    failed = Credential("MD", None, None, "failed")
    assert judge(Candidate("a", credentials=(failed,), shifts=ON_SHIFT), RULE, None, NOW).reasons == (
        "credential MD verification is failed",
    )
    future = Credential("MD", date(2027, 1, 1), None)
    assert judge(Candidate("a", credentials=(future,), shifts=ON_SHIFT), RULE, None, NOW).reasons == (
        "credential MD is valid only from 2027-01-01",
    )
    assert judge(Candidate("a", shifts=ON_SHIFT), RULE, None, NOW).reasons == ("no credential MD",)


def test_case_view_of_a_task_written_over_fhir() -> None:
    from hms_ach.cases.opening import case_view
    from hms_ach.cases.transitions import DUE_EXT

    task = {"id": "t1", "status": "ready", "extension": [{"url": DUE_EXT, "valueDateTime": "not a date"}]}
    view = case_view(task, NOW)
    assert (view["case_type"], view["overdue"], view["assignee"]) == (None, False, None)
    task["extension"] = [{"url": DUE_EXT, "valueDateTime": "2026-12-06T11:00:00"}]
    assert case_view(task, NOW)["overdue"] is True
    task["status"] = "completed"
    assert case_view(task, NOW)["overdue"] is False
