"""One review case through its workflow over /api/v1, on SQLite and PostgreSQL (issue 18, phase 2).

The assigned reviewer takes the case (triage -> in-review) and escalates it; a supervisor takes it
back (escalated -> in-review). Moves the workflow has not (409, with the allowed states) and moves
the caller's role may not make (403) change nothing; a stale ``If-Match`` is refused (412). The
case's history lists the states with who moved it. Comments are Communications about the Task,
threaded by ``partOf``, found by fhirpy with ``Communication?about=Task/x``; ``case.commented``
reaches a webhook without the comment's text. The shipped forms are served as Questionnaires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpy import AsyncFHIRClient

from hms_ach.cases.forms import publish_forms
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import resources
from hms_ach.store.db import Store
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers
from tests.integration.outbound_helpers import Receiver, wait_for
from tests.integration.test_review_cases import _engine, _reviewer, add_reviewer

pytestmark = pytest.mark.timeout(240)


def _states(case: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["state"], h["status"]) for h in case["history"]]


async def test_a_case_moves_through_its_workflow_and_gathers_comments(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    engine = await _engine(tmp_path, store, await receiver.start())
    try:
        base = f"http://127.0.0.1:{engine.http_port}"
        admin = auth_headers(engine)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            now = datetime.now(UTC)
            mine = await add_reviewer(
                http, admin, "F1", now.date() + timedelta(days=365), now - timedelta(hours=1)
            )
            stranger = str(
                (
                    await http.post(
                        "/fhir/Practitioner",
                        json=_reviewer("F2", datetime.now(UTC).date()),
                        headers={**admin, **FHIR_JSON},
                    )
                ).json()["id"]
            )
            supervisor = auth_headers(engine, roles=("supervisor",), sub="sup-1")
            reviewer = auth_headers(engine, roles=("reviewer",), employee_id=mine, sub="rev-1")
            other = auth_headers(engine, roles=("reviewer",), employee_id=stranger, sub="rev-2")
            body = {"case_type": "clinical-review", "case_id": "FLOW-1", "focus": "Encounter/e1"}
            r = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert r.status_code == 201, r.text
            case = r.json()
            cid = case["id"]
            assert case["assignee"] == mine and case["state"] == "triage"

            # the case view: the assigned reviewer reads it; another reviewer may not
            r = await http.get(f"/api/v1/review/cases/{cid}", headers=reviewer)
            assert r.status_code == 200, r.text
            assert _states(r.json()) == [("triage", "ready")] and r.headers["etag"] == 'W/"1"'
            r = await http.get(f"/api/v1/review/cases/{cid}", headers=other)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
            assert (await http.get("/api/v1/review/cases/nope", headers=supervisor)).status_code == 404

            async def move(to: str, headers: dict[str, str], **extra: Any) -> httpx.Response:
                return await http.post(
                    f"/api/v1/review/{cid}/transitions",
                    json={"to": to, **extra.pop("body", {})},
                    headers={**headers, **extra},
                )

            # the reviewer takes it and escalates it
            r = await move("in-review", reviewer)
            assert r.status_code == 200, r.text
            assert (r.json()["state"], r.json()["status"]) == ("in-review", "in-progress")
            r = await move("escalated", reviewer, body={"reason": "policy-failed"})
            assert r.status_code == 200 and r.json()["status"] == "on-hold", r.text
            escalated_version = r.json()["version"]

            # refused: taking it back needs a supervisor; triage is no move from escalated
            r = await move("in-review", reviewer)
            assert r.status_code == 403, r.text
            assert "supervisor" in r.json()["detail"]
            r = await move("triage", supervisor)
            assert r.status_code == 409, r.text
            assert r.json()["errors"] == [
                {"location": "body.to", "detail": "expected one of cancelled, in-review, resolved"}
            ]
            r = await move("in-review", other)
            assert r.status_code == 403  # not their case
            # a stale version is refused, the current one moves it
            r = await move("in-review", supervisor, **{"if-match": 'W/"1"'})
            assert r.status_code == 412, r.text
            r = await move("in-review", supervisor, **{"if-match": "bogus"})
            assert r.status_code == 400
            r = await move("in-review", supervisor, **{"if-match": f'W/"{escalated_version}"'})
            assert r.status_code == 200 and r.json()["state"] == "in-review", r.text

            r = await http.get(f"/api/v1/review/cases/{cid}", headers=supervisor)
            view = r.json()
            assert _states(view) == [
                ("triage", "ready"),
                ("in-review", "in-progress"),
                ("escalated", "on-hold"),
                ("in-review", "in-progress"),
            ]
            assert [h["by"] for h in view["history"]][1:] == ["rev-1", "rev-1", "sup-1"]
            assert view["version"] == escalated_version + 1

            # comments: a thread of two and a second thread
            url = f"/api/v1/review/{cid}/comments"
            r = await http.post(url, json={"text": "Documentation looks thin"}, headers=reviewer)
            assert r.status_code == 201, r.text
            first = r.json()
            assert first["sender"] == f"Practitioner/{mine}" and first["reply_to"] is None
            r = await http.post(
                url, json={"text": "Ask ward 4 for the notes", "reply_to": first["id"]}, headers=supervisor
            )
            assert r.status_code == 201, r.text
            reply = r.json()
            assert reply["sender"] is None and reply["reply_to"] == first["id"]
            r = await http.post(url, json={"text": "Second look at the labs"}, headers=reviewer)
            assert r.status_code == 201, r.text
            second = r.json()
            r = await http.post(url, json={"text": "x", "reply_to": "nope"}, headers=reviewer)
            assert r.status_code == 422 and r.json()["errors"][0]["location"] == "body.reply_to"
            assert (await http.post(url, json={"text": "x"}, headers=other)).status_code == 403
            r = await http.get(url, headers=reviewer)
            assert r.status_code == 200, r.text
            thread = [(c["id"], c["depth"], c["text"]) for c in r.json()["items"]]
            assert thread == [
                (first["id"], 0, "Documentation looks thin"),
                (reply["id"], 1, "Ask ward 4 for the notes"),
                (second["id"], 0, "Second look at the labs"),
            ]

        # the events: the moves and the comments, signed; a comment's event carries no text
        await wait_for(lambda: receiver.names().count("case.commented") >= 3, timeout=60)
        assert receiver.bad_signatures == 0
        names = receiver.names()
        assert names.count("case.status_changed") == 3 and names.count("case.escalated") == 1
        commented = [e["data"] for e in receiver.events if e["event"] == "case.commented"]
        commented[1].pop("version", None)  # the webhook's payload schema version
        assert commented[1] == {
            "resource": f"Communication/{reply['id']}",
            "versionId": 1,
            "case": f"Task/{cid}",
            "caseType": "clinical-review",
            "replyTo": f"Communication/{first['id']}",
            "sender": None,
        }
        assert "ward 4" not in str(receiver.events)

        # over FHIR: the comments about the Task, and the shipped forms
        client = AsyncFHIRClient(
            f"{base}/fhir",
            authorization=admin["authorization"],
            extra_headers={"Accept": "application/fhir+json"},
        )
        found = await client.resources("Communication").search(about=f"Task/{cid}").fetch_all()
        assert sorted(c["id"] for c in found) == sorted([first["id"], reply["id"], second["id"]])
        replies = (
            await client.resources("Communication")
            .search(**{"part-of": f"Communication/{first['id']}"})
            .fetch()
        )
        assert [c["id"] for c in replies] == [reply["id"]]
        form = await client.reference("Questionnaire", "clinical-review-findings").to_resource()
        assert [i["linkId"] for i in form["item"]] == ["outcome", "score", "comment", "physician-attestation"]
        assert form["meta"]["versionId"] == "1"
    finally:
        await engine.stop()
        await receiver.stop()


async def test_forms_are_published_once_for_the_same_content(tmp_path: Path, store: Store) -> None:
    """A second engine on the same store (a restart), and a reload, write no new form version."""
    for attempt in range(2):
        receiver = Receiver()
        engine = await _engine(tmp_path / str(attempt), store, await receiver.start())
        try:
            assert engine.reload_mappings()  # the same forms again: nothing written
            admin = auth_headers(engine)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
                for form_id in ("clinical-review-findings", "complaint-resolution"):
                    r = await http.get(f"/fhir/Questionnaire/{form_id}/_history", headers=admin)
                    assert r.status_code == 200, r.text
                    assert r.json()["total"] == 1
            if attempt == 1:  # a changed form is published again at the next reload
                form = tmp_path / "1" / "mappings" / "workflows" / "forms" / "complaint-resolution.json"
                form.write_text(form.read_text().replace('"version": "1"', '"version": "2"'))
                assert engine.reload_mappings()

                def version() -> int:
                    found = resources.read(store, "Questionnaire", "complaint-resolution")
                    return found.version if found is not None else 0

                await wait_for(lambda: version() == 2)
        finally:
            await engine.stop()
            await receiver.stop()


def test_forms_are_published_under_their_ids_once(store: Store) -> None:
    forms = {k: f.model for k, f in load_mappings(ROOT / "mappings").forms.items()}
    with store.transaction() as tx:
        assert publish_forms(tx, forms) == [
            "Questionnaire/clinical-review-findings",
            "Questionnaire/complaint-resolution",
        ]
    with store.transaction() as tx:
        assert publish_forms(tx, forms) == []  # the same content: no new version
    changed = {**forms, "complaint-resolution": {**forms["complaint-resolution"], "version": "2"}}
    with store.transaction() as tx:
        assert publish_forms(tx, changed) == ["Questionnaire/complaint-resolution"]
