"""One case over the API: its view with its state history, moving it through its workflow, and the
comments on it (docs/review-cases.md).

* ``GET /api/v1/review/cases/{caseId}``: the case (the fields of the list) and ``history``, its
  states from the Task's version history, each ``{state, status, at, by}`` (``by``: who made the
  version, from the audit trail). A reviewer sees only the cases assigned to them.
* ``POST /api/v1/review/{caseId}/transitions`` ``{"to": "in-review", "reason": "..."}``: the move,
  made by :func:`hms_ach.cases.transitions.move` with the caller's token roles, in the writer's
  transaction with its events. 409 when the workflow has no such move (the allowed states are in
  ``errors``), 403 when none of the caller's roles may make it, 412 when ``If-Match: W/"<version>"``
  names a version that is no longer the case's.
* ``POST /api/v1/review/{caseId}/comments`` ``{"text": "...", "reply_to": "<Communication id>"}``:
  a FHIR Communication about the Task (``partOf`` the comment it answers; ``sender`` the caller's
  Practitioner), and the event ``case.commented`` (references only, never the text).
* ``GET /api/v1/review/{caseId}/comments``: the comments in thread order (each thread by the time
  it was sent, each reply under the comment it answers, with its ``depth``).

Writes run through the one ingest path like every ``/api/v1`` write (the request stored, its
changes audited with the caller). Actions: ``cases.read`` (the reads), ``cases.move`` and
``cases.comment``; a reviewer's reach is their own cases (``own``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Header, Path, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE, Caller
from hms_ach.cases.opening import case_view
from hms_ach.cases.transitions import MoveRefused, announce, move
from hms_ach.cases.workflow import Workflow, case_type_of, state_of
from hms_ach.core.records import RecordWrite
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish
from hms_ach.store import audit, messages, resources
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.store.savepoint import savepoint
from hms_ach.store.search_query import parse_query
from hms_ach.workforce.access import Access
from hms_ach.workforce.api import Problem, run_write, write_meta
from hms_ach.workforce.rules import iso

if TYPE_CHECKING:  # api.py lists this module in its SECTIONS: no import of it at import time
    from hms_ach.cases.api import CaseApi

#: Communication.identifier system of a comment made through the API.
COMMENT_SYSTEM = "urn:hms-ach:id:case-comment"
#: Communication.category of a comment on a case.
COMMENT_CATEGORY = {"coding": [{"system": "urn:hms-ach:code:communication-category", "code": "case-comment"}]}
#: At most this many comments are read for one case (a thread longer than that is cut, and said).
MAX_COMMENTS = 1000
#: At most this many versions of a case are read for its history.
MAX_HISTORY = 500

_ID = r"^[A-Za-z0-9\-.]{1,64}$"
_IF_MATCH = re.compile(r'^(?:W/)?"(\d{1,12})"$')


class MoveIn(BaseModel):
    to: str = Field(min_length=1, max_length=64, description="The workflow state to move to, e.g. in-review")
    reason: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Why (a code or a short phrase; it goes into Task.note and the escalation event: "
        "no patient data)",
    )


class CommentIn(BaseModel):
    text: str = Field(min_length=1, max_length=4000, description="The comment (Communication.payload)")
    reply_to: str | None = Field(
        None, pattern=_ID, description="The id of the Communication this comment answers (a thread)"
    )


def _caller(request: Request) -> Caller | None:
    caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
    return caller if isinstance(caller, Caller) else None


def expected_version(if_match: str | None) -> int | None:
    """The version an ``If-Match: W/"3"`` header names (None without the header); a Problem 400
    for a header in another form."""
    if if_match is None:
        return None
    found = _IF_MATCH.match(if_match.strip())
    if found is None:
        raise Problem(
            400,
            "Bad request",
            "If-Match must name one version of the case",
            [{"location": "header.If-Match", "detail": 'expected W/"<version>", e.g. W/"2"'}],
        )
    return int(found.group(1))


def _refusal(exc: MoveRefused, wf: Workflow, task: dict[str, Any]) -> Problem:
    """The problem answer to a move the workflow refuses."""
    if exc.reason == "forbidden":
        return Problem(403, "Forbidden", exc.detail)
    if exc.reason == "not-allowed":
        here = state_of(task) or ""
        allowed = sorted({t.to for t in wf.spec.transitions if t.from_state == here})
        detail = f"expected one of {', '.join(allowed)}" if allowed else "none: the case is closed"
        return Problem(409, "Conflict", exc.detail, [{"location": "body.to", "detail": detail}])
    return Problem(422, "Invalid request", exc.detail)


def _finish_problem(problem: Problem) -> tuple[Problem, Finish]:
    return problem, Finish("error", str(problem.status), None, error=problem.detail)


def _commit(meta: messages.MessageMeta, work: Callable[[Tx, int], tuple[Any, Finish]]) -> Callable[[Tx], Any]:
    """The writer job: the request stored and ``work`` done in one transaction."""

    def job(tx: Tx) -> Any:
        result = pipeline.commit(tx, meta, work)
        if isinstance(result, Duplicate):  # the requests are stored unkeyed
            raise RuntimeError(f"an unkeyed request was answered as a duplicate of {result.original_id}")
        return result

    return job


class CaseFlow:
    """The routes' shared steps: find the case and check the caller's reach over it."""

    def __init__(self, api: CaseApi):
        self.api = api

    def actor(self, request: Request) -> str:
        """Who moves or comments, as notes and events name them: Practitioner/<id> when the caller's
        ``employee_id`` names a stored Practitioner, else the token's subject."""
        caller = _caller(request)
        if caller is None:
            return "unknown"
        practitioner = self.practitioner(caller)
        return f"Practitioner/{practitioner}" if practitioner else caller.sub[:64]

    def practitioner(self, caller: Caller | None) -> str | None:
        if caller is None or not caller.employee_id:
            return None
        return self.api.practitioner_named(caller.employee_id)

    def case_in(self, tx: Tx, case_id: str, access: Access) -> tuple[dict[str, Any] | None, Problem | None]:
        """The case ``case_id`` (a Task with a case type), or the problem: 404 when there is none,
        403 when the caller's reach does not cover it."""
        task = wq.get_record(tx, "Task", case_id)
        if task is None or case_type_of(task) is None:
            return None, Problem(404, "Not found", f"no review case Task/{case_id}")
        view = case_view(task, datetime.now(UTC))
        if not access.permits(view["assignee"], view["department"]):
            return None, Problem(403, "Forbidden", f"your roles do not allow {access.action} on this case")
        return task, None

    def workflow(self, task: dict[str, Any]) -> Workflow:
        engine = self.api.engine()
        return self.api.workflow_of(engine, case_type_of(task) or "", "Task.code")


def history_of(store: Store, case_id: str) -> list[dict[str, Any]]:
    """The states of case ``case_id`` from its version history, oldest first: a version that leaves
    the state as it was (an owner's change) adds none. ``by`` is the version's author in the audit
    trail (the caller's subject, or the channel or job that wrote it)."""
    page = resources.history(store, "Task", case_id, MAX_HISTORY, None)
    if page is None:
        return []
    rows, _ = audit.search_trail(store, audit.AuditQuery(entity=f"Task/{case_id}", limit=MAX_HISTORY))
    authors: dict[int, str] = {}
    for row in rows:
        actor = orjson.loads(row["actor"]) if row.get("actor") else {}
        who = actor.get("sub") or actor.get("job") or row.get("agent")  # a caller, a job, a channel
        authors[int(row["version_id"])] = str(who or "")
    out: list[dict[str, Any]] = []
    for version in reversed(page.versions):
        if version.deleted or not version.text:
            continue
        task = orjson.loads(version.text)
        entry = {
            "state": state_of(task),
            "status": task.get("status"),
            "at": task.get("lastModified") or iso(version.last_updated),
            "by": authors.get(version.version) or None,
            "version": version.version,
        }
        if out and (out[-1]["state"], out[-1]["status"]) == (entry["state"], entry["status"]):
            continue
        out.append(entry)
    return out


def comment_json(
    task: dict[str, Any], text: str, reply_to: str | None, sender: str | None, now: datetime
) -> dict[str, Any]:
    """The Communication of a new comment on the case ``task``."""
    comm: dict[str, Any] = {
        "identifier": [{"system": COMMENT_SYSTEM, "value": str(uuid.uuid4())}],
        "status": "completed",
        "category": [COMMENT_CATEGORY],
        "about": [{"reference": f"Task/{task['id']}"}],
        "sent": iso(now),
        "payload": [{"contentString": text}],
    }
    if reply_to:
        comm["partOf"] = [{"reference": f"Communication/{reply_to}"}]
    patient = (task.get("for") or {}).get("reference")
    if isinstance(patient, str) and patient.startswith("Patient/"):
        comm["subject"] = {"reference": patient}
    if sender:
        comm["sender"] = {"reference": f"Practitioner/{sender}"}
    return comm


def _ref_id(value: Any, rtype: str) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    if isinstance(ref, str) and ref.startswith(f"{rtype}/"):
        return ref.split("/", 1)[1]
    return None


def comment_view(comm: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one comment."""
    payload = comm.get("payload") or [{}]
    parents = [p for p in (_ref_id(x, "Communication") for x in comm.get("partOf") or []) if p]
    sender = _ref_id(comm.get("sender"), "Practitioner")
    return {
        "id": comm.get("id"),
        "version": int((comm.get("meta") or {}).get("versionId", 0)),
        "text": payload[0].get("contentString") if isinstance(payload[0], dict) else None,
        "sender": f"Practitioner/{sender}" if sender else None,
        "sent": comm.get("sent"),
        "reply_to": parents[0] if parents else None,
    }


def threaded(comments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Comment views in thread order: threads by the time their first comment was sent (then id),
    replies under the comment they answer in the same order, each with its ``depth``. A reply to a
    comment not among ``comments`` starts a thread of its own; every comment is listed once."""
    views = [comment_view(c) for c in comments]
    ids = {v["id"] for v in views}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for v in views:
        parent = v["reply_to"] if v["reply_to"] in ids else None
        children.setdefault(parent, []).append(v)
    for group in children.values():
        group.sort(key=lambda v: (str(v["sent"] or ""), str(v["id"])))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(roots: list[dict[str, Any]]) -> None:
        stack = [(v, 0) for v in reversed(roots)]
        while stack:
            view, depth = stack.pop()
            if view["id"] in seen:
                continue
            seen.add(view["id"])
            out.append({**view, "depth": depth})
            stack.extend((c, depth + 1) for c in reversed(children.get(view["id"], [])))

    walk(children.get(None, []))
    for view in sorted(views, key=lambda v: (str(v["sent"] or ""), str(v["id"]))):
        walk([view])  # replies in a loop (written over FHIR) start a thread: no comment is left out
    return out


def comments_of(store: Store, case_id: str) -> tuple[list[dict[str, Any]], bool]:
    """The Communications about ``Task/case_id`` (at most :data:`MAX_COMMENTS`), and whether there
    were more."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(found) < MAX_COMMENTS:
        params = [("about", f"Task/{case_id}"), ("_count", "100")]
        if cursor:
            params.append(("_cursor", cursor))
        page = resources.search(store, parse_query("Communication", params))
        found.extend(orjson.loads(text) for _, text in page.matches)
        cursor = page.next_cursor
        if cursor is None:
            return found, False
    return found[:MAX_COMMENTS], True


def install(router: APIRouter, api: CaseApi) -> None:
    """The routes of one case: its view, transitions and comments."""
    flow = CaseFlow(api)
    case_path = Path(alias="caseId", pattern=_ID, description="The case's Task id (`id` of the case)")

    @router.get("/review/cases/{caseId}", summary="A review case with its state history")
    def get_case(request: Request, case_id: str = case_path) -> Response:
        access = api.allowed(request, "cases.read")
        task, problem = wq.read(api.store, lambda tx: flow.case_in(tx, case_id, access))
        if problem is not None or task is None:
            raise problem or Problem(404, "Not found", f"no review case Task/{case_id}")
        view = case_view(task, datetime.now(UTC))
        view["history"] = history_of(api.store, case_id)
        return Response(
            orjson.dumps(view), media_type="application/json", headers={"ETag": f'W/"{view["version"]}"'}
        )

    @router.post("/review/{caseId}/transitions", summary="Move a case to another state of its workflow")
    async def transition(
        body: MoveIn,
        request: Request,
        case_id: str = case_path,
        if_match: str | None = Header(None, alias="If-Match", description='W/"<version>": only that version'),
    ) -> Response:
        access = api.allowed(request, "cases.move")
        expected = expected_version(if_match)
        engine = api.engine()
        caller = _caller(request)
        roles = sorted(caller.roles) if caller is not None else []
        actor = flow.actor(request)
        meta = write_meta(request, "review_transition", orjson.dumps(body.model_dump(mode="json")))

        def work(tx: Tx, message_id: int) -> tuple[Any, Finish]:
            task, problem = flow.case_in(tx, case_id, access)
            if problem is not None or task is None:
                return _finish_problem(problem or Problem(404, "Not found", f"no review case Task/{case_id}"))
            version = int(task["meta"]["versionId"])
            if expected is not None and expected != version:
                return _finish_problem(
                    Problem(
                        412,
                        "Precondition failed",
                        f"the case is at version {version}, not {expected}: read it again",
                    )
                )
            try:
                wf = flow.workflow(task)
            except Problem as exc:
                return _finish_problem(exc)
            try:
                with savepoint(tx):
                    moved = move(
                        tx,
                        wf,
                        task,
                        body.to,
                        actor=actor,
                        now=datetime.now(UTC),
                        message_id=message_id,
                        roles=roles,
                        reason=body.reason,
                    )
            except MoveRefused as exc:
                return _finish_problem(_refusal(exc, wf, task))
            view = case_view(moved.task, datetime.now(UTC))
            return view, Finish("processed", "200", f"Task/{case_id}")

        result = await run_write(engine, meta, _commit(meta, work))
        if isinstance(result, Problem):
            raise result
        return Response(
            orjson.dumps(result), media_type="application/json", headers={"ETag": f'W/"{result["version"]}"'}
        )

    @router.post("/review/{caseId}/comments", status_code=201, summary="Comment on a case")
    async def add_comment(body: CommentIn, request: Request, case_id: str = case_path) -> Response:
        access = api.allowed(request, "cases.comment")
        engine = api.engine()
        sender = flow.practitioner(_caller(request))
        meta = write_meta(request, "review_comment", orjson.dumps(body.model_dump(mode="json")))

        def work(tx: Tx, message_id: int) -> tuple[Any, Finish]:
            task, problem = flow.case_in(tx, case_id, access)
            if problem is not None or task is None:
                return _finish_problem(problem or Problem(404, "Not found", f"no review case Task/{case_id}"))
            if body.reply_to is not None:
                parent = wq.get_record(tx, "Communication", body.reply_to)
                about = [_ref_id(a, "Task") for a in (parent or {}).get("about") or []]
                if parent is None or case_id not in about:
                    return _finish_problem(
                        Problem(
                            422,
                            "Invalid request",
                            "reply_to names no comment on this case",
                            [
                                {
                                    "location": "body.reply_to",
                                    "detail": "expected the id of a comment on this case",
                                }
                            ],
                        )
                    )
            content = comment_json(task, body.text, body.reply_to, sender, datetime.now(UTC))
            key = content["identifier"][0]["value"]
            rec = RecordWrite("comment", "Communication", COMMENT_SYSTEM, key, content, mode="replace")
            with savepoint(tx):
                out = Repository(tx).upsert(rec, content, message_id)
                if out is None:
                    raise RuntimeError("the comment's Communication was not written")
                comm = wq.get_record(tx, "Communication", out.id) or {}
                announce(
                    tx,
                    "case.commented",
                    {
                        "resource": out.reference,
                        "versionId": out.version_id,
                        "case": f"Task/{case_id}",
                        "caseType": case_type_of(task),
                        "replyTo": f"Communication/{body.reply_to}" if body.reply_to else None,
                        "sender": f"Practitioner/{sender}" if sender else None,
                    },
                )
            return comment_view(comm), Finish("processed", "201", out.reference)

        result = await run_write(engine, meta, _commit(meta, work))
        if isinstance(result, Problem):
            raise result
        return Response(
            orjson.dumps(result),
            status_code=201,
            media_type="application/json",
            headers={"Location": f"/fhir/Communication/{result['id']}"},
        )

    @router.get("/review/{caseId}/comments", summary="The comments on a case, in thread order")
    def list_comments(request: Request, case_id: str = case_path) -> dict[str, Any]:
        access = api.allowed(request, "cases.read")
        _, problem = wq.read(api.store, lambda tx: flow.case_in(tx, case_id, access))
        if problem is not None:
            raise problem
        found, cut = comments_of(api.store, case_id)
        return {"items": threaded(found), "truncated": cut}
