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

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.cases import assign_api, audit_api, complaints_api, findings_api, flow_api
from hms_ach.cases.opening import CaseIn, case_view, open_case_job
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
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


#: The route modules of the cases API after the cases themselves, each ``install(router, api)``.
SECTIONS: tuple[Callable[[APIRouter, CaseApi], None], ...] = (
    assign_api.install,  # POST /review/{caseId}/assign
    audit_api.install,  # GET /review/{caseId}/audit-log, GET /analytics/review
    complaints_api.install,  # /complaints
    findings_api.install,  # findings, signatures, the escalation queue
    flow_api.install,  # GET /review/cases/{caseId}, /review/{caseId}/transitions and comments
)
