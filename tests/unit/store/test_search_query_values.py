"""Date search values and result parameters of hms_ach/store/search_query.py (issue 15)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hms_ach.store.search_query import SearchError, date_value, parse_query


def test_ap_widens_the_range_by_a_tenth_of_its_distance_from_now() -> None:
    prefix, lo, hi = date_value("ap2016-12-06", "date")
    assert prefix == "ap"
    day = datetime(2016, 12, 6, tzinfo=UTC)
    margin = (datetime.now(UTC) - day) * 0.1
    assert abs((day - lo) - margin) < timedelta(minutes=1)
    assert abs((hi - (day + timedelta(days=1))) - margin) < timedelta(minutes=1)
    # near now the margin is at least a day
    _p, lo, hi = date_value(f"ap{datetime.now(UTC).date().isoformat()}", "date")
    assert hi - lo >= timedelta(days=3)


@pytest.mark.parametrize("value", ["now", "today", "no2020", "xx2020"])
def test_a_word_is_not_a_date_prefix(value: str) -> None:
    with pytest.raises(SearchError) as caught:
        date_value(value, "birthdate")
    assert "is not a date search value" in caught.value.diagnostics
    assert "prefix 'no'" not in caught.value.diagnostics


def test_missing_is_accepted_on_every_parameter_type() -> None:
    query = parse_query(
        "Practitioner",
        [
            ("_id:missing", "false"),
            ("_lastUpdated:missing", "false"),
            ("qualification-period:missing", "true"),
        ],
    )
    assert [c.modifier for c in query.criteria] == ["missing"] * 3


def test_summary_and_elements_are_parsed() -> None:
    query = parse_query("Patient", [("_summary", "true"), ("_elements", "Patient.name,gender")])
    assert query.summary == "true" and query.elements == ["name", "gender"]
    assert ("_summary", "true") in query.understood
    with pytest.raises(SearchError):
        parse_query("Patient", [("_summary", "some")])
    with pytest.raises(SearchError):
        parse_query("Patient", [("_elements", "a b")])
