"""The review cases API under /api/v1: a thin view over the Task store (docs/review-cases.md).

* ``POST /api/v1/review/cases`` opens a case of a workflow (``mappings/workflows/``): a FHIR Task
  with its focus and priority, in the workflow's initial state, given to the next available
  reviewer (:mod:`hms_ach.cases.assignment`) or queued when nobody qualifies. The Task, its history
  version and audit entry (``Task.note`` says who was considered and why this one), the stored
  request and the events ``case.created`` and ``case.assigned`` / ``case.unassigned`` commit in one
  writer transaction, so the webhook and RabbitMQ sinks deliver them through the outbox.
* ``GET /api/v1/review/cases?status=&assignee=&overdue=`` lists cases.

Errors are the RFC 9457 problem details of the rest of ``/api/v1`` (:class:`ProblemRoute` of the
workforce API); the HTTP statuses of this slice are chosen here. Roles (docs/security.md):
``cases.create`` (supervisor, integration) and ``cases.read`` (supervisor, auditor, integration;
a reviewer sees the cases assigned to them, by the ``employee_id`` claim).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.cases import audit_api, findings_api, flow_api
from hms_ach.cases.assignment import ASSIGNED_AT_EXT, CLOSED_STATUSES, Choice, candidates, choose
from hms_ach.cases.transitions import DUE_EXT, announce, event_facts, set_due
from hms_ach.cases.workflow import CASE_SYSTEM, Workflow, case_type_of, state_of, workflows
from hms_ach.core.records import RecordWrite
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish, Pipeline
from hms_ach.store import messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce.access import Access, access_for
from hms_ach.workforce.api import (
    PipelineSource,
    Problem,
    ProblemRoute,
    cursor_after,
    run_write,
    running_pipeline,
    scan_page,
    write_meta,
)
from hms_ach.workforce.rules import DEPARTMENT_EXT, ext, iso

log = logging.getLogger("hms_ach.cases.api")

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


def _events(tx: Tx, task: dict[str, Any], wf: Workflow, choice: Choice) -> None:
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
            _events(tx, task, wf, choice)
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


@dataclass(frozen=True)
class CaseApi:
    """What every route module of the cases API needs: the store, the running engine, the caller's
    access and the workflows. Each module (``hms_ach/cases/*_api.py``) adds its routes with one
    ``install(router, api)`` function, listed in :data:`SECTIONS`."""

    store: Store
    pipeline_of: PipelineSource | None

    def practitioner_named(self, claim: str) -> str | None:
        """The ``employee_id`` claim of a reviewer: their Practitioner id, when it is stored."""
        return wq.read(self.store, lambda tx: claim if wq.get_record(tx, "Practitioner", claim) else None)

    def allowed(self, request: Request, action: str) -> Access:
        """The caller's access for ``action`` (docs/security.md); a Problem 401/403 when none."""
        caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
        return access_for(caller, action, self.practitioner_named)

    def engine(self) -> Pipeline:
        """The running engine's pipeline; a Problem 503 without one."""
        return running_pipeline(self.pipeline_of)

    def workflow_of(self, engine: Pipeline, name: str, location: str = "body.case_type") -> Workflow:
        """The workflow ``name`` of the engine's mappings; a Problem 422 naming ``location`` when unknown."""
        known = workflows(engine.engine.mset)
        wf = known.get(name)
        if wf is None:
            raise Problem(
                422,
                "Invalid request",
                f"unknown case type {name[:64]!r}",
                [{"location": location, "detail": f"expected one of {', '.join(known) or '(none)'}"}],
            )
        return wf


def cases_router(store: Store, pipeline_of: PipelineSource | None = None) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["review cases"], route_class=ProblemRoute)
    api = CaseApi(store, pipeline_of)
    _install_cases(router, api)
    for install in SECTIONS:
        install(router, api)
    return router


def _install_cases(router: APIRouter, api: CaseApi) -> None:
    """``POST`` and ``GET /review/cases``."""
    store = api.store
    allowed = api.allowed

    @router.post("/review/cases", status_code=201, summary="Open a review case and assign it")
    async def open_case(case: CaseIn, request: Request) -> Response:
        allowed(request, "cases.create")
        engine = api.engine()
        wf = api.workflow_of(engine, case.case_type)
        raw = orjson.dumps(case.model_dump(mode="json"))
        meta = write_meta(request, "review_case", raw)
        status, view = await run_write(engine, meta, open_case_job(meta, wf, case))
        return Response(
            orjson.dumps(view),
            status_code=status,
            media_type="application/json",
            headers={"Location": f"/api/v1/review/cases/{view['id']}"},
        )

    @router.get("/review/cases", summary="List review cases")
    def list_cases(
        request: Request,
        status: str | None = Query(None, description="A workflow state (in-review) or a Task.status"),
        assignee: str | None = Query(None, description="Practitioner id of the reviewer"),
        overdue: bool | None = Query(None, description="true: only cases past their SLA"),
        case_type: str | None = Query(None, description="Only cases of this workflow"),
        limit: int = Query(50, ge=1, le=200, description="Page size"),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
    ) -> dict[str, Any]:
        access = allowed(request, "cases.read")
        now = datetime.now(UTC)

        def keep(task: dict[str, Any]) -> bool:
            view = case_view(task, now)
            if view["case_type"] is None or not access.permits(view["assignee"], view["department"]):
                return False
            return (
                (status is None or status in (view["state"], view["status"]))
                and (assignee is None or view["assignee"] == assignee)
                and (overdue is None or view["overdue"] == overdue)
                and (case_type is None or view["case_type"] == case_type)
            )

        after = cursor_after(cursor)
        page, nxt = wq.read(
            store, lambda tx: scan_page(wq.scan(tx, "Task", (), after, first=limit + 1), keep, limit)
        )
        return {"items": [case_view(t, now) for t in page], "next_cursor": nxt}


# The sections import CaseApi and the case helpers above from this module: imported last.
from hms_ach.cases import assign_api, complaints_api  # noqa: E402

#: The route modules of the cases API after the cases themselves, each ``install(router, api)``.
SECTIONS: tuple[Callable[[APIRouter, CaseApi], None], ...] = (
    assign_api.install,  # POST /review/{caseId}/assign
    audit_api.install,  # GET /review/{caseId}/audit-log, GET /analytics/review
    complaints_api.install,  # /complaints
    findings_api.install,  # findings, signatures, the escalation queue
    flow_api.install,  # GET /review/cases/{caseId}, /review/{caseId}/transitions and comments
)
