"""The /api/v1 roles: hr_admin, scheduler (by department), employee (own records), auditor, integration."""

from __future__ import annotations

import pytest

from hms_ach.auth import ACTIONS, ROLE_RULES, Caller
from hms_ach.auth.roles import grant


def caller(*roles: str, employee_id: str | None = None, departments: tuple[str, ...] = ()) -> Caller:
    return Caller(
        sub="u", roles=frozenset(roles), employee_id=employee_id, departments=frozenset(departments)
    )


def test_every_rule_names_a_known_action() -> None:
    for role, rules in ROLE_RULES.items():
        assert set(rules) <= set(ACTIONS), role
        assert set(rules.values()) <= {"any", "department", "own"}, role


def test_hr_admin_does_every_workforce_write_but_not_the_audit_trail() -> None:
    hr = caller("hr_admin")
    for action in ACTIONS:
        expected = action not in ("audit.read", "metrics.read") and not action.startswith(
            ("cases.", "analytics.", "complaints.")
        )
        assert hr.grant(action).unrestricted is expected, action


def test_review_case_roles() -> None:
    supervised = [a for a in ACTIONS if caller("supervisor").grant(a).allowed]
    assert {"cases.create", "cases.read", "cases.assign", "cases.audit", "analytics.review"} <= set(
        supervised
    )
    assert {"cases.move", "cases.comment"} <= set(supervised)
    assert all(a.startswith(("cases.", "analytics.", "complaints.")) for a in supervised)
    mine = caller("reviewer", employee_id="d1")
    assert {
        a for a in ("cases.read", "cases.move", "cases.comment") if mine.grant(a).employee_ids == {"d1"}
    } == {
        "cases.read",
        "cases.move",
        "cases.comment",
    }
    assert [a for a in ACTIONS if caller("reviewer").grant(a).allowed] == []  # own: needs employee_id
    assert caller("auditor").grant("cases.read").unrestricted
    assert not caller("auditor").grant("cases.create").allowed
    assert caller("integration").grant("cases.create").unrestricted
    # the audit log of a case: auditors and supervisors every case, a reviewer their own
    assert caller("auditor").grant("cases.audit").unrestricted
    assert caller("reviewer", employee_id="P1").grant("cases.audit").employee_ids == {"P1"}
    assert caller("auditor").grant("analytics.review").unrestricted
    assert not caller("reviewer", employee_id="P1").grant("analytics.review").allowed


def test_complaint_roles() -> None:
    complaints = [a for a in ACTIONS if a.startswith("complaints.")]
    assert complaints == ["complaints.create", "complaints.read", "complaints.resolve"]
    assert all(caller("supervisor").grant(a).unrestricted for a in complaints)
    officer = caller("complaints-officer", departments=("PRIVACY",))
    assert officer.grant("complaints.create").unrestricted
    assert officer.grant("complaints.resolve").permits(department="PRIVACY")
    assert not officer.grant("complaints.resolve").permits(department="BILLING-OFFICE")
    assert not caller("complaints-officer").grant("complaints.read").allowed  # no department claim
    assert [a for a in complaints if caller("integration").grant(a).unrestricted] == [
        "complaints.create",
        "complaints.read",
    ]
    assert not any(
        caller(r).grant(a).allowed for r in ("hr_admin", "auditor", "reviewer") for a in complaints
    )


def test_findings_signatures_and_the_escalation_queue() -> None:
    reviewer = caller("reviewer", employee_id="E1")
    for action in ("cases.findings", "cases.sign"):
        assert reviewer.grant(action).employee_ids == {"E1"} and not reviewer.grant(action).unrestricted
        assert caller("supervisor").grant(action).unrestricted
        assert not caller("auditor").grant(action).allowed
    assert caller("supervisor").grant("cases.queue").unrestricted
    assert caller("auditor").grant("cases.queue").unrestricted
    assert not reviewer.grant("cases.queue").allowed


def test_operator_reads_the_metrics_and_no_record() -> None:
    op = caller("operator")
    assert [a for a in ACTIONS if op.grant(a).allowed] == ["metrics.read"]
    assert caller("integration").grant("metrics.read").unrestricted


def test_employee_sees_only_their_own_shifts_and_cannot_approve_swaps() -> None:
    emp = caller("employee", employee_id="E1")
    shifts = emp.grant("shifts.read")
    assert shifts.permits(employee_id="E1") and not shifts.permits(employee_id="E2")
    assert not shifts.unrestricted and shifts.employee_ids == {"E1"}
    assert emp.grant("swaps.request").permits(employee_id="E1")
    assert not emp.grant("swaps.request").permits(employee_id="E2")
    assert not emp.grant("swaps.decide").allowed
    assert not emp.grant("shifts.write").allowed
    assert emp.grant("timecards.write").permits(employee_id="E1")
    # the role without an employee_id claim grants nothing
    assert not caller("employee").grant("shifts.read").allowed


def test_scheduler_is_limited_to_their_departments() -> None:
    sched = caller("scheduler", departments=("ICU", "ER"))
    edit = sched.grant("shifts.write")
    assert edit.permits(department="ICU") and edit.permits(department="ER")
    assert not edit.permits(department="Oncology") and not edit.permits()
    assert sched.grant("swaps.decide").permits(department="ER")
    assert not sched.grant("employees.write").allowed and not sched.grant("audit.read").allowed
    assert not caller("scheduler").grant("shifts.write").allowed  # no department claim: nothing


def test_auditor_reads_the_trail_and_writes_nothing() -> None:
    aud = caller("auditor")
    assert aud.grant("audit.read").unrestricted and aud.grant("compliance.read").unrestricted
    writes = [a for a in ACTIONS if a.endswith((".write", ".decide", ".request"))]
    assert writes and not any(aud.grant(a).allowed for a in writes)


def test_integration_is_system_use() -> None:
    integ = caller("integration")
    assert integ.grant("employees.write").unrestricted and integ.grant("timecards.write").unrestricted


def test_roles_combine_and_unknown_roles_grant_nothing() -> None:
    both = caller("employee", "scheduler", employee_id="E1", departments=("ICU",))
    g = both.grant("shifts.read")
    assert g.permits(employee_id="E1") and g.permits(department="ICU") and not g.permits("E2", "ER")
    assert not caller("root", "admin", "HR_ADMIN").grant("employees.write").allowed
    with pytest.raises(KeyError, match="unknown /api/v1 action"):
        grant(["hr_admin"], "employees.drop")
