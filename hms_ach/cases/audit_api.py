"""The audit log and analytics routes of the cases API (docs/review-cases.md):

* ``GET /api/v1/review/{caseId}/audit-log``: the case's audit log (:mod:`hms_ach.cases.audit_log`)
  as JSON, or as a PDF when the request's ``Accept`` names ``application/pdf``. Action
  ``cases.audit``: auditors and supervisors every case, a reviewer the cases they own. The read is
  itself an access record (every GET of the cases API is, :class:`ProblemRoute`).
* ``GET /api/v1/analytics/review?startDate=&endDate=&case_type=``: the review figures of a window
  (:mod:`hms_ach.cases.analytics`). Action ``analytics.review``: supervisors and auditors.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from hms_ach.cases import analytics, audit_log
from hms_ach.cases.opening import case_view
from hms_ach.cases.workflow import CASE_TYPE_SYSTEM, case_type_of, workflows
from hms_ach.store import case_audit_queries as q
from hms_ach.store import workforce_queries as wq
from hms_ach.workforce.api import Problem

if TYPE_CHECKING:  # cases/api.py lists this module in its SECTIONS: it imports this one
    from hms_ach.cases.api import CaseApi

#: The longest analytics window, in days (the figures read every version of every case).
MAX_WINDOW_DAYS = 366
#: The window when no dates are given: the 30 days up to today.
DEFAULT_WINDOW_DAYS = 30


def wants_pdf(accept: str) -> bool:
    """Whether an ``Accept`` header asks for the PDF (``application/pdf`` named, not refused with q=0)."""
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() == "application/pdf":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def _bound(text: str | None, name: str, *, end: bool) -> datetime | None:
    """A window bound: a date (the day's start; for ``endDate`` the next day's, the day included)
    or a dateTime with its offset. A Problem 422 naming ``name`` when unreadable."""
    if text is None or not text.strip():
        return None
    raw = text.strip()
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return datetime.combine(day + timedelta(days=1 if end else 0), time(), UTC)
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise Problem(
            422,
            "Invalid request",
            f"{name} is not a date",
            [{"location": f"query.{name}", "detail": "expected YYYY-MM-DD or a dateTime with its offset"}],
        )
    return moment.astimezone(UTC)


def window_of(start_text: str | None, end_text: str | None, now: datetime) -> analytics.Window:
    """The analytics window of the query; a Problem 422 when it is backwards or too long."""
    end = _bound(end_text, "endDate", end=True) or datetime.combine(
        now.date() + timedelta(days=1), time(), UTC
    )
    start = _bound(start_text, "startDate", end=False) or end - timedelta(days=DEFAULT_WINDOW_DAYS)
    if start >= end:
        raise Problem(
            422,
            "Invalid request",
            "the window is empty: startDate is not before endDate",
            [{"location": "query.startDate", "detail": "expected a start before the end"}],
        )
    if end - start > timedelta(days=MAX_WINDOW_DAYS):
        raise Problem(
            422,
            "Invalid request",
            f"the window is longer than {MAX_WINDOW_DAYS} days",
            [{"location": "query.startDate", "detail": f"expected at most {MAX_WINDOW_DAYS} days"}],
        )
    return analytics.Window(start, end)


def install(router: APIRouter, api: CaseApi) -> None:
    """``GET /review/{caseId}/audit-log`` and ``GET /analytics/review``."""

    store = api.store

    @router.get(
        "/review/{case_id}/audit-log",
        summary="The audit log of a case (JSON, or a PDF with Accept: application/pdf)",
        responses={200: {"content": {"application/json": {}, "application/pdf": {}}}},
    )
    def case_audit_log(case_id: str, request: Request) -> Response:
        access = api.allowed(request, "cases.audit")
        now = datetime.now(UTC)
        task = wq.read(store, lambda tx: wq.get_record(tx, "Task", case_id[:64]))
        if task is None or case_type_of(task) is None:
            raise Problem(404, "Not found", f"no review case {case_id[:64]}")
        view = case_view(task, now)
        if not access.permits(view["assignee"], view["department"]):
            raise Problem(403, "Forbidden", f"your roles do not allow cases.audit on case {view['id']}")
        log = wq.read(store, lambda tx: audit_log.build(tx, str(task["id"]), view["case_id"]))
        if wants_pdf(request.headers.get("accept", "")):
            stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
            return Response(
                audit_log.render_pdf(log, stamp),
                media_type="application/pdf",
                headers={"Content-Disposition": f'inline; filename="case-{view["id"]}-audit-log.pdf"'},
            )
        return Response(orjson.dumps(log.to_dict()), media_type="application/json")

    @router.get("/analytics/review", summary="Review analytics over a window")
    def review_analytics(
        request: Request,
        start_date: str | None = Query(
            None, alias="startDate", description="First day (YYYY-MM-DD) or instant; default: 30 days back"
        ),
        end_date: str | None = Query(
            None, alias="endDate", description="Last day, included (YYYY-MM-DD), or instant; default: today"
        ),
        case_type: str | None = Query(None, description="Only cases of this workflow"),
    ) -> dict[str, Any]:
        api.allowed(request, "analytics.review")
        engine = api.engine()
        window = window_of(start_date, end_date, datetime.now(UTC))
        if case_type is not None:
            rules = {case_type: analytics.Rules.of(api.workflow_of(engine, case_type, "query.case_type"))}
        else:
            rules = {name: analytics.Rules.of(wf) for name, wf in workflows(engine.engine.mset).items()}

        def read(tx: Any) -> dict[str, Any]:
            histories = q.task_histories(tx, CASE_TYPE_SYSTEM, case_type)
            findings = q.current_records(tx, "QuestionnaireResponse", analytics.findings_of(histories))
            return analytics.compute(histories, findings, rules, window)

        figures = wq.read(store, read)
        return {**figures, "case_type": case_type}
