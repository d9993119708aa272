"""When a case is late, from plain facts: its due time, the breach already recorded, the settings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hms_ach.cases.sla import BREACHED_EXT, CaseTimerSettings, breach, moment, recorded_breach
from hms_ach.cases.transitions import DUE_EXT
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def review() -> Workflow:
    return workflows(load_mappings(ROOT / "mappings"))["clinical-review"]


def _case(
    wf: Workflow, state: str, due: str | None, breached: tuple[str, str] | None = None
) -> dict[str, object]:
    extensions: list[dict[str, object]] = []
    if due is not None:
        extensions.append({"url": DUE_EXT, "valueDateTime": due})
    if breached is not None:
        parts = [{"url": "state", "valueCode": breached[0]}, {"url": "due", "valueDateTime": breached[1]}]
        extensions.append({"url": BREACHED_EXT, "extension": parts})
    return {"code": wf.code(), "businessStatus": wf.business_status(state), "extension": extensions}


def test_a_case_past_its_due_time_is_late_once_per_entry_into_the_state(review: Workflow) -> None:
    assert breach(_case(review, "in-review", "2026-12-06T11:59:00Z"), review, NOW) == (
        "in-review",
        "2026-12-06T11:59:00Z",
    )
    assert breach(_case(review, "in-review", "2026-12-06T12:00:01Z"), review, NOW) is None  # not yet
    assert breach(_case(review, "escalated", None), review, NOW) is None  # no timer
    recorded = ("in-review", "2026-12-06T11:59:00Z")
    assert breach(_case(review, "in-review", "2026-12-06T11:59:00Z", recorded), review, NOW) is None
    # in the state again (a new due time): late again; the same due time in another state too
    assert breach(_case(review, "in-review", "2026-12-06T11:00:00Z", recorded), review, NOW) is not None
    assert breach(_case(review, "triage", "2026-12-06T11:59:00Z", recorded), review, NOW) is not None


def test_a_due_time_written_over_fhir_may_be_anything(review: Workflow) -> None:
    assert breach(_case(review, "in-review", "soon"), review, NOW) is None
    assert breach(_case(review, "in-review", "2026-12-06"), review, NOW) is None  # a date: no instant
    assert moment("2026-12-06T11:00:00") == datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
    assert moment(None) is None
    assert recorded_breach({}) == (None, None)


def test_the_job_runs_every_minute_unless_given_a_cron() -> None:
    assert CaseTimerSettings().interval_seconds == 60
    by_cron = CaseTimerSettings.model_validate({"cron": "*/5 * * * *"})
    assert (by_cron.cron, by_cron.interval_seconds) == ("*/5 * * * *", None)
    with pytest.raises(ValueError, match="not both"):
        CaseTimerSettings.model_validate({"cron": "*/5 * * * *", "interval_seconds": 30})
