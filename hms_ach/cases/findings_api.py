"""The findings routes of the cases API (a :data:`hms_ach.cases.api.SECTIONS` entry):

* ``POST /api/v1/review/{caseId}/findings`` (``?sign=true``): store a QuestionnaireResponse as the
  case's findings, run the workflow's policies and move the case (:mod:`hms_ach.cases.findings`);
* ``POST /api/v1/review/{caseId}/sign``: sign the case's latest findings (a Provenance with a JWS);
* ``GET /api/v1/review/{caseId}/signatures``: each signature of the case, verified;
* ``GET /api/v1/review/queue``: the escalation queue, the escalated cases with their violations,
  oldest first.

Actions (docs/security.md): ``cases.findings`` and ``cases.sign`` (a reviewer on the cases assigned to
them, a supervisor on any), ``cases.read`` for the signatures, ``cases.queue`` (supervisor, auditor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Query, Request
from joserfc.jwk import ECKey
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.cases.findings import (
    Act,
    FindingsRefused,
    Settled,
    Signer,
    evaluate,
    findings_of,
    prepare,
    sign_findings,
    submit,
)
from hms_ach.cases.opening import case_view, request_job
from hms_ach.cases.signatures import (
    SIGNER_KEYS_DIR,
    SignerKeyError,
    SigningKey,
    public_keys,
    registered_key,
    signed_version,
    verify,
)
from hms_ach.cases.transitions import MoveRefused, escalation_states
from hms_ach.cases.workflow import Workflow, case_type_of, state_of, workflows
from hms_ach.ingest.pipeline import Finish
from hms_ach.store import messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.signature_queries import referring, version_of
from hms_ach.workforce.api import Problem, run_write, write_meta

if TYPE_CHECKING:  # api.py lists this module in its SECTIONS
    from hms_ach.cases.api import CaseApi

log = logging.getLogger("hms_ach.cases.findings_api")

_STATUS = {"not-a-case": 404, "invalid": 422, "no-form": 409, "closed": 409, "no-findings": 409}
_MOVE_STATUS = {"not-allowed": 409, "forbidden": 403, "not-a-case": 404}


def _problem(exc: FindingsRefused | MoveRefused) -> Problem:
    if isinstance(exc, FindingsRefused):
        title = "Invalid findings" if exc.kind == "invalid" else "Not possible"
        return Problem(
            _STATUS[exc.kind], "Not found" if exc.kind == "not-a-case" else title, exc.detail, exc.errors
        )
    return Problem(_MOVE_STATUS.get(exc.reason, 409), "Not possible", exc.detail)


def _caller_practitioner(request: Request) -> str | None:
    caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
    employee = getattr(caller, "employee_id", None)
    return f"Practitioner/{employee}" if employee else None


def _actor(request: Request) -> str:
    caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
    return _caller_practitioner(request) or str(getattr(caller, "sub", "") or "anonymous")


def _local_key(request: Request) -> tuple[SigningKey, Path] | None:
    """The engine's signing key (the local issuer's EC P-256 key) and the folder of the signers' own
    keys beside it in the data directory; None without a local issuer."""
    auth = getattr(request.app.state, "authenticator", None)
    local = getattr(auth, "local_key", None)
    if local is None:
        return None
    return SigningKey(local.key, local.kid, engine=True), Path(local.path).parent / SIGNER_KEYS_DIR


def signing_key(request: Request, practitioner: str) -> SigningKey:
    """The key that signs for ``Practitioner/<id>``: their registered key, else the engine's on
    their behalf; a Problem 503 without either."""
    found = _local_key(request)
    if found is None:
        raise Problem(503, "Signing unavailable", "the engine has no signing key (auth.mode is not local)")
    engine, folder = found
    try:
        own = registered_key(folder, practitioner.split("/", 1)[1])
    except SignerKeyError as exc:
        log.error("case.signer_key_unusable", extra={"signer": practitioner, "error": str(exc)})
        raise Problem(503, "Signing unavailable", "the signer's registered key cannot be used") from None
    return own or engine


def _public_keys(request: Request) -> dict[str, ECKey]:
    found = _local_key(request)
    return public_keys(found[1], found[0]) if found is not None else {}


def _write_job(
    meta: messages.MessageMeta, work: Callable[[Tx, int], Settled]
) -> Callable[[Tx], dict[str, Any]]:
    """A writer job: the request stored, ``work`` run in its transaction; refusals roll back."""

    def run(tx: Tx, message_id: int) -> tuple[dict[str, Any], Finish]:
        try:
            settled = work(tx, message_id)
        except (FindingsRefused, MoveRefused) as exc:  # the transaction rolls back: nothing stored
            raise _problem(exc) from None
        return settled.to_dict(), Finish("processed", "200", f"Task/{settled.task['id']}")

    return request_job(meta, run)


def install(router: APIRouter, api: CaseApi) -> None:
    """The findings, signature and escalation-queue routes."""

    def case_of(request: Request, case_id: str, action: str) -> tuple[dict[str, Any], Workflow]:
        access = api.allowed(request, action)
        task = wq.read(api.store, lambda tx: wq.get_record(tx, "Task", case_id))
        if task is None or case_type_of(task) is None:
            raise Problem(404, "Not found", f"there is no case Task/{case_id[:64]}")
        view = case_view(task, datetime.now(UTC))
        if not access.permits(view["assignee"], view["department"]):
            raise Problem(403, "Forbidden", f"your roles do not allow {action} on this case")
        known = workflows(api.engine().engine.mset)
        wf = known.get(str(case_type_of(task)))
        if wf is None:
            raise Problem(409, "Not possible", f"the case type {case_type_of(task)!r} has no workflow loaded")
        return task, wf

    @router.post("/review/{case_id}/findings", summary="Submit a case's findings (a QuestionnaireResponse)")
    async def submit_findings(
        case_id: str,
        request: Request,
        sign: bool = Query(False, description="true: sign the findings at once, before the policies run"),
    ) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "Invalid request", f"the body is not JSON: {exc.msg}") from None
        if not isinstance(body, dict):
            raise Problem(422, "Invalid findings", "the body is not a QuestionnaireResponse object")
        _, wf = case_of(request, case_id, "cases.findings")
        engine = api.engine()
        signer = _caller_practitioner(request)
        if sign and signer is None:
            raise Problem(
                403, "Forbidden", "signing needs a token with an employee_id claim (your Practitioner)"
            )
        key = signing_key(request, signer) if sign and signer is not None else None
        now = datetime.now(UTC)
        try:  # checked before anything is stored: a refused body changes nothing
            wq.read(api.store, lambda tx: prepare(tx, wf, case_id, body, signer, now))
        except FindingsRefused as exc:
            raise _problem(exc) from None
        actor = _actor(request)

        def work(tx: Tx, message_id: int) -> Settled:
            fresh = prepare(tx, wf, case_id, body, signer, now)  # the case as it is now, in the writer
            signing = Signer(signer, key) if key is not None and signer is not None else None
            return submit(Act(tx, wf, actor, now, message_id), fresh, signing)

        meta = write_meta(request, "review_findings", raw)
        result = await run_write(engine, meta, _write_job(meta, work))
        log.info("case.findings", extra={"case": f"Task/{case_id[:64]}", "signed": sign, **result["counts"]})
        return Response(orjson.dumps(result), status_code=201, media_type="application/json")

    @router.post("/review/{case_id}/sign", summary="Sign a case's latest findings (Provenance with a JWS)")
    async def sign_case(case_id: str, request: Request) -> dict[str, Any]:
        _, wf = case_of(request, case_id, "cases.sign")
        engine = api.engine()
        signer = _caller_practitioner(request)
        if signer is None:
            raise Problem(
                403, "Forbidden", "signing needs a token with an employee_id claim (your Practitioner)"
            )
        key = signing_key(request, signer)
        actor = _actor(request)
        now = datetime.now(UTC)

        def work(tx: Tx, message_id: int) -> Settled:
            return sign_findings(Act(tx, wf, actor, now, message_id), case_id, Signer(signer, key))

        meta = write_meta(request, "review_signature", b"{}")
        result = await run_write(engine, meta, _write_job(meta, work))
        log.info("case.signed", extra={"case": f"Task/{case_id[:64]}", "engine_key": key.engine})
        return result

    @router.get("/review/{case_id}/signatures", summary="Each signature of a case's findings, verified")
    def signatures(case_id: str, request: Request) -> dict[str, Any]:
        case_of(request, case_id, "cases.read")
        keys = _public_keys(request)

        def read(tx: Tx) -> list[dict[str, Any]]:
            out = []
            for prov in referring(tx, "Provenance", "target", "Task", case_id):
                named = signed_version(prov)
                signed = version_of(tx, "QuestionnaireResponse", *named) if named else None
                latest = wq.get_record(tx, "QuestionnaireResponse", named[0]) if named else None
                out.append(verify(prov, keys, signed, latest).to_dict())
            return out

        return {"items": wq.read(api.store, read)}

    @router.get("/review/queue", summary="The escalation queue: escalated cases with their violations")
    def queue(
        request: Request,
        limit: int = Query(100, ge=1, le=500, description="At most this many cases, oldest first"),
    ) -> dict[str, Any]:
        api.allowed(request, "cases.queue")
        known = workflows(api.engine().engine.mset)
        now = datetime.now(UTC)

        def read(tx: Tx) -> list[dict[str, Any]]:
            items = []
            for task in wq.scan(tx, "Task"):
                wf = known.get(case_type_of(task) or "")
                if wf is None:
                    continue
                escalated = set(escalation_states(wf)) | (
                    {wf.spec.on_violation} if wf.spec.on_violation else set()
                )
                if state_of(task) not in escalated:
                    continue
                qid = findings_of(task)
                response = wq.get_record(tx, "QuestionnaireResponse", qid) if qid else None
                notes = task.get("note") or [{}]
                item = case_view(task, now)
                item["escalated_at"] = task.get("lastModified")
                item["reason"] = notes[-1].get("text") if isinstance(notes[-1], dict) else None
                item["findings"] = f"QuestionnaireResponse/{qid}" if response else None
                item["violations"] = (
                    [v.to_dict() for v in evaluate(wf.spec.policies, response)] if response else []
                )
                items.append(item)
            items.sort(key=lambda i: (str(i["escalated_at"] or ""), str(i["id"])))
            return items[:limit]

        return {"items": wq.read(api.store, read)}
