"""SLA timers and hand-back of review cases (issue 18), on SQLite and PostgreSQL, through a running
engine and its scheduler's ``case_timers`` job.

* A case left in ``in-review`` past its SLA is escalated exactly once: one ``case.sla_breached`` and
  one ``case.escalated`` at a signed webhook receiver and in the outbox, also after the engine is
  stopped and a new one runs the job again on the same store; a queued case late in ``triage`` is
  escalated once too (``triage -> escalated``, the supervisors' queue). The supervisor
  (holder of the ``supervisor`` PractitionerRole) gets one mail per event at a real SMTP server.
* An offboarded reviewer's case goes to the other qualified reviewer; when that one leaves too and
  nobody qualifies it is queued, and it is given to a reviewer as soon as they come on shift. A
  supervisor assigns it to a named reviewer (who must qualify) or has the engine choose again. When
  that reviewer's shift ended more than the grace ago, the case goes back to the queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.cases.open_cases import CaseChanged, write_next
from hms_ach.cases.sla import BREACHED_EXT, CaseTimerJob, CaseTimerSettings, recorded_breach
from hms_ach.cases.transitions import DUE_EXT, move, write_case
from hms_ach.cases.workflow import state_of, workflows
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.outbound import events
from hms_ach.store import audit, outbox
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.workforce.rules import CREDENTIAL_SYSTEM, iso
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers, basic_shift, nurse, start_engine
from tests.integration.notify_helpers import SmtpServer
from tests.integration.outbound_helpers import SECRET, Receiver, wait_for

pytestmark = pytest.mark.timeout(240)

SUPERVISOR_MAIL = "night.supervisor@hospital.test"
QUIET = "breached=0, escalated=0, handed_back=0, assigned=0, queued=0"


def _config(hook: str, smtp_port: int) -> str:
    """fhir_rest, a webhook sink for case.*, a notify sink (plain SMTP on loopback) and the job run by
    the tests only (a yearly cron)."""
    return (
        "  - name: fhir_in\n    type: fhir_rest\n"
        "sinks:\n"
        f"  - name: review_hook\n    type: webhook\n    url: {hook}\n    secret: {SECRET}\n"
        "    events: ['case.*']\n"
        "  - name: people\n    type: notify\n    channel: email\n"
        f"    smtp_host: 127.0.0.1\n    smtp_port: {smtp_port}\n    smtp_security: none\n"
        "    from_address: review@hospital.test\n    events: [case.sla_breached, case.escalated]\n"
        "    retry_initial_seconds: 0.05\n"
        "jobs:\n  case_timers:\n    cron: '0 2 1 1 *'  # run by the test\n    handback_grace_minutes: 30\n"
    )


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


async def _create(api: httpx.AsyncClient, body: dict[str, Any]) -> str:
    r = await api.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _staff(
    api: httpx.AsyncClient, number: str, role: str, on_shift: bool, mail: str | None = None
) -> str:
    """A Practitioner holding ``role`` (a valid MD licence; with ``on_shift`` a shift covering now)."""
    licence = {
        "code": {"coding": [{"system": CREDENTIAL_SYSTEM, "code": "MD"}]},
        "period": {"start": "2020-01-01", "end": (date.today() + timedelta(days=365)).isoformat()},
    }
    extra: dict[str, Any] = {"qualification": [licence]}
    if mail:
        extra["telecom"] = [{"system": "email", "value": mail}]
    pid = await _create(api, nurse(number, family=f"Staff{number}", **extra))
    await _create(
        api,
        {
            "resourceType": "PractitionerRole",
            "active": True,
            "practitioner": {"reference": f"Practitioner/{pid}"},
            "code": [{"coding": [{"system": "urn:hms-ach:code:case-role", "code": role}]}],
        },
    )
    if on_shift:
        await _on_shift(api, pid, f"S-{number}")
    return pid


async def _on_shift(api: httpx.AsyncClient, pid: str, shift_id: str) -> None:
    now = datetime.now(UTC)
    await _create(
        api, basic_shift(shift_id, pid, iso(now - timedelta(hours=2)), iso(now + timedelta(hours=6)))
    )


async def _open_case(api: httpx.AsyncClient, engine: Engine, case_id: str, priority: str) -> dict[str, Any]:
    body = {
        "case_type": "clinical-review",
        "case_id": case_id,
        "focus": "Encounter/enc-1",
        "priority": priority,
    }
    r = await api.post("/api/v1/review/cases", json=body, headers=auth_headers(engine, roles=("supervisor",)))
    assert r.status_code == 201, r.text
    return dict(r.json())


def _task(store: Store, task_id: str) -> dict[str, Any]:
    with store.read() as conn:
        task = wq.get_record(conn, "Task", task_id)
    assert task is not None
    return task


async def _in_the_past(engine: Engine, task_id: str, past: datetime, to_review: bool) -> None:
    """As if the case had entered in-review at ``past`` (through move()), or, staying in triage, had
    been due at ``past``."""
    wf = workflows(engine.mappings)["clinical-review"]

    def work(tx: Tx) -> None:
        with audit.acting(tx, audit.actor_json(kind="test")):
            task = wq.get_record(tx, "Task", task_id)
            assert task is not None
            if to_review:
                move(tx, wf, task, "in-review", actor="test", now=past, message_id=None, roles=("reviewer",))
                return
            kept = [e for e in task.get("extension") or [] if e.get("url") != DUE_EXT]
            write_case(tx, {**task, "extension": [*kept, {"url": DUE_EXT, "valueDateTime": iso(past)}]}, None)

    await engine.writer.run(work)


def _outbox_events(store: Store, destination: str) -> list[str]:
    with store.read() as conn:
        return sorted(r["event"] for r in outbox.list_rows(conn, destination=destination, limit=500))


async def test_a_late_case_escalates_once_across_a_restart_and_the_supervisor_is_told(
    tmp_path: Path, store: Store, smtp: SmtpServer
) -> None:
    receiver = Receiver()
    hook = await receiver.start()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    engine = await start_engine(tmp_path / "one", store, _config(hook, smtp.port))
    try:
        assert engine.scheduler is not None
        base = f"http://127.0.0.1:{engine.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(engine)) as api:
            reviewer = await _staff(api, "R1", "reviewer", on_shift=True)
            await _staff(api, "SUP1", "supervisor", on_shift=False, mail=SUPERVISOR_MAIL)
            late = await _open_case(api, engine, "REV-LATE", "urgent")
            waiting = await _open_case(api, engine, "REV-TRIAGE", "stat")
            on_time = await _open_case(api, engine, "REV-ON-TIME", "routine")
        assert late["assignee"] == waiting["assignee"] == reviewer
        now = datetime.now(UTC)
        await _in_the_past(engine, late["id"], now - timedelta(hours=9), to_review=True)  # 8 h SLA
        await _in_the_past(engine, waiting["id"], now - timedelta(minutes=5), to_review=False)
        await _in_the_past(engine, on_time["id"], now - timedelta(hours=1), to_review=True)  # 72 h SLA

        status, summary = await engine.scheduler.run_job("case_timers")
        assert (status, summary) == ("ok", "breached=2, escalated=2, handed_back=0, assigned=0, queued=0")
        assert await engine.scheduler.run_job("case_timers") == ("ok", QUIET)
    finally:
        await engine.stop()

    engine = await start_engine(tmp_path / "two", store, _config(hook, smtp.port))  # a restart
    try:
        assert engine.scheduler is not None
        assert await engine.scheduler.run_job("case_timers") == ("ok", QUIET)
        await wait_for(lambda: receiver.names().count("case.sla_breached") == 2, timeout=60)
        await wait_for(lambda: receiver.names().count("case.escalated") == 2, timeout=60)
        await wait_for(lambda: len(smtp.mailbox.to(SUPERVISOR_MAIL)) == 4, timeout=60)
    finally:
        await engine.stop()
        await receiver.stop()

    # exactly once: in the outbox and at the receiver
    hooked = _outbox_events(store, "review_hook")
    assert hooked.count("case.sla_breached") == 2 and hooked.count("case.escalated") == 2
    assert receiver.names().count("case.sla_breached") == 2
    assert receiver.names().count("case.escalated") == 2
    assert receiver.bad_signatures == 0
    breached = {
        e["data"]["resource"]: e["data"] for e in receiver.events if e["event"] == "case.sla_breached"
    }
    assert set(breached) == {f"Task/{late['id']}", f"Task/{waiting['id']}"}
    one = breached[f"Task/{late['id']}"]
    assert (one["state"], one["escalateTo"], one["notifyRole"], one["owner"]) == (
        "in-review",
        "escalated",
        "supervisor",
        f"Practitioner/{reviewer}",
    )
    assert breached[f"Task/{waiting['id']}"]["escalateTo"] == "escalated"
    escalated = sorted(
        (e["data"]["resource"], e["data"]["from"], e["data"]["reason"])
        for e in receiver.events
        if e["event"] == "case.escalated"
    )
    assert escalated == sorted(
        [
            (f"Task/{late['id']}", "in-review", "sla-breached"),
            (f"Task/{waiting['id']}", "triage", "sla-breached"),
        ]
    )
    # the cases as stored: the two late ones escalated with their breach recorded, the other where it was
    task = _task(store, late["id"])
    assert state_of(task) == "escalated" and recorded_breach(task)[0] == "in-review"
    assert any(e["url"] == BREACHED_EXT for e in task["extension"])
    task = _task(store, waiting["id"])
    assert state_of(task) == "escalated" and recorded_breach(task)[0] == "triage"
    assert state_of(_task(store, on_time["id"])) == "in-review"
    assert recorded_breach(_task(store, on_time["id"])) == (None, None)
    # the supervisor: one mail per event, references and codes only
    other = breached[f"Task/{waiting['id']}"]
    subjects = sorted(" ".join(str(m["Subject"]).split()) for m in smtp.mailbox.to(SUPERVISOR_MAIL))
    assert subjects == sorted(
        [
            f"Escalated urgent clinical-review case Task/{late['id']}",
            f"Late urgent clinical-review case Task/{late['id']}: in-review was due {one['due']}",
            f"Escalated stat clinical-review case Task/{waiting['id']}",
            f"Late stat clinical-review case Task/{waiting['id']}: triage was due {other['due']}",
        ]
    )
    assert len(smtp.mailbox.messages) == 4  # nobody else (the reviewer is no supervisor)


async def test_handback_on_offboarding_reassigns_then_queues_then_assigns_who_comes_on_shift(
    tmp_path: Path, store: Store, smtp: SmtpServer
) -> None:
    receiver = Receiver()
    engine = await start_engine(tmp_path, store, _config(await receiver.start(), smtp.port))
    try:
        assert engine.scheduler is not None
        base = f"http://127.0.0.1:{engine.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth_headers(engine)) as api:
            first = await _staff(api, "R1", "reviewer", on_shift=True)
            second = await _staff(api, "R2", "reviewer", on_shift=True)
            later = await _staff(api, "R3", "reviewer", on_shift=False)
            case = await _open_case(api, engine, "REV-HB", "routine")
            owner = case["assignee"]
            other = second if owner == first else first
            assert owner in (first, second)

            async def offboard(pid: str) -> None:
                current = (await api.get(f"/fhir/Practitioner/{pid}")).json()
                r = await api.put(
                    f"/fhir/Practitioner/{pid}", json={**current, "active": False}, headers=FHIR_JSON
                )
                assert r.status_code == 200, r.text

            await offboard(owner)
            outcome = await engine.scheduler.run_job("case_timers")
            assert outcome == ("ok", "breached=0, escalated=0, handed_back=1, assigned=1, queued=0")
            task = _task(store, case["id"])
            assert task["owner"] == {"reference": f"Practitioner/{other}"}
            assert (
                f"handed back by Practitioner/{owner}: offboarded. assigned to Practitioner/{other}"
                in (task["note"][-1]["text"])
            )
            assert await engine.scheduler.run_job("case_timers") == ("ok", QUIET)

            await offboard(other)  # nobody on shift qualifies now: queued
            outcome = await engine.scheduler.run_job("case_timers")
            assert outcome == ("ok", "breached=0, escalated=0, handed_back=1, assigned=0, queued=1")
            assert "owner" not in _task(store, case["id"])
            assert await engine.scheduler.run_job("case_timers") == ("ok", QUIET)  # still nobody

            await _on_shift(api, later, "S-R3")  # R3 comes on shift
            outcome = await engine.scheduler.run_job("case_timers")
            assert outcome == ("ok", "breached=0, escalated=0, handed_back=0, assigned=1, queued=0")
            task = _task(store, case["id"])
            assert task["owner"] == {"reference": f"Practitioner/{later}"}
            assert task["note"][-1]["text"].startswith(f"from the queue: assigned to Practitioner/{later}")

            # a supervisor: a named reviewer must qualify; {} chooses again
            sup = auth_headers(engine, roles=("supervisor",))
            url = f"/api/v1/review/{case['id']}/assign"
            r = await api.post(url, json={"reviewer": owner}, headers=sup)
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["errors"] == [{"location": "body.reviewer", "detail": "not active"}]
            r = await api.post(url, json={}, headers=sup)
            assert r.status_code == 200, r.text
            assert r.json()["assignee"] == later
            assert r.json()["assignment"]["explanation"].startswith(f"assigned to Practitioner/{later}")
            r = await api.post(url, json={"reviewer": later}, headers=sup)
            assert r.status_code == 200 and r.json()["assignee"] == later
            mine = auth_headers(engine, roles=("reviewer",), employee_id=later)
            assert (await api.post(url, json={}, headers=mine)).status_code == 403
            assert (await api.post("/api/v1/review/nope/assign", json={}, headers=sup)).status_code == 404

            # R3's shift ended an hour ago (more than the 30 minutes' grace): off shift, back to the queue
            now = datetime.now(UTC)
            ended = basic_shift("S-R3", later, iso(now - timedelta(hours=9)), iso(now - timedelta(hours=1)))
            r = await api.put(
                "/fhir/Basic",
                params={"identifier": "urn:hms-ach:id:shift|S-R3"},
                json=ended,
                headers=FHIR_JSON,
            )
            assert r.status_code == 200, r.text
            outcome = await engine.scheduler.run_job("case_timers")
            assert outcome == ("ok", "breached=0, escalated=0, handed_back=1, assigned=0, queued=1")
            assert "owner" not in _task(store, case["id"])

        want = ["case.handed_back", "case.assigned", "case.handed_back", "case.unassigned"]
        want += ["case.assigned"] * 3 + ["case.handed_back", "case.unassigned"]
        await wait_for(lambda: receiver.names()[2:] == want, timeout=60)
        handed = [e["data"] for e in receiver.events if e["event"] == "case.handed_back"]
        assert [(h["from"], h["reason"], h["owner"]) for h in handed] == [
            (f"Practitioner/{owner}", "offboarded", f"Practitioner/{other}"),
            (f"Practitioner/{other}", "offboarded", None),
            (f"Practitioner/{later}", "off-shift", None),
        ]
        assert {e["data"]["owner"] for e in receiver.events[-5:-2]} == {f"Practitioner/{later}"}
    finally:
        await engine.stop()
        await receiver.stop()


def test_a_case_written_meanwhile_is_not_written_over(store: Store) -> None:
    """Two timers racing (another instance, ``hms-ach jobs run`` beside the scheduler): the one whose
    read is stale writes nothing, so a breach is never recorded (nor announced) twice."""
    first = {
        "identifier": [{"system": "urn:hms-ach:id:case", "value": "REV-RACE"}],
        "status": "in-progress",
        "intent": "order",
    }
    with store.transaction() as tx, audit.acting(tx, audit.actor_json(kind="test")):
        read = write_case(tx, first, None)
        write_case(tx, {**read, "priority": "urgent"}, None)  # someone else's version 2
        with pytest.raises(CaseChanged):
            write_next(tx, read, {**read, "priority": "stat"})
    assert _task(store, read["id"])["priority"] == "urgent"


def test_a_run_changes_at_most_max_cases_per_run_and_the_next_run_the_rest(store: Store) -> None:
    mset = load_mappings(ROOT / "mappings")
    wf = workflows(mset)["clinical-review"]
    late = iso(datetime.now(UTC) - timedelta(minutes=1))
    before = events.current_engine()
    events.use_engine(MappingEngine(mset))  # the job reads the workflows of the running engine's mappings
    try:
        with store.transaction() as tx, audit.acting(tx, audit.actor_json(kind="test")):
            for n in range(3):
                task = {
                    "identifier": [{"system": "urn:hms-ach:id:case", "value": f"REV-{n}"}],
                    "status": "in-progress",
                    "businessStatus": wf.business_status("in-review"),
                    "code": wf.code(),
                    "intent": "order",
                    "priority": "urgent",
                    "extension": [{"url": DUE_EXT, "valueDateTime": late}],
                }
                write_case(tx, task, None)
        settings = CaseTimerSettings(max_cases_per_run=2, handback=False)
        summaries = []
        for _ in range(3):
            with store.transaction() as tx, audit.acting(tx, audit.actor_json(kind="test")):
                summaries.append(CaseTimerJob().run(tx, settings))
    finally:
        events.use_engine(before)
    assert summaries == ["breached=2, escalated=2", "breached=1, escalated=1", "breached=0, escalated=0"]
    with store.read() as conn:
        assert [state_of(t) for t in wq.scan(conn, "Task")] == ["escalated"] * 3
