"""Shift records from requests and the swap rules, over an in-memory roster."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hms_ach.workforce import rules
from hms_ach.workforce.rules import NotPermitted, RecordNotFound, RuleBroken, StateConflict
from hms_ach.workforce.settings import SwapSettings, WorkforceSettings
from hms_ach.workforce.swap_rules import ShiftPlan, SwapCaller, shift_record, swap_decision, swap_request
from tests.unit.workforce.memory_roster import (
    MONDAY,
    RN_RULES,
    TUESDAY,
    MemoryRoster,
    nurse,
    qualification,
    stored_shift,
)

ANN = SwapCaller("ann-login", own_ids=frozenset({"ann"}))
SCHEDULER = SwapCaller("sam", departments=frozenset({"4 West"}))
OTHER_SCHEDULER = SwapCaller("eve", departments=frozenset({"ER"}))
BEFORE = MONDAY - timedelta(days=1)


@pytest.fixture
def roster() -> MemoryRoster:
    return MemoryRoster(
        employees={
            "ann": nurse("ann"),
            "bob": nurse("bob"),
            "lpn": nurse("lpn", qualification("LPN")),
        },
        shifts={"s1": stored_shift("s1", "ann", TUESDAY), "s2": stored_shift("s2", "bob", MONDAY)},
    )


def test_a_new_shift_record(roster: MemoryRoster) -> None:
    plan = ShiftPlan(
        start=MONDAY + timedelta(days=3),
        end=MONDAY + timedelta(days=3, hours=8),
        status="confirmed",
        shift_id="N1",
        employee_id="bob",
        role="RN",
        department="4 West",
        location_id="ward-4w",
    )
    rec = shift_record(roster, plan, None, RN_RULES)
    assert (rec.resource_type, rec.key_system, rec.key_value, rec.mode) == (
        "Shift",
        rules.SHIFT_SYSTEM,
        "N1",
        "replace",
    )
    assert rec.content["practitioner"] == {"reference": "Practitioner/bob"}
    assert rec.content["location"] == {"reference": "Location/ward-4w"}
    unfilled = shift_record(
        roster, ShiftPlan(start=MONDAY, end=MONDAY + timedelta(hours=8), status="open"), None, RN_RULES
    )
    assert "practitioner" not in unfilled.content and unfilled.content["status"] == "open"


def test_a_refused_shift_names_the_request_field(roster: MemoryRoster) -> None:
    with pytest.raises(RuleBroken) as err:
        shift_record(
            roster,
            ShiftPlan(start=MONDAY, end=MONDAY + timedelta(hours=8), employee_id="eve"),
            None,
            RN_RULES,
        )
    assert (err.value.code, err.value.field) == ("shift.unknown_employee", "employee_id")
    with pytest.raises(RuleBroken) as err:
        shift_record(
            roster,
            ShiftPlan(start=MONDAY, end=MONDAY + timedelta(hours=8), employee_id="lpn", role="RN"),
            None,
            RN_RULES,
        )
    assert (err.value.code, err.value.field) == ("shift.role_not_held", "role")
    with pytest.raises(rules.InvalidRequest) as naive:
        shift_record(roster, ShiftPlan(start=MONDAY.replace(tzinfo=None), end=TUESDAY), None, RN_RULES)
    assert naive.value.field == "start"


def test_a_replaced_shift_keeps_its_swap_request(roster: MemoryRoster) -> None:
    roster.shifts["s1"]["swapRequest"] = {"status": "requested"}
    rec = shift_record(
        roster, ShiftPlan(start=TUESDAY, end=TUESDAY + timedelta(hours=1)), roster.shifts["s1"]
    )
    assert rec.content["swapRequest"] == {"status": "requested"} and rec.key_value == "S-s1"


def test_only_the_owner_or_a_scheduler_asks(roster: MemoryRoster) -> None:
    with pytest.raises(RecordNotFound):
        swap_request(roster, "nope", "ann", "bob", ANN, BEFORE, RN_RULES)
    bob = SwapCaller("bob-login", own_ids=frozenset({"bob"}))
    for caller, asked_by in ((bob, "bob"), (bob, "ann"), (ANN, "bob"), (OTHER_SCHEDULER, "ann")):
        with pytest.raises(NotPermitted) as err:
            swap_request(roster, "s1", asked_by, "bob", caller, BEFORE, RN_RULES)
        assert err.value.code == "swap.not_owner"
    rec = swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, RN_RULES)
    assert rec.content["swapRequest"]["status"] == "requested"
    assert rec.content["practitioner"] == {"reference": "Practitioner/ann"}  # until it is approved
    assert swap_request(roster, "s1", "ann", "bob", SCHEDULER, BEFORE, RN_RULES).content["swapRequest"]


def test_only_future_shifts_and_qualified_takers(roster: MemoryRoster) -> None:
    with pytest.raises(RuleBroken) as err:
        swap_request(roster, "s1", "ann", "bob", ANN, TUESDAY + timedelta(hours=1), RN_RULES)
    assert err.value.code == "swap.shift_not_future"
    with pytest.raises(RuleBroken) as err:
        swap_request(roster, "s1", "ann", "lpn", ANN, BEFORE, RN_RULES)
    assert (err.value.code, err.value.field) == ("shift.role_not_held", "replacement")
    with pytest.raises(RuleBroken) as err:
        swap_request(roster, "s1", "ann", "eve", ANN, BEFORE, RN_RULES)
    assert (err.value.code, err.value.field) == ("shift.unknown_employee", "replacement")
    roster.shifts["s3"] = stored_shift("s3", "bob", TUESDAY + timedelta(hours=10))
    with pytest.raises(RuleBroken) as err:
        swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, RN_RULES)
    assert err.value.code == "shift.overlap"


def test_the_decision_is_a_department_schedulers_and_records_the_caller(roster: MemoryRoster) -> None:
    with pytest.raises(StateConflict):
        swap_decision(roster, "s1", True, SCHEDULER, BEFORE, RN_RULES)
    roster.shifts["s1"] = swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, RN_RULES).content | {
        "id": "s1"
    }
    for caller in (ANN, OTHER_SCHEDULER):
        with pytest.raises(NotPermitted) as err:
            swap_decision(roster, "s1", True, caller, BEFORE, RN_RULES)
        assert err.value.code == "swap.not_department_scheduler"
    with pytest.raises(RuleBroken) as late:
        swap_decision(roster, "s1", True, SCHEDULER, TUESDAY, RN_RULES)
    assert late.value.code == "swap.shift_not_future"
    rec = swap_decision(roster, "s1", True, SCHEDULER, BEFORE, RN_RULES)
    swap = rec.content["swapRequest"]
    assert (
        rec.content["practitioner"] == {"reference": "Practitioner/bob"}
        and rec.content["status"] == "swapped"
    )
    assert (swap["status"], swap["decidedBy"]) == ("approved", "sam")
    assert swap["payrollFlag"] == {"hoursMoved": 12.0, "from": "Practitioner/ann"}
    rejected = swap_decision(roster, "s1", False, SCHEDULER, BEFORE, RN_RULES)
    assert rejected.content["practitioner"] == {"reference": "Practitioner/ann"}
    assert "payrollFlag" not in rejected.content["swapRequest"]


def test_a_replacement_no_longer_qualified_is_not_approved(roster: MemoryRoster) -> None:
    roster.shifts["s1"] = swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, RN_RULES).content | {
        "id": "s1"
    }
    roster.employees["bob"] = nurse("bob", active=False)
    with pytest.raises(RuleBroken) as err:
        swap_decision(roster, "s1", True, SCHEDULER, BEFORE, RN_RULES)
    assert (err.value.code, err.value.field) == ("shift.employee_inactive", "replacement")


def test_qualified_peers_may_be_approved_at_once(roster: MemoryRoster) -> None:
    auto = RN_RULES.model_copy(update={"swaps": SwapSettings(auto_approve_qualified_peers=True)})
    rec = swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, auto)
    assert (
        rec.content["swapRequest"]["status"] == "approved"
        and rec.content["swapRequest"]["decidedBy"] == "auto"
    )
    assert rec.content["practitioner"] == {"reference": "Practitioner/bob"}
    # without the setting it waits
    assert (
        swap_request(roster, "s1", "ann", "bob", ANN, BEFORE, WorkforceSettings()).content["swapRequest"][
            "status"
        ]
        == "requested"
    )
