"""``POST /api/v1/review/{caseId}/assign``: a supervisor gives an open case to a named reviewer, or
has the engine choose again (docs/review-cases.md, "Hand-back").

Body ``{"reviewer": "<Practitioner id>"}``: that reviewer must hold the workflow's role and qualify
now (active, the credentials valid, on shift, the case's department), else 422 with the reasons.
Body ``{}``: the next available reviewer is chosen as for a new case
(:func:`hms_ach.cases.assignment.choose`); nobody qualifying queues the case. Either way the case's
next version, its note, ``case.assigned`` or ``case.unassigned`` and the stored request commit in
one writer transaction, audited with the caller. 404: no such case; 409: the case is closed.
Action ``cases.assign`` (supervisor, integration).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from hms_ach.cases.assignment import Choice, judge
from hms_ach.cases.handback import ReviewerPool, announce_owner, give
from hms_ach.cases.opening import case_view, request_job
from hms_ach.cases.transitions import case_id_of
from hms_ach.cases.workflow import Workflow, case_type_of, state_of
from hms_ach.ingest.pipeline import Finish
from hms_ach.store import messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.workforce.api import Problem, run_write, write_meta
from hms_ach.workforce.rules import DEPARTMENT_EXT, ext

if TYPE_CHECKING:
    from hms_ach.cases.api import CaseApi

_ID = r"^[A-Za-z0-9\-.]{1,64}$"


class AssignIn(BaseModel):
    reviewer: str | None = Field(
        None, pattern=_ID, description="Practitioner id of the reviewer; absent: the engine chooses again"
    )


def _choice(tx: Tx, wf: Workflow, task: dict[str, Any], reviewer: str | None, now: datetime) -> Choice:
    """The reviewer named (who must qualify: else a Problem 422) or the next available one."""
    pool = ReviewerPool(tx, wf, now)
    department = ext(task, DEPARTMENT_EXT)
    if reviewer is None:
        return pool.choose(wf, department, now, without=None)
    rule = wf.spec.assignment
    held = pool.by_id.get(reviewer)
    judged = judge(held, rule, department, now) if held is not None else None
    reasons = judged.reasons if judged is not None else (f"does not hold the role {rule.role}",)
    if judged is None or reasons:
        raise Problem(
            422,
            "Invalid request",
            f"Practitioner/{reviewer} does not qualify for this {wf.name} case",
            [{"location": "body.reviewer", "detail": reason} for reason in reasons],
        )
    return Choice(reviewer, (judged,))


def assign_job(
    meta: messages.MessageMeta, wf: Workflow, task_id: str, reviewer: str | None
) -> Callable[[Tx], dict[str, Any]]:
    """The writer job of ``POST /review/{caseId}/assign``; answers the case JSON."""

    def work(tx: Tx, message_id: int) -> tuple[dict[str, Any], Finish]:
        now = datetime.now(UTC)
        task = wq.get_record(tx, "Task", task_id)
        if task is None or state_of(task) not in wf.open_states():
            raise Problem(409, "Case closed", f"case {task_id} is closed: it cannot be assigned")
        choice = _choice(tx, wf, task, reviewer, now)
        if reviewer is not None:
            note = f"assigned to Practitioner/{reviewer}: named by the caller (qualified now)."
        else:
            note = f"chosen again: {choice.explanation()}"
        written = give(tx, task, choice.chosen, now, note)
        announce_owner(tx, wf, written, len(choice.considered))
        view = case_view(written, now)
        if reviewer is None:
            view["assignment"] = {
                "explanation": choice.explanation(),
                "considered": [c.to_dict() for c in choice.considered],
            }
        return view, Finish("processed", "200", f"Task/{task_id}")

    return request_job(meta, work)


def install(router: APIRouter, api: CaseApi) -> None:
    """``POST /review/{caseId}/assign``."""

    @router.post("/review/{case_id}/assign", summary="Give a case to a named reviewer, or choose again")
    async def assign(
        body: AssignIn,
        request: Request,
        case_id: str = Path(pattern=_ID, description="The case's id (its Task id)"),
    ) -> Response:
        access = api.allowed(request, "cases.assign")
        engine = api.engine()
        task = wq.read(api.store, lambda tx: wq.get_record(tx, "Task", case_id))
        case_type = case_type_of(task) if task is not None else None
        if task is None or case_type is None or case_id_of(task) is None:
            raise Problem(404, "Not found", f"no case {case_id}")
        view = case_view(task, datetime.now(UTC))
        if not access.permits(view["assignee"], view["department"]):
            raise Problem(404, "Not found", f"no case {case_id}")
        wf = api.workflow_of(engine, case_type, location="path.caseId")
        if state_of(task) not in wf.open_states():
            raise Problem(409, "Case closed", f"case {case_id} is closed: it cannot be assigned")
        meta = write_meta(request, "review_assign", orjson.dumps(body.model_dump(mode="json")))
        out = await run_write(engine, meta, assign_job(meta, wf, case_id, body.reviewer))
        return Response(orjson.dumps(out), media_type="application/json")
