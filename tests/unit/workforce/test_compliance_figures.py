"""The compliance figures' gains on their own: departments resolved to Organizations, hours, overtime
cost from the role's rate, the period and department filters, violations and offboardings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hms_ach.workforce import rules
from hms_ach.workforce.compliance import Inputs, Period, compliance, overtime_cost
from hms_ach.workforce.departments import Directory
from hms_ach.workforce.settings import WorkforceSettings

WARD = {
    "id": "o1",
    "identifier": [{"system": "urn:x", "value": "NURS-4W"}],
    "name": "4 West nursing",
    "alias": ["4W"],
}
ER = {"id": "o2", "name": "Emergency", "alias": ["ED"]}
TWIN = {"id": "o3", "name": "Twin", "identifier": [{"value": "T"}]}
TWIN2 = {"id": "o4", "name": "twin ", "identifier": [{"value": "T"}]}


def test_directory_resolves_code_then_name_then_alias() -> None:
    d = Directory([WARD, ER, TWIN, TWIN2])
    assert d.resolve("NURS-4W").organization == "Organization/o1"
    assert d.resolve(" 4 west  NURSING ").key == "4 West nursing"
    assert (d.resolve("ed").organization, d.resolve("ed").resolution) == ("Organization/o2", "alias")
    assert d.resolve("T").resolution == "ambiguous" and d.resolve("T").organization is None
    assert d.resolve("Twin").resolution == "ambiguous"
    assert (d.resolve("Pharmacy").key, d.resolve("Pharmacy").resolution) == ("Pharmacy", "unresolved")
    assert d.resolve(None).key == "(none)"


def card(rid: str, who: str, dept: str, start: datetime, minutes: int, shift: str | None) -> dict[str, Any]:
    tc: dict[str, Any] = {
        "id": rid,
        "practitioner": {"reference": f"Practitioner/{who}"},
        "department": dept,
        "clockIn": rules.iso(start),
        "clockOut": rules.iso(start + timedelta(minutes=minutes)),
        "workedMinutes": minutes,
    }
    if shift:
        tc["shift"] = {"reference": f"Shift/{shift}"}
    return tc


def person(rid: str, dept: str) -> dict[str, Any]:
    return {"id": rid, "active": True, "extension": [{"url": rules.DEPARTMENT_EXT, "valueString": dept}]}


def test_hours_cost_filters_violations_and_offboardings() -> None:
    settings = WorkforceSettings.model_validate({"pay_rates": {"RN": "40.10"}})
    monday = datetime(2026, 11, 30, 7, tzinfo=UTC)
    facts = Inputs(
        staff=[person("p1", "4 West nursing"), person("p2", "4W"), person("p3", "ED")],
        unfilled=[],
        timecards=[
            card("t1", "p1", "NURS-4W", monday, 600, "s1"),  # 2 h overtime, RN rate
            card("t2", "p2", "4 West nursing", monday, 545, None),  # 65 min, no shift: unpriced
            card("t3", "p3", "Emergency", monday + timedelta(days=7), 480, None),
        ],
        alerts=[],
        scan_run=None,
        organizations=[WARD, ER],
        linked_shifts={"Shift/s1": {"id": "s1", "role": {"text": "RN"}}},
        offboardings=[("Practitioner/p2", monday), ("Practitioner/p3", monday + timedelta(days=8))],
        violations=[("shift.too_long", monday), ("shift.too_long", monday), ("timecard.overlap", monday)],
    )
    now = monday + timedelta(days=10)
    every = compliance(facts, now, 30, settings=settings)
    assert sorted(every.departments) == ["4 West nursing", "Emergency"]
    ward = every.departments["4 West nursing"]
    assert ward["organization"] == "Organization/o1" and ward["names"] == ["4 West nursing", "4W", "NURS-4W"]
    assert ward["active_staff"] == 2 and ward["offboarded"] == 1
    assert ward["hours_worked"] == round(1145 / 60, 2) and ward["overtime_hours"] == round(185 / 60, 2)
    assert ward["overtime_hours_unpriced"] == 1.08
    assert ward["overtime_cost"] == 120.30  # 2 h x 40.10 x 1.5
    assert every.totals["hours_worked"] == round(1625 / 60, 2) and every.totals["offboarded"] == 2
    assert every.rule_violations == {"shift.too_long": 2, "timecard.overlap": 1}

    week1 = Period(monday - timedelta(days=1), monday + timedelta(days=6))
    first = compliance(facts, now, 30, week1, settings=settings)
    assert first.departments["Emergency"]["hours_worked"] == 0.0
    assert first.departments["Emergency"]["offboarded"] == 0 and first.totals["offboarded"] == 1
    assert first.rule_violations == {"shift.too_long": 2, "timecard.overlap": 1}
    later = compliance(facts, now, 30, Period(monday + timedelta(days=1)), settings=settings)
    assert later.rule_violations == {} and later.totals["hours_worked"] == 8.0

    by_code = compliance(facts, now, 30, department="NURS-4W", settings=settings)
    by_alias = compliance(facts, now, 30, department="4w", settings=settings)
    assert list(by_code.departments) == ["4 West nursing"] and by_code.totals["active_staff"] == 2
    assert by_alias.departments == by_code.departments
    nowhere = compliance(facts, now, 30, department="Pharmacy", settings=settings)
    assert nowhere.departments == {} and nowhere.totals["active_staff"] == 0
    er = compliance(facts, now, 30, department="ed", settings=settings)
    assert list(er.departments) == ["Emergency"] and er.totals["hours_worked"] == 8.0


def test_overtime_cost_of_a_role() -> None:
    settings = WorkforceSettings.model_validate({"pay_rates": {"MD": 100}, "overtime_pay_multiplier": 2})
    assert overtime_cost(30, "MD", settings) == Decimal(100)
    assert overtime_cost(30, "RN", settings) is None and overtime_cost(30, None, settings) is None
