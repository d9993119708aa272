"""Opening a review case, and the JSON of a case: what the routes of the cases API share
(docs/review-cases.md).

:func:`open_case_job` is the writer job of ``POST /api/v1/review/cases``: the request stored, the
next available reviewer chosen (:mod:`hms_ach.cases.assignment`), the Task written in the workflow's
initial state, and ``case.created`` with ``case.assigned`` or ``case.unassigned`` announced, in one
transaction. :func:`case_view` is the JSON every route answers for a case; :func:`request_job` runs
the job of any ``/api/v1`` case write through the pipeline (the request stored, its outcome kept).
No HTTP here: the route modules (``*_api.py``) choose the statuses.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field

from hms_ach.cases.assignment import ASSIGNED_AT_EXT, CLOSED_STATUSES, Choice, candidates, choose
from hms_ach.cases.transitions import DUE_EXT, announce, event_facts, set_due
from hms_ach.cases.workflow import CASE_SYSTEM, Workflow, case_type_of, state_of
from hms_ach.core.records import RecordWrite
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish
from hms_ach.store import messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce.rules import DEPARTMENT_EXT, ext, iso

log = logging.getLogger("hms_ach.cases.opening")

R = TypeVar("R")

_REFERENCE = r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$"


class CaseIn(BaseModel):
    case_type: str = Field(
        min_length=1, max_length=64, description="The workflow (mappings/workflows/), e.g. clinical-review"
    )
    case_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9\-._]+$",
        description="Your id of the case; sent again, the stored case is answered (200) and nothing changes",
    )
    focus: str = Field(pattern=_REFERENCE, description="What the case is about, e.g. Encounter/12")
    patient: str | None = Field(None, pattern=r"^Patient/[A-Za-z0-9\-.]{1,64}$", description="Patient/id")
    priority: Literal["routine", "urgent", "asap", "stat"] = Field("routine", description="Task.priority")
    department: str | None = Field(
        None, max_length=64, description="Only reviewers of this department qualify (their department)"
    )
    description: str | None = Field(None, max_length=1000, description="Task.description")


def _ext_value(task: dict[str, Any], url: str) -> str | None:
    for e in task.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == url:
            value = e.get("valueDateTime", e.get("valueString"))
            return str(value) if value is not None else None
    return None


def _ref(value: Any) -> str | None:
    return str(value["reference"]) if isinstance(value, dict) and value.get("reference") else None


def _before(text: str, now: datetime) -> bool:
    """Whether the dateTime ``text`` (a due time; one written over FHIR may be anything) is before ``now``."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) < now


def case_view(task: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The JSON of a case, from its Task."""
    owner = _ref(task.get("owner")) or ""
    due = _ext_value(task, DUE_EXT)
    closed = task.get("status") in CLOSED_STATUSES
    overdue = bool(due) and not closed and _before(str(due), now)
    return {
        "id": task.get("id"),
        "version": int((task.get("meta") or {}).get("versionId", 0)),
        "case_id": ((task.get("identifier") or [{}])[0]).get("value"),
        "case_type": case_type_of(task),
        "state": state_of(task),
        "status": task.get("status"),
        "priority": task.get("priority"),
        "focus": _ref(task.get("focus")),
        "patient": _ref(task.get("for")),
        "department": ext(task, DEPARTMENT_EXT),
        "assignee": owner.split("/", 1)[1] if owner.startswith("Practitioner/") else None,
        "assigned_at": _ext_value(task, ASSIGNED_AT_EXT),
        "authored_on": task.get("authoredOn"),
        "due": due,
        "overdue": overdue,
    }


def task_json(wf: Workflow, case: CaseIn, case_id: str, choice: Choice, now: datetime) -> dict[str, Any]:
    """The Task of a new case in the workflow's initial state, owned by the chosen reviewer."""
    state = wf.initial
    stamp = iso(now)
    task: dict[str, Any] = {
        "identifier": [{"system": CASE_SYSTEM, "value": case_id}],
        "status": state.status,
        "businessStatus": wf.business_status(state.name),
        "intent": "order",
        "priority": case.priority,
        "code": wf.code(),
        "focus": {"reference": case.focus},
        "authoredOn": stamp,
        "lastModified": stamp,
        "note": [{"time": stamp, "text": choice.explanation()}],
    }
    if case.description:
        task["description"] = case.description
    if case.patient:
        task["for"] = {"reference": case.patient}
    extensions: list[dict[str, Any]] = []
    if case.department:
        extensions.append({"url": DEPARTMENT_EXT, "valueString": case.department})
    if choice.chosen is not None:
        task["owner"] = {"reference": f"Practitioner/{choice.chosen}"}
        extensions.append({"url": ASSIGNED_AT_EXT, "valueDateTime": stamp})
    if extensions:
        task["extension"] = extensions
    set_due(task, wf, state.name, now)
    return task


def announce_opened(tx: Tx, task: dict[str, Any], wf: Workflow, choice: Choice) -> None:
    """case.created, then case.assigned or case.unassigned, into the outbox of ``tx``."""
    base = event_facts(task, wf)
    owner = _ref(task.get("owner"))
    announce(
        tx,
        "case.created",
        {**base, "state": state_of(task), "focus": _ref(task.get("focus")), "owner": owner},
    )
    if owner is not None:
        announce(tx, "case.assigned", {**base, "owner": owner})
    else:
        announce(tx, "case.unassigned", {**base, "considered": len(choice.considered)})


def open_case_job(
    meta: messages.MessageMeta, wf: Workflow, case: CaseIn
) -> Callable[[Tx], tuple[int, dict[str, Any]]]:
    """The writer job of ``POST /review/cases``: the request stored, the case chosen for, written and
    announced in one transaction. Answers (status, case JSON)."""
    case_id = case.case_id or str(uuid.uuid4())

    def work(tx: Tx, message_id: int) -> tuple[tuple[int, dict[str, Any]], Finish]:
        now = datetime.now(UTC)
        repo = Repository(tx)
        found = repo.find_by_key("Task", CASE_SYSTEM, case_id)
        if found is not None:  # the same case sent again: the stored one
            view = case_view(wq.get_record(tx, "Task", found[0]) or found[1], now)
            return (200, view), Finish("processed", "200", f"Task/{found[0]}")
        with savepoint(tx):
            rule = wf.spec.assignment
            choice = choose(candidates(tx, rule, now), rule, case.department, now)
            content = task_json(wf, case, case_id, choice, now)
            rec = RecordWrite("case", "Task", CASE_SYSTEM, case_id, content, mode="replace")
            out = repo.upsert(rec, content, message_id)
            if out is None:
                raise RuntimeError("the case's Task was not written")
            task = wq.get_record(tx, "Task", out.id) or {}
            announce_opened(tx, task, wf, choice)
        log.info(
            "case.opened",
            extra={
                "case": out.reference,
                "case_type": wf.name,
                "assigned": choice.chosen is not None,
                "considered": len(choice.considered),
            },
        )
        view = case_view(task, now)
        view["assignment"] = {
            "explanation": choice.explanation(),
            "considered": [c.to_dict() for c in choice.considered],
        }
        return (201, view), Finish("processed", "201", out.reference)

    return request_job(meta, work)


def request_job(meta: messages.MessageMeta, work: pipeline.Work[R]) -> Callable[[Tx], R]:
    """The writer job of an ``/api/v1`` write: the request stored (unkeyed) and ``work`` run for it
    in one transaction (:func:`hms_ach.ingest.pipeline.commit`)."""

    def job(tx: Tx) -> R:
        result = pipeline.commit(tx, meta, work)
        if isinstance(result, Duplicate):  # the requests are stored unkeyed
            raise RuntimeError(f"an unkeyed request was answered as a duplicate of {result.original_id}")
        return result

    return job
