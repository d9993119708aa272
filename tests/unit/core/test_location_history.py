"""Encounter.location keeps its history when a message updates a stored encounter
(core.records.merge_location_history, used by the store's merge mode)."""

from __future__ import annotations

from hms_ach.core.records import merge_content, merge_location_history


def _loc(ref: str, status: str, **period: str) -> dict[str, object]:
    item: dict[str, object] = {"location": {"reference": ref}, "status": status}
    if period:
        item["period"] = dict(period)
    return item


def test_a_transfer_completes_the_bed_left_and_keeps_when_each_stay_began() -> None:
    old = [_loc("Location/a", "active", start="08:00")]
    new = [_loc("Location/b", "active", start="10:00"), _loc("Location/a", "completed", end="10:00")]
    assert merge_location_history(old, new) == [
        _loc("Location/b", "active", start="10:00"),
        _loc("Location/a", "completed", start="08:00", end="10:00"),
    ]


def test_a_place_not_named_again_is_completed_when_the_new_one_began() -> None:
    old = [
        _loc("Location/b", "active", start="10:00"),
        _loc("Location/a", "completed", start="08:00", end="10:00"),
    ]
    new = [_loc("Location/c", "active", start="12:00")]
    assert merge_location_history(old, new) == [
        _loc("Location/c", "active", start="12:00"),
        _loc("Location/b", "completed", start="10:00", end="12:00"),
        _loc("Location/a", "completed", start="08:00", end="10:00"),
    ]


def test_the_same_place_again_keeps_its_start_and_a_reopened_one_loses_its_end() -> None:
    old = [_loc("Location/a", "completed", start="08:00", end="15:00")]
    new = [_loc("Location/a", "active", start="15:30")]
    assert merge_location_history(old, new) == [_loc("Location/a", "active", start="08:00")]


def test_a_cancelled_plan_leaves_no_trace_and_other_plans_stay() -> None:
    old = [
        _loc("Location/a", "active", start="08:00"),
        _loc("Location/p", "planned"),
        _loc("Location/q", "planned"),
    ]
    new = [_loc("Location/a", "active", start="09:00"), _loc("Location/p", "cancelled")]
    assert merge_location_history(old, new) == [
        _loc("Location/a", "active", start="08:00"),
        _loc("Location/q", "planned"),
    ]


def test_only_the_history_merge_keeps_history_other_lists_still_replace() -> None:
    old = {"location": [_loc("Location/a", "active")], "identifier": [{"value": "1"}]}
    new = {"location": [_loc("Location/b", "active")], "identifier": [{"value": "2"}]}
    assert merge_content(old, new)["location"] == [_loc("Location/b", "active")]
    merged = merge_content(old, new, history=True)
    assert [i["status"] for i in merged["location"]] == ["active", "completed"]
    assert merged["identifier"] == [{"value": "2"}]
    # a PractitionerRole.location (plain references) is not a history
    roles = merge_content(
        {"location": [{"reference": "Location/a"}]}, {"location": [{"reference": "Location/b"}]}, history=True
    )
    assert roles["location"] == [{"reference": "Location/b"}]
