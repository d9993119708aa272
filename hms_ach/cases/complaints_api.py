"""The complaints routes under /api/v1 (a section of the cases API, :mod:`hms_ach.cases.api`).

* ``POST /api/v1/complaints`` logs a complaint (:func:`hms_ach.cases.complaints.log_complaint`):
  201 with the complaint, or 200 with the stored one when its ``complaint_id`` was sent before;
* ``GET /api/v1/complaints/{id}`` (the Task id) and ``GET /api/v1/complaints?status=&department=``;
* ``POST /api/v1/complaints/{id}/resolve`` ``{resolution, upheld}`` resolves it.

Actions (docs/security.md): ``complaints.create`` (supervisor, integration, complaints-officer),
``complaints.read`` and ``complaints.resolve`` (supervisor: any; complaints-officer: the complaints
of their ``department`` claim; integration reads). Writes store the request and commit with the
records and events before answering (``run_write``), audited with the caller. Logs carry the Task
reference, category, department and counts: never the complainant's name or contacts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE, Caller
from hms_ach.cases.complaints import (
    COMPLAINT,
    ComplaintIn,
    ComplaintRefused,
    ResolutionIn,
    complaint_view,
    log_complaint,
    new_complaint_id,
    resolve_complaint,
    route,
)
from hms_ach.cases.opening import request_job
from hms_ach.cases.transitions import MoveRefused
from hms_ach.cases.workflow import Workflow, case_type_of, workflows
from hms_ach.ingest.pipeline import Finish, Pipeline
from hms_ach.store import messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce.access import Access
from hms_ach.workforce.api import Problem, cursor_after, run_write, scan_page, write_meta

if TYPE_CHECKING:
    from hms_ach.cases.api import CaseApi

log = logging.getLogger("hms_ach.cases.complaints")

_MOVE_STATUS = {"not-allowed": 409, "forbidden": 403, "not-a-case": 404}


def _json(body: dict[str, Any], status: int, location: str | None = None) -> Response:
    headers = {"Location": location} if location else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _workflow(engine: Pipeline) -> Workflow:
    wf = workflows(engine.engine.mset).get(COMPLAINT)
    if wf is None or wf.spec.routing is None:
        raise Problem(
            503,
            "Complaints unavailable",
            "the engine's mappings have no complaint workflow with a routing: section "
            "(mappings/workflows/complaint.yaml)",
        )
    return wf


def _refused(exc: ComplaintRefused) -> Problem:
    if exc.reason == "taken":
        return Problem(409, "Conflict", exc.detail, [{"location": "body.complaint_id", "detail": exc.detail}])
    location = "body.patient" if exc.reason == "unknown-patient" else "body.category"
    return Problem(422, "Invalid request", exc.detail, [{"location": location, "detail": exc.detail}])


def _complaint(task: dict[str, Any] | None, complaint_id: str) -> dict[str, Any]:
    if task is None or case_type_of(task) != COMPLAINT:
        raise Problem(404, "Not found", f"no complaint {complaint_id[:64]!r}")
    return task


def _require(access: Access, task: dict[str, Any], now: datetime) -> dict[str, Any]:
    view = complaint_view(task, now)
    access.require(view["assignee"], view["department"], "this complaint")
    return view


def log_job(
    meta: messages.MessageMeta, wf: Workflow, body: ComplaintIn
) -> Callable[[Tx], tuple[int, dict[str, Any]]]:
    complaint_id = body.complaint_id or new_complaint_id()

    def work(tx: Tx, message_id: int) -> tuple[tuple[int, dict[str, Any]], Finish]:
        now = datetime.now(UTC)
        try:
            with savepoint(tx):
                status, task, choice = log_complaint(tx, wf, body, complaint_id, message_id, now)
        except ComplaintRefused as exc:
            raise _refused(exc) from None
        view = complaint_view(task, now)
        if choice is not None:
            view["assignment"] = {
                "explanation": choice.explanation(),
                "considered": [c.to_dict() for c in choice.considered],
            }
            log.info(
                "complaint.logged",
                extra={
                    "case": f"Task/{task['id']}",
                    "category": view["category"],
                    "department": view["department"],
                    "assigned": choice.chosen is not None,
                    "considered": len(choice.considered),
                },
            )
        return (status, view), Finish("processed", str(status), f"Task/{task['id']}")

    return request_job(meta, work)


def resolve_job(
    meta: messages.MessageMeta,
    wf: Workflow,
    task_id: str,
    body: ResolutionIn,
    access: Access,
    caller: Caller,
    author: str | None,
) -> Callable[[Tx], tuple[int, dict[str, Any]]]:
    def work(tx: Tx, message_id: int) -> tuple[tuple[int, dict[str, Any]], Finish]:
        now = datetime.now(UTC)
        task = _complaint(wq.get_record(tx, "Task", task_id), task_id)
        _require(access, task, now)  # inside the transaction: the department cannot change in between
        try:
            with savepoint(tx):
                written = resolve_complaint(
                    tx,
                    wf,
                    task,
                    body,
                    actor=caller.sub,
                    roles=caller.roles,
                    author=author,
                    message_id=message_id,
                    now=now,
                )
        except MoveRefused as exc:
            raise Problem(_MOVE_STATUS.get(exc.reason, 409), "Not allowed", exc.detail) from None
        log.info("complaint.resolved", extra={"case": f"Task/{task_id}", "upheld": body.upheld})
        return (200, complaint_view(written, now)), Finish("processed", "200", f"Task/{task_id}")

    return request_job(meta, work)


def install(router: APIRouter, api: CaseApi) -> None:
    """``POST``/``GET /complaints``, ``GET /complaints/{id}``, ``POST /complaints/{id}/resolve``."""

    @router.post("/complaints", status_code=201, summary="Log a complaint, route and acknowledge it")
    async def create_complaint(body: ComplaintIn, request: Request) -> Response:
        api.allowed(request, "complaints.create")
        engine = api.engine()
        wf = _workflow(engine)
        try:
            route(wf, body.category, body.priority)
        except ComplaintRefused as exc:
            raise _refused(exc) from None
        raw = orjson.dumps(body.model_dump(mode="json"))
        meta = write_meta(request, "complaint", raw)
        status, view = await run_write(engine, meta, log_job(meta, wf, body))
        return _json(view, status, f"/api/v1/complaints/{view['id']}")

    @router.get("/complaints/{complaint_id}", summary="A complaint")
    def get_complaint(complaint_id: str, request: Request) -> dict[str, Any]:
        access = api.allowed(request, "complaints.read")
        task = wq.read(api.store, lambda tx: wq.get_record(tx, "Task", complaint_id))
        return _require(access, _complaint(task, complaint_id), datetime.now(UTC))

    @router.get("/complaints", summary="List complaints")
    def list_complaints(
        request: Request,
        status: str | None = Query(None, description="A workflow state (investigating) or a Task.status"),
        department: str | None = Query(None, description="Only complaints routed to this department"),
        limit: int = Query(50, ge=1, le=200, description="Page size"),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
    ) -> dict[str, Any]:
        access = api.allowed(request, "complaints.read")
        now = datetime.now(UTC)

        def keep(task: dict[str, Any]) -> bool:
            if case_type_of(task) != COMPLAINT:
                return False
            view = complaint_view(task, now)
            return (
                access.permits(view["assignee"], view["department"])
                and (status is None or status in (view["state"], view["status"]))
                and (department is None or view["department"] == department)
            )

        after = cursor_after(cursor)
        page, nxt = wq.read(
            api.store, lambda tx: scan_page(wq.scan(tx, "Task", (), after, first=limit + 1), keep, limit)
        )
        return {"items": [complaint_view(t, now) for t in page], "next_cursor": nxt}

    @router.post("/complaints/{complaint_id}/resolve", summary="Resolve a complaint and tell the complainant")
    async def resolve(complaint_id: str, body: ResolutionIn, request: Request) -> Response:
        access = api.allowed(request, "complaints.resolve")
        engine = api.engine()
        wf = _workflow(engine)
        caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
        if caller is None:  # allowed() refuses a request without one; this is for the type checker
            raise Problem(401, "Unauthorized", "no authenticated caller")
        author = api.practitioner_named(caller.employee_id) if caller.employee_id else None
        raw = orjson.dumps(body.model_dump(mode="json"))
        meta = write_meta(request, "complaint_resolution", raw)
        job = resolve_job(meta, wf, complaint_id, body, access, caller, author)
        status, view = await run_write(engine, meta, job)
        return _json(view, status)
