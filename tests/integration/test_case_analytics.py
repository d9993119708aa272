"""Review analytics (GET /api/v1/analytics/review) over seeded cases with known histories, on SQLite
and PostgreSQL: every figure is asserted exactly (definitions in docs/review-cases.md).

The window is November 2026 (``startDate=2026-11-01&endDate=2026-11-30``, the end day included):

* C1 (Practitioner/a): triage 08:00, in-review 09:00, resolved 12:00 on 11-02;
* C2 (Practitioner/a): triage 11-03 08:00, in-review 10:00, escalated by the SLA timer 11-04 10:00,
  back to in-review 12:00 (a reopen), resolved 14:00;
* C3 (Practitioner/b): triage 11-05 00:00, in-review 00:30, resolved 06:30, reopened 11-06 00:00,
  resolved again 01:00;
* C4 (Practitioner/b): triage 10-31 12:00, in-review 11-01 00:00, escalated 11-10 with the
  case-sla-breached extension, still open;
* C5: all of it on 12-05, outside the window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.cases.analytics import SLA_BREACHED_EXT
from hms_ach.cases.findings import POLICY_VIOLATION_EXT
from hms_ach.cases.transitions import write_case
from hms_ach.cases.workflow import CASE_SYSTEM, workflows
from hms_ach.core.records import RecordWrite
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from tests.integration.engine_helpers import auth_headers, start_engine
from tests.integration.review_writes import write_as

pytestmark = pytest.mark.timeout(240)

#: case -> owner, [(lastModified, state, note)], (findings authored, with a policy violation) or None
SEED: dict[str, tuple[str, list[tuple[str, str, str]], tuple[str, bool] | None]] = {
    "C1": (
        "a",
        [
            ("2026-11-02T08:00:00Z", "triage", ""),
            ("2026-11-02T09:00:00Z", "in-review", "triage -> in-review by Practitioner/a"),
            ("2026-11-02T12:00:00Z", "resolved", "in-review -> resolved by Practitioner/a"),
        ],
        ("2026-11-02T11:00:00Z", False),
    ),
    "C2": (
        "a",
        [
            ("2026-11-03T08:00:00Z", "triage", ""),
            ("2026-11-03T10:00:00Z", "in-review", "triage -> in-review by Practitioner/a"),
            ("2026-11-04T10:00:00Z", "escalated", "in-review -> escalated by hms-ach: sla"),
            ("2026-11-04T12:00:00Z", "in-review", "escalated -> in-review by Practitioner/s"),
            ("2026-11-04T14:00:00Z", "resolved", "in-review -> resolved by Practitioner/a"),
        ],
        ("2026-11-04T13:00:00Z", True),
    ),
    "C3": (
        "b",
        [
            ("2026-11-05T00:00:00Z", "triage", ""),
            ("2026-11-05T00:30:00Z", "in-review", "triage -> in-review by Practitioner/b"),
            ("2026-11-05T06:30:00Z", "resolved", "in-review -> resolved by Practitioner/b"),
            ("2026-11-06T00:00:00Z", "in-review", "reopened over FHIR"),
            ("2026-11-06T01:00:00Z", "resolved", "in-review -> resolved by Practitioner/b"),
        ],
        ("2026-11-05T06:00:00Z", False),
    ),
    "C4": (
        "b",
        [
            ("2026-10-31T12:00:00Z", "triage", ""),
            ("2026-11-01T00:00:00Z", "in-review", "triage -> in-review by Practitioner/b"),
            ("2026-11-10T00:00:00Z", "escalated", "in-review -> escalated by hms-ach: sla"),
        ],
        None,
    ),
    "C5": (
        "a",
        [
            ("2026-12-05T00:00:00Z", "triage", ""),
            ("2026-12-05T01:00:00Z", "in-review", "triage -> in-review by Practitioner/a"),
            ("2026-12-05T02:00:00Z", "resolved", "in-review -> resolved by Practitioner/a"),
        ],
        ("2026-12-05T01:30:00Z", True),
    ),
}


async def _seed(engine: Engine) -> None:
    wf = workflows(engine.pipeline.engine.mset)["clinical-review"]
    states = {s.name: s for s in wf.spec.states}

    def work(tx: Tx, message_id: int) -> None:
        for case_id, (owner, steps, findings) in SEED.items():
            authored = steps[0][0]
            notes: list[dict[str, Any]] = []
            output: list[dict[str, Any]] = []
            for n, (at, state, note) in enumerate(steps):
                if note:
                    notes = [*notes, {"time": at, "text": note}]
                task: dict[str, Any] = {
                    "identifier": [{"system": CASE_SYSTEM, "value": case_id}],
                    "status": states[state].status,
                    "businessStatus": wf.business_status(state),
                    "intent": "order",
                    "priority": "routine",
                    "code": wf.code(),
                    "authoredOn": authored,
                    "lastModified": at,
                    "owner": {"reference": f"Practitioner/{owner}"},
                    "note": notes,
                }
                if case_id == "C4" and state == "escalated":
                    task["extension"] = [{"url": SLA_BREACHED_EXT, "valueDateTime": at}]
                if findings is not None and n == len(steps) - 1:
                    authored_at, violation = findings
                    link: dict[str, Any] = {
                        "type": {"text": "findings"},
                        "valueReference": {"reference": _qr(tx, case_id, authored_at, message_id)},
                    }
                    if violation:  # as the findings code marks an error policy broken when submitted
                        link["extension"] = [{"url": POLICY_VIOLATION_EXT, "valueCode": "signature-required"}]
                    output = [link]
                if output:
                    task["output"] = output
                write_case(tx, task, message_id)

    await write_as(engine, "seed", "seed_cases", work)


def _qr(tx: Tx, case_id: str, authored: str, message_id: int) -> str:
    content: dict[str, Any] = {
        "identifier": {"system": "urn:test:findings", "value": case_id},
        "status": "completed",
        "authored": authored,
    }
    out = Repository(tx).upsert(
        RecordWrite("findings", "QuestionnaireResponse", "urn:test:findings", case_id, content),
        content,
        message_id,
    )
    assert out is not None
    return out.reference


async def test_the_figures_of_a_window_are_exact(tmp_path: Path, store: Store) -> None:
    engine = await start_engine(tmp_path, store, "  - name: fhir_in\n    type: fhir_rest\n")
    try:
        await _seed(engine)
        supervisor = auth_headers(engine, roles=("supervisor",))
        window = {"startDate": "2026-11-01", "endDate": "2026-11-30"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            r = await http.get("/api/v1/analytics/review", params=window, headers=supervisor)
            assert r.status_code == 200, r.text
            figures = r.json()
            assert figures["window"] == {
                "start": "2026-11-01T00:00:00+00:00",
                "end": "2026-12-01T00:00:00+00:00",
            }
            assert figures["percentile"] == "nearest-rank"
            assert figures["cases"] == 4  # C1-C4 have a version in November; C5 not
            assert figures["throughput"] == {
                "resolved": 3,
                "per_reviewer": [
                    {"reviewer": "Practitioner/a", "resolved": 2},
                    {"reviewer": "Practitioner/b", "resolved": 1},
                ],
            }
            # C1 4 h, C3 25 h (to its last resolution), C2 30 h
            assert figures["time_per_case"] == {
                "count": 3,
                "median_seconds": 90000.0,
                "p90_seconds": 108000.0,
            }
            assert figures["time_per_state"] == {
                # C3 30 min, C1 1 h, C2 2 h, C4 12 h
                "triage": {"count": 4, "median_seconds": 3600.0, "p90_seconds": 43200.0},
                # 1 h, 2 h, 3 h, 6 h, 24 h, 9 days
                "in-review": {"count": 6, "median_seconds": 10800.0, "p90_seconds": 777600.0},
                "escalated": {"count": 1, "median_seconds": 7200.0, "p90_seconds": 7200.0},
                "resolved": {"count": 1, "median_seconds": 63000.0, "p90_seconds": 63000.0},
            }
            assert figures["sla_breaches"] == {"count": 2, "cases": 2}  # C2 by the timer, C4 by its extension
            assert figures["policy_violations"] == {"findings": 3, "with_violations": 1, "rate": 1 / 3}
            assert figures["reopen"] == {"cases": 4, "reopened": 2, "rate": 0.5}  # C2 and C3

            # one case type: the same cases; the auditor may read them too
            auditor = auth_headers(engine, roles=("auditor",))
            r = await http.get(
                "/api/v1/analytics/review", params={**window, "case_type": "clinical-review"}, headers=auditor
            )
            assert r.status_code == 200 and r.json()["throughput"] == figures["throughput"]
            r = await http.get(
                "/api/v1/analytics/review", params={**window, "case_type": "complaint"}, headers=auditor
            )
            assert r.json()["cases"] == 0 and r.json()["time_per_case"]["median_seconds"] is None

            # errors: a bad date names its parameter; a reviewer may not read the analytics
            r = await http.get(
                "/api/v1/analytics/review", params={"startDate": "11/01/2026"}, headers=supervisor
            )
            assert r.status_code == 422 and r.json()["errors"][0]["location"] == "query.startDate"
            r = await http.get(
                "/api/v1/analytics/review",
                params={"startDate": "2026-12-01", "endDate": "2026-11-01"},
                headers=supervisor,
            )
            assert r.status_code == 422
            reviewer = auth_headers(engine, roles=("reviewer",), employee_id="a")
            assert (await http.get("/api/v1/analytics/review", headers=reviewer)).status_code == 403
    finally:
        await engine.stop()
