"""Whether a case owner hands their cases back, from plain facts (their role, activity, shifts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hms_ach.cases.assignment import Candidate
from hms_ach.cases.handback import leaving
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=30)


@pytest.fixture(scope="module")
def review() -> Workflow:
    return workflows(load_mappings(ROOT / "mappings"))["clinical-review"]


def _shift(start_hours: float, end_hours: float) -> tuple[datetime, datetime]:
    return NOW + timedelta(hours=start_hours), NOW + timedelta(hours=end_hours)


def test_who_hands_back(review: Workflow) -> None:
    holders = {
        "on": Candidate("on", shifts=(_shift(-2, 6),)),
        "just-ended": Candidate("just-ended", shifts=(_shift(-8, -0.25),)),  # within the grace
        "ended": Candidate("ended", shifts=(_shift(-9, -1),)),
        "none": Candidate("none"),
        "inactive": Candidate("inactive", active=False, shifts=(_shift(-2, 6),)),
    }
    assert leaving("on", holders, review, NOW, GRACE) is None
    assert leaving("just-ended", holders, review, NOW, GRACE) is None
    assert leaving("ended", holders, review, NOW, GRACE) == "off-shift"
    assert leaving("none", holders, review, NOW, GRACE) == "off-shift"
    assert leaving("inactive", holders, review, NOW, GRACE) == "offboarded"
    assert leaving("gone", holders, review, NOW, GRACE) == "role-ended"
    assert leaving("ended", holders, review, NOW, timedelta(hours=2)) is None  # a longer grace
