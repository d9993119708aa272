"""The entries of a case's audit log from its versions, and its PDF (read back with pypdf)."""

from __future__ import annotations

import io

from pypdf import PdfReader

from hms_ach.cases.audit_log import AuditLog, Entry, actor_of, record_change, render_pdf, task_change
from hms_ach.store.audit import actor_json


def _task(state: str, owner: str | None = None, **extra: object) -> dict[str, object]:
    task: dict[str, object] = {
        "status": "ready",
        "businessStatus": {"coding": [{"system": "urn:hms-ach:code:case-state", "code": state}]},
        **extra,
    }
    if owner:
        task["owner"] = {"reference": owner}
    return task


def test_task_versions_become_actions_with_codes_only() -> None:
    first = _task("triage", "Practitioner/a")
    assert task_change(None, first) == ("created", "triage, assigned to Practitioner/a")
    assert task_change(first, _task("in-review", "Practitioner/a")) == (
        "state-changed",
        "triage -> in-review",
    )
    assert task_change(first, _task("triage", "Practitioner/b")) == ("assigned", "assigned to Practitioner/b")
    assert task_change(first, _task("triage")) == ("assigned", "unassigned from Practitioner/a")
    out = [{"valueReference": {"reference": "QuestionnaireResponse/q"}}]
    assert task_change(first, _task("triage", "Practitioner/a", output=out)) == (
        "findings",
        "output QuestionnaireResponse/q",
    )
    noted = _task("triage", "Practitioner/a", note=[{"text": "the patient's name"}])
    assert task_change(first, noted) == ("commented", "note 1 added")  # never the note's text
    assert task_change(first, {**first, "priority": "stat"}) == ("updated", "changed: priority")


def test_other_records_of_the_case() -> None:
    sig = {
        "url": "urn:hms-ach:fhir:StructureDefinition/signature",
        "valueReference": {"reference": "Provenance/p"},
    }
    qr = {"status": "completed"}
    assert record_change("QuestionnaireResponse", None, qr) == ("findings", "status completed")
    assert record_change("QuestionnaireResponse", qr, {**qr, "extension": [sig]}) == (
        "signed",
        "signature Provenance/p",
    )
    reply = {"partOf": [{"reference": "Communication/c1"}], "payload": [{"contentString": "text"}]}
    assert record_change("Communication", None, reply) == ("commented", "reply to Communication/c1")
    prov = {
        "agent": [{"who": {"reference": "Practitioner/a"}}],
        "target": [{"reference": "QuestionnaireResponse/q"}],
    }
    assert record_change("Provenance", None, prov) == (
        "signed",
        "Practitioner/a signed QuestionnaireResponse/q",
    )


def test_the_actor_is_the_callers_sub_or_the_job_or_the_channel() -> None:
    assert actor_of("api", actor_json(kind="http", sub="sup-1")) == "sup-1"
    assert actor_of("system", actor_json(kind="system", job="case_sla")) == "job:case_sla"
    assert actor_of("adt_in", None) == "adt_in"
    assert actor_of("adt_in", "not json") == "adt_in"


def test_the_pdf_holds_the_entries_in_order() -> None:
    entries = [
        Entry(
            "2026-12-01T10:00:00.000000Z",
            "sup-1",
            "created",
            "Task/t",
            1,
            "triage, assigned to Practitioner/a",
        ),
        Entry("2026-12-01T11:00:00.000000Z", "rev-1", "state-changed", "Task/t", 2, "triage -> in-review"),
        Entry("2026-12-01T12:00:00.000000Z", "aud-\u2603", "read", "Task/t", None, "read /x -> 200"),
    ]
    log = AuditLog("Task/t", "REV-1", entries, {"intact": True, "summary": "change trail intact: 3 entries"})
    text = PdfReader(io.BytesIO(render_pdf(log, "2026-12-06T00:00:00Z"))).pages[0].extract_text()
    assert "Audit log of case REV-1 (Task/t)" in text and "intact" in text
    places = [text.find(e.detail) for e in entries]
    assert -1 not in places and places == sorted(places)
    assert "aud-?" in text  # outside Latin-1: replaced, not an error


def test_a_detail_longer_than_a_line_wraps() -> None:
    detail = "changed: " + ", ".join(f"element{i}" for i in range(60))
    log = AuditLog("Task/t", None, [Entry("2026-12-01T10:00:00Z", "a", "updated", "Task/t", 2, detail)], {})
    text = PdfReader(io.BytesIO(render_pdf(log, "now"))).pages[0].extract_text()
    assert "element0," in text and "element59" in text and "NOT intact" in text
