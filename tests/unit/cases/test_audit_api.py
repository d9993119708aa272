"""The audit-log and analytics routes' request parsing: the PDF choice and the window."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hms_ach.cases.audit_api import wants_pdf, window_of
from hms_ach.workforce.api import Problem

NOW = datetime(2026, 12, 6, 15, tzinfo=UTC)


def test_the_pdf_is_chosen_by_accept() -> None:
    assert wants_pdf("application/pdf")
    assert wants_pdf("text/html, Application/PDF;q=0.9")
    assert not wants_pdf("application/json")
    assert not wants_pdf("application/pdf;q=0")
    assert not wants_pdf("")


def test_the_window() -> None:
    w = window_of("2026-11-01", "2026-11-30", NOW)
    assert (w.start, w.end) == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    w = window_of("2026-11-01T08:00:00+01:00", None, NOW)
    assert (w.start, w.end) == (datetime(2026, 11, 1, 7, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC))
    w = window_of(None, None, NOW)
    assert (w.start, w.end) == (datetime(2026, 11, 7, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC))


@pytest.mark.parametrize(
    ("start", "end", "location"),
    [
        ("11/01/2026", None, "query.startDate"),
        (None, "2026-11-01T00:00:00", "query.endDate"),  # no offset
        ("2026-12-01", "2026-11-01", "query.startDate"),
        ("2024-01-01", "2026-11-01", "query.startDate"),  # longer than 366 days
    ],
)
def test_a_bad_window_is_a_problem_naming_the_parameter(
    start: str | None, end: str | None, location: str
) -> None:
    with pytest.raises(Problem) as caught:
        window_of(start, end, NOW)
    assert caught.value.status == 422 and caught.value.errors[0]["location"] == location
