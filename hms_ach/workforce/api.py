"""The workforce REST API under /api/v1: employees, credentials, shifts, timecards, compliance, audit.

Plain JSON for the personnel and rostering systems that do not speak FHIR. This module is the HTTP
layer only: it parses requests, calls the rules (:mod:`hms_ach.workforce.rules`: overlaps, swaps,
overtime, credentials, compliance) and the store's queries (:mod:`hms_ach.store.workforce_queries`),
and shapes the answers; the HTTP statuses of the workforce slice are chosen here and nowhere else.

Every write goes through the engine's group-commit writer as one job that also stores the request
in the message store (channel ``api``): employees are written as FHIR Practitioners through the
FHIR mappings (the same path as the fhir_rest channel), shifts and timecards as canonical ``Shift``
/ ``Timecard`` records. Every change therefore has its history version and its audit entry. A rule
that refuses a shift or swap inside the job rolls back its savepoint and finishes the stored request
as an error with the answer's status.

Conventions:

* lists take ``limit`` (1-200, default 50) and ``cursor`` (opaque; the ``next_cursor`` of the
  previous page) and answer ``{"items": [...], "next_cursor": ...}``;
* errors are RFC 9457 problem details (``application/problem+json``) whose ``errors`` list each
  failing field with its location (``body.clock_out``, ``query.limit``); a rule's error
  (:class:`hms_ach.workforce.rules.WorkforceError`) answers 422 when the request is invalid, 404 when
  its record does not exist, 409 when the record's state forbids it and 403 when a rule says who may
  act; a workforce rule's stable code is the problem's ``code`` member (docs/workforce-rules.md).

Overtime (see :mod:`hms_ach.workforce.overtime`) is computed when read, so timecards from every
source (this API, CSV files, kiosk events) follow the same rule.

Reads go through the search index (see :mod:`hms_ach.store.workforce_queries`): an overlap check
reads the shifts of one employee around the new shift (and its week, for the weekly limit), a
timecard the employee's timecards of the 15 days before it, and a list page only the records it
shows (plus, for timecards, the 15 days before each, which decide its overtime).
Only the compliance figures, a report over everyone, read every employee, Organization and timecard.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.responses import Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE
from hms_ach.auth.errors import challenge, insufficient_scope
from hms_ach.core.errors import ContentError
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.core.redact import error_kind
from hms_ach.fhir.outcomes import FhirError, http_error
from hms_ach.fhir.write import VERIFICATION_EXT, Operation, prepare, request_job
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish, Pipeline
from hms_ach.store import access_log, audit, messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce import rules, swap_rules, timecard_rules
from hms_ach.workforce.access import Access, RoleDenied, access_for
from hms_ach.workforce.compliance import Inputs, Period, compliance, linked_shift_refs
from hms_ach.workforce.overtime import (
    CONTRACT_EXT,
    LOOKBACK,
    check_contract,
    contracts_of,
    overtime_by_timecard,
)
from hms_ach.workforce.overtime import clock_in as clock_in_of
from hms_ach.workforce.rules import (
    CREDENTIAL_SCAN_JOB,
    CREDENTIAL_SYSTEM,
    DEPARTMENT_EXT,
    NPI_SYSTEM,
    SHIFT_SYSTEM,
    SOURCE_EXT,
    STAFF_SYSTEM,
    STATE_EXT,
    InvalidRequest,
    NotPermitted,
    RecordNotFound,
    StateConflict,
    WorkforceError,
    ext,
    iso,
)

log = logging.getLogger("hms_ach.workforce.api")
T = TypeVar("T")

PROBLEM_JSON = "application/problem+json"
API_CHANNEL = "api"
#: The status that answers each kind of rule error (the most specific class that matches).
RULE_STATUS: dict[type[WorkforceError], int] = {
    InvalidRequest: 422,
    RecordNotFound: 404,
    StateConflict: 409,
    RoleDenied: 403,
    NotPermitted: 403,
}


# ---------------------------------------------------------------------------- problem details
class Problem(Exception):
    """An RFC 9457 problem details answer."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []
        self.headers = headers or {}
        self.code = code
        super().__init__(detail)

    def response(self, instance: str = "") -> Response:
        body: dict[str, Any] = {
            "type": f"urn:hms-ach:problem:{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.code:  # the workforce rule broken (docs/workforce-rules.md)
            body["code"] = self.code
        if self.errors:
            body["errors"] = self.errors
        return Response(
            orjson.dumps(body), status_code=self.status, media_type=PROBLEM_JSON, headers=self.headers
        )


def rule_problem(exc: WorkforceError, part: str = "body") -> Problem:
    """The problem details answer to a rule's error; its field is located in the request ``part``
    (``body`` or ``query``)."""
    status = next((s for kind, s in RULE_STATUS.items() if isinstance(exc, kind)), 422)
    errors = [{"location": f"{part}.{exc.field}", "detail": exc.reason or exc.detail}] if exc.field else []
    refused = isinstance(exc, RoleDenied | NotPermitted)
    headers = challenge(insufficient_scope(exc.detail))[1] if refused else None
    return Problem(status, exc.title, exc.detail, errors, headers, exc.code)


async def _refuse_nul(request: Request) -> None:
    """A JSON body with a NUL character in any string is refused with its location (422), the
    same on both databases (PostgreSQL cannot store one); see :func:`hms_ach.ingest.pipeline.find_nul`."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()  # kept by the request: the route reads it again
    if b"\\u0000" not in body and b"\x00" not in body:
        return
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return  # the route answers an invalid body
    where = pipeline.find_nul(parsed, "body", ".{}")
    if where is not None:
        raise Problem(
            422,
            "Invalid request",
            "the request does not match its schema",
            [{"location": where, "detail": "contains a NUL character (U+0000), which is not accepted"}],
        )


def _field_errors(errors: list[Any], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "location": ".".join(str(p) for p in (*prefix, *e.get("loc", ()))),
            "detail": e.get("msg", "invalid"),
        }
        for e in errors[:20]
    ]


#: GET paths that write their own access record (with what they returned).
_SELF_RECORDED = frozenset({"/api/v1/shifts"})


class ProblemRoute(APIRoute):
    """Routes whose errors (validation, Problem, a rule's error, FhirError from the write path) are
    problem details."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def audited(request: Request) -> Response:
            """Every GET of staff data, the audit trail's included, writes an access record with its
            status (docs/audit.md); ``GET /shifts`` records its own (with the shifts returned)."""
            response = await guarded(request)
            path = str(request.scope.get("path", ""))
            if request.method == "GET" and path not in _SELF_RECORDED:
                subtype, rtype = access_log.interaction_of("GET", path)
                access_log.record_request(request, subtype, rtype, response.status_code)
            return response

        async def guarded(request: Request) -> Response:
            try:
                await _refuse_nul(request)
                return await handler(request)
            except Problem as exc:
                return exc.response(request.url.path)
            except WorkforceError as exc:
                return rule_problem(exc).response(request.url.path)
            except RequestValidationError as exc:
                return Problem(
                    422,
                    "Invalid request",
                    "the request does not match its schema",
                    _field_errors(list(exc.errors())),
                ).response(request.url.path)
            except (FhirError, StoreUnavailable) as exc:  # the store down: 503, the client resends
                if isinstance(exc, StoreUnavailable):
                    exc = http_error(exc)
                errors = [{"location": exc.expression, "detail": exc.diagnostics}] if exc.expression else []
                return Problem(
                    exc.status, exc.code.replace("-", " ").capitalize(), exc.diagnostics, errors
                ).response(request.url.path)

        return audited


# ---------------------------------------------------------------------------- models
class Credential(BaseModel):
    type: str = Field(description="Credential type code, e.g. RN, MD, DEA, BLS", examples=["RN"])
    type_text: str | None = Field(None, description="Human-readable name of the credential")
    number: str = Field(description="Licence or certificate number")
    issuer: str | None = Field(None, description="Issuing body, e.g. California Board of Registered Nursing")
    state: str | None = Field(None, description="Issuing state or region")
    valid_from: date | None = Field(None, description="First day the credential is valid")
    valid_to: date | None = Field(None, description="Last day the credential is valid")
    verification_status: Literal["verified", "unverified", "pending", "failed", "expired"] = Field(
        "unverified", description="Primary-source verification state"
    )
    verification_source: str | None = Field(None, description="Where it was verified (e.g. Nursys)")


class EmployeeIn(BaseModel):
    employee_number: str = Field(
        description="The staff number (identifier system urn:hms-ach:id:staff)", min_length=1, max_length=64
    )
    npi: str | None = Field(None, description="US NPI, when the employee has one", pattern=r"^\d{10}$")
    family: str = Field(min_length=1, description="Family name")
    given: list[str] = Field(default_factory=list, description="Given names")
    gender: Literal["male", "female", "other", "unknown"] | None = None
    active: bool = True
    department: str | None = Field(None, description="Department the employee belongs to")
    credentials: list[Credential] = Field(default_factory=list)
    overtime_contract: str | None = Field(
        None,
        max_length=64,
        description="The employee's overtime contract: a name in workforce.overtime.contracts (wins over "
        "the department's)",
    )


class ShiftIn(BaseModel):
    shift_id: str | None = Field(None, description="Your id of the shift; a new one is made when empty")
    employee_id: str | None = Field(None, description="Practitioner id; empty: an unfilled shift")
    role: str | None = None
    department: str | None = None
    location_id: str | None = Field(None, description="Location id")
    start: datetime = Field(description="Start, with a UTC offset")
    end: datetime = Field(description="End, with a UTC offset; after start")
    status: Literal["planned", "confirmed", "swapped", "cancelled", "open"] = Field(
        "planned", description="open: an unfilled shift (no employee_id) waiting for someone"
    )


class SwapIn(BaseModel):
    requested_by: str = Field(description="Practitioner id of the employee asking")
    replacement: str = Field(description="Practitioner id of the employee who would take the shift")


class SwapDecision(BaseModel):
    approve: bool
    decided_by: str | None = Field(
        None, description="Ignored: the decision records the caller (its token's subject)"
    )


class ClockEventIn(BaseModel):
    employee_id: str = Field(description="Practitioner id")
    at: datetime = Field(description="When the employee clocked in or out, with a UTC offset")
    timecard_id: str | None = Field(None, description="clock-in: your id of the timecard opened")
    shift_id: str | None = Field(None, description="clock-in: the Shift record id worked, if any")
    department: str | None = None


class TimecardIn(BaseModel):
    timecard_id: str | None = None
    employee_id: str = Field(description="Practitioner id")
    clock_in: datetime
    clock_out: datetime
    shift_id: str | None = Field(None, description="The Shift record id worked, if any")
    department: str | None = None


# ---------------------------------------------------------------------------- conversions
def practitioner_json(emp: EmployeeIn) -> dict[str, Any]:
    ids = [{"system": STAFF_SYSTEM, "value": emp.employee_number}]
    if emp.npi:
        ids.append({"system": NPI_SYSTEM, "value": emp.npi})
    name: dict[str, Any] = {"family": emp.family}
    if emp.given:
        name["given"] = emp.given
    res: dict[str, Any] = {
        "resourceType": "Practitioner",
        "identifier": ids,
        "active": emp.active,
        "name": [name],
    }
    if emp.gender:
        res["gender"] = emp.gender
    if emp.department:
        res["extension"] = [{"url": DEPARTMENT_EXT, "valueString": emp.department}]
    if emp.overtime_contract:
        res.setdefault("extension", []).append({"url": CONTRACT_EXT, "valueCode": emp.overtime_contract})
    quals = []
    for c in emp.credentials:
        q: dict[str, Any] = {
            "identifier": [{"value": c.number}],
            "code": {
                "coding": [{"system": CREDENTIAL_SYSTEM, "code": c.type}],
                "text": c.type_text or c.type,
            },
            "extension": [{"url": VERIFICATION_EXT, "valueCode": c.verification_status}],
        }
        if c.verification_source:
            q["extension"].append({"url": SOURCE_EXT, "valueString": c.verification_source})
        if c.state:
            q["extension"].append({"url": STATE_EXT, "valueString": c.state})
        if c.issuer:
            q["issuer"] = {"display": c.issuer}
        period = {k: v.isoformat() for k, v in (("start", c.valid_from), ("end", c.valid_to)) if v}
        if period:
            q["period"] = period
        quals.append(q)
    if quals:
        res["qualification"] = quals
    return res


def credentials_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for q in res.get("qualification") or []:
        code = q.get("code") or {}
        coding = (code.get("coding") or [{}])[0]
        period = q.get("period") or {}
        out.append(
            {
                "type": coding.get("code") or code.get("text"),
                "type_text": code.get("text"),
                "number": ((q.get("identifier") or [{}])[0]).get("value"),
                "issuer": (q.get("issuer") or {}).get("display"),
                "state": ext(q, STATE_EXT),
                "valid_from": period.get("start"),
                "valid_to": period.get("end"),
                "verification_status": ext(q, VERIFICATION_EXT),
                "verification_source": ext(q, SOURCE_EXT),
            }
        )
    return out


def employee_view(res: dict[str, Any]) -> dict[str, Any]:
    ids = {i.get("system"): i.get("value") for i in res.get("identifier") or []}
    name = (res.get("name") or [{}])[0]
    return {
        "id": res.get("id"),
        "version": int((res.get("meta") or {}).get("versionId", 0)),
        "employee_number": ids.get(STAFF_SYSTEM),
        "npi": ids.get(NPI_SYSTEM),
        "family": name.get("family"),
        "given": name.get("given", []),
        "gender": res.get("gender"),
        "active": res.get("active", True),
        "department": ext(res, DEPARTMENT_EXT),
        "credentials": credentials_of(res),
        "overtime_contract": ext(res, CONTRACT_EXT),
    }


def shift_view(res: dict[str, Any]) -> dict[str, Any]:
    ref = (res.get("practitioner") or {}).get("reference", "")
    return {
        "id": res.get("id"),
        "shift_id": ((res.get("identifier") or [{}])[0]).get("value"),
        "employee_id": ref.split("/", 1)[1] if "/" in ref else None,
        "role": (res.get("role") or {}).get("text"),
        "department": (res.get("department") or {}).get("display"),
        "location_id": ((res.get("location") or {}).get("reference") or "/").split("/", 1)[1] or None,
        "start": res.get("start"),
        "end": res.get("end"),
        "status": res.get("status"),
        "swap_request": res.get("swapRequest"),
    }


def timecard_view(res: dict[str, Any]) -> dict[str, Any]:
    ref = (res.get("practitioner") or {}).get("reference", "")
    return {
        "id": res.get("id"),
        "timecard_id": ((res.get("identifier") or [{}])[0]).get("value"),
        "employee_id": ref.split("/", 1)[1] if "/" in ref else None,
        "department": res.get("department"),
        "clock_in": res.get("clockIn"),
        "clock_out": res.get("clockOut"),
        "worked_minutes": res.get("workedMinutes"),
        "overtime_minutes": res.get("overtimeMinutes"),
        "shift_id": ((res.get("shift") or {}).get("reference") or "/").split("/", 1)[1] or None,
    }


# ---------------------------------------------------------------------------- request parsing
def _query_time(value: datetime | None, name: str) -> datetime | None:
    """A time query parameter, which needs a UTC offset."""
    if value is None:
        return None
    try:
        return rules.aware(value, name)
    except WorkforceError as exc:
        raise rule_problem(exc, "query") from None


def cursor_after(cursor: str | None) -> str:
    """The last key served, from a ``next_cursor`` this API gave out."""
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor.encode() + b"==").decode()
    except (ValueError, UnicodeDecodeError):
        raise _bad_cursor() from None


def _bad_cursor() -> Problem:
    return Problem(
        400,
        "Invalid cursor",
        "the cursor is not one this API gave out",
        [{"location": "query.cursor", "detail": "unknown cursor"}],
    )


def _cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def _page(items: list[dict[str, Any]], limit: int, cursor: str | None, key: str = "id") -> dict[str, Any]:
    """Keyset page over ``items`` sorted by ``key``: the cursor carries the last key served."""
    after = cursor_after(cursor)
    items = sorted((i for i in items if str(i[key]) > after), key=lambda i: str(i[key]))
    page = items[:limit]
    return {"items": page, "next_cursor": _cursor(page[-1][key]) if len(items) > limit else None}


def scan_page(
    records: Iterable[dict[str, Any]], keep: Callable[[dict[str, Any]], bool], limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """A keyset page (by record id) of the ``records`` (in id order, after the cursor) that ``keep``.

    The store's index narrows, ``keep`` decides (the exact filter), and the scan stops once it has
    one record more than the page; without filters that is ``limit + 1`` rows."""
    found: list[dict[str, Any]] = []
    for res in records:
        if keep(res):
            found.append(res)
            if len(found) > limit:
                break
    page = found[:limit]
    return page, _cursor(page[-1]["id"]) if len(found) > limit else None


def write_meta(request: Request, what: str, body: bytes) -> messages.MessageMeta:
    client = request.headers.get("x-client-id", "")[:200]
    return messages.MessageMeta(
        channel=API_CHANNEL,
        raw=body,
        content_type="json",
        message_type=what[:50],
        control_id=request.headers.get("x-request-id", "")[:200] or str(uuid.uuid4()),
        sending_application=client,
        actor=access_log.request_actor(request),
    )


#: Finds the engine's pipeline (None: this API runs without an engine, and writes answer 503).
PipelineSource = Callable[[], Pipeline | None]


# ---------------------------------------------------------------------------- reads and writes
def overtime_of_page(tx: Tx, cards: list[dict[str, Any]]) -> dict[str, int]:
    """:func:`hms_ach.workforce.overtime.overtime_by_timecard` for ``cards`` only: per employee, it
    reads the timecards clocking in up to :data:`~hms_ach.workforce.overtime.LOOKBACK` before each
    card (a rule never looks further back than a 14-day period), not every timecard."""
    ranges: dict[str, list[tuple[datetime | None, datetime | None]]] = {}
    for card in cards:
        start = clock_in_of(card)
        if start is not None:
            ranges.setdefault(rules.practitioner_of(card), []).append(
                (start - LOOKBACK, start + timedelta(days=1))
            )
    out: dict[str, int] = {}
    for ref, windows in ranges.items():
        context = [
            tc
            for tc in wq.practitioner_timecards(tx, ref or None, windows)
            if rules.practitioner_of(tc) == ref
        ]
        employee = wq.StoredRoster(tx).employee(ref.partition("/")[2]) if ref else None
        overtime = overtime_by_timecard(context, contracts=contracts_of([employee]))
        out.update(
            {
                str(c.get("id")): overtime.get(str(c.get("id")), 0)
                for c in cards
                if rules.practitioner_of(c) == ref
            }
        )
    return out


def _record_job(
    meta: messages.MessageMeta, build: Callable[[Tx], RecordWrite]
) -> Callable[[Tx], dict[str, Any] | Problem]:
    """A writer job: the request is committed through the one ingest path
    (:func:`hms_ach.ingest.pipeline.commit`); the record is built inside the transaction (so checks
    such as overlaps see every committed shift) and upserted with history and audit. A rule's error
    rolls the record back, finishes the stored request as an error and is the job's answer (a Problem)."""

    def work(tx: Tx, message_id: int) -> tuple[dict[str, Any] | Problem, Finish]:
        try:
            with savepoint(tx):
                rec = build(tx)
                _check_record(rec)
                out = Repository(tx).upsert(rec, rec.content, message_id)
                assert out is not None
        except WorkforceError as exc:
            problem = rule_problem(exc)
            # the rule's code is stored with the refusal: the compliance report counts it
            stored = f"[{exc.code}] {problem.detail}" if exc.code else problem.detail
            return problem, Finish("error", str(problem.status), None, error=stored)
        done = Finish("processed", "201" if out.created else "200", out.reference)
        return {"created": out.created, **(wq.get_record(tx, out.resource_type, out.id) or {})}, done

    def job(tx: Tx) -> dict[str, Any] | Problem:
        result = pipeline.commit(tx, meta, work)
        if isinstance(result, Duplicate):  # the requests are stored unkeyed
            raise RuntimeError(f"an unkeyed request was answered as a duplicate of {result.original_id}")
        return result

    return job


def _check_record(rec: RecordWrite) -> None:
    """The record passes the store's limits (identifier width, NUL, size), else a 422 naming it."""
    try:
        pipeline.check_records(MappingResult(records=[rec]))
    except ContentError as exc:
        raise InvalidRequest(
            "Invalid request", exc.message, _BODY_FIELD.get(exc.location, exc.location), exc.message
        ) from None


#: The request field a record's identifier comes from, by record location.
_BODY_FIELD = {"Shift.identifier.value": "shift_id", "Timecard.identifier.value": "timecard_id"}


async def run_write(engine: Pipeline, meta: messages.MessageMeta, job: Callable[[Tx], T]) -> T:
    """Run a write's job; one that fails in the store for a reason not foreseen is stored as an
    ``error`` in a fresh job and answered 500 with a generic text (no exception text)."""
    try:
        return await engine.writer.run(job)
    except (Problem, WorkforceError, FhirError, StoreUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - not foreseen: stored, answered generically
        kind = error_kind(exc)
        log.error("api.store_failed", extra={"error_kind": kind})
        done = Finish("error", "500", None, error=f"{pipeline.INTERNAL_ERROR_TEXT} (store error: {kind})")
        try:
            await engine.writer.run(lambda tx: pipeline.commit(tx, meta, pipeline.only_finish(done)))
        except StoreUnavailable:
            raise
        except Exception as again:  # noqa: BLE001 - the store refuses even this: the client resends
            raise StoreUnavailable(f"the request could not be stored ({error_kind(again)})") from None
        raise Problem(500, "Internal error", pipeline.INTERNAL_ERROR_TEXT) from None


def running_pipeline(pipeline_of: PipelineSource | None) -> Pipeline:
    pipeline = pipeline_of() if pipeline_of is not None else None
    if pipeline is None:
        raise Problem(503, "Writes unavailable", "this API runs without an engine; writes need `hms-ach run`")
    return pipeline


# ---------------------------------------------------------------------------- router
def workforce_router(store: Store, pipeline_of: PipelineSource | None = None) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["workforce"], route_class=ProblemRoute)
    limit_q = Query(50, ge=1, le=200, description="Page size")
    cursor_q = Query(None, description="next_cursor of the previous page")
    from_q = Query(
        None, alias="from", description="Hours, overtime, violations and offboardings from (inclusive)"
    )
    to_q = Query(None, alias="to", description="Hours, overtime, violations and offboardings to (exclusive)")

    def employee_named(claim: str) -> str | None:
        """The Practitioner id an ``employee_id`` claim names: its id, or its employee number."""

        def find(tx: Tx) -> str | None:
            if wq.get_record(tx, "Practitioner", claim) is not None:
                return claim
            found = Repository(tx).find_by_key("Practitioner", STAFF_SYSTEM, claim)
            return found[0] if found else None

        return wq.read(store, find)

    def allowed(request: Request, action: str) -> Access:
        """The caller's access for ``action`` (docs/security.md, Roles); RoleDenied (403) if none."""
        caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
        return access_for(caller, action, employee_named)

    def narrowed(access: Access, employee_id: str | None) -> str | None:
        """The ``employee_id`` filter of a list: an own-records-only caller (an employee) sees its
        own records; asking for someone else's is refused."""
        if not access.own_only:
            return employee_id
        if employee_id is not None:
            access.require(employee_id, None, "the records of another employee")
            return employee_id
        return next(iter(access.own_ids)) if len(access.own_ids) == 1 else None

    async def write_employee(request: Request, emp: EmployeeIn, rid: str | None) -> Response:
        allowed(request, "employees.write").require(rid, emp.department, "this employee")
        engine = running_pipeline(pipeline_of)
        res = practitioner_json(emp)
        check_contract(res, "employee.unknown_contract", "overtime_contract")
        if rid is None:
            op = Operation(
                "PUT", "Practitioner", query=f"identifier={STAFF_SYSTEM}|{emp.employee_number}", resource=res
            )
        else:
            op = Operation(
                "PUT",
                "Practitioner",
                rid=rid,
                resource={**res, "id": rid},
                if_match=request.headers.get("if-match"),
            )
        prepare(op, engine.engine)
        raw = orjson.dumps(emp.model_dump(mode="json"))
        meta = write_meta(request, "employee", raw)
        outcome = await run_write(engine, meta, request_job(meta, [op], "single"))
        if outcome.error is not None:
            raise outcome.error
        result = outcome.results[0]
        view = employee_view(orjson.loads(result.body or "{}"))
        return Response(
            orjson.dumps(view),
            status_code=result.status,
            media_type="application/json",
            headers={"ETag": f'W/"{result.version}"', "Location": f"/api/v1/employees/{result.rid}"},
        )

    @router.get("/employees", summary="List employees (Practitioners)")
    def list_employees(
        request: Request,
        department: str | None = None,
        active: bool | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        access = allowed(request, "employees.read")

        def keep(res: dict[str, Any]) -> bool:
            emp = employee_view(res)
            return (
                (department is None or emp["department"] == department)
                and (active is None or emp["active"] == active)
                and access.permits(emp["id"], emp["department"])
            )

        after = cursor_after(cursor)
        page, nxt = wq.read(
            store, lambda tx: scan_page(wq.scan(tx, "Practitioner", (), after, first=limit + 1), keep, limit)
        )
        return {"items": [employee_view(r) for r in page], "next_cursor": nxt}

    @router.get("/employees/{employee_id}", summary="One employee")
    def get_employee(employee_id: str, request: Request) -> dict[str, Any]:
        access = allowed(request, "employees.read")
        res = wq.read(store, lambda tx: wq.get_record(tx, "Practitioner", employee_id))
        if res is None:
            raise Problem(404, "Not found", f"no employee {employee_id[:64]}")
        view = employee_view(res)
        access.require(view["id"], view["department"], "this employee")
        return view

    @router.post("/employees", status_code=201, summary="Create or update an employee by employee_number")
    async def create_employee(emp: EmployeeIn, request: Request) -> Response:
        return await write_employee(request, emp, None)

    @router.put("/employees/{employee_id}", summary="Replace an employee (If-Match for optimistic locking)")
    async def update_employee(employee_id: str, emp: EmployeeIn, request: Request) -> Response:
        return await write_employee(request, emp, employee_id)

    @router.get("/credentials", summary="Credentials, optionally only those expiring soon")
    def list_credentials(
        request: Request,
        expiring_within_days: int | None = Query(None, ge=0, le=3650),
        include_expired: bool = Query(False, description="with expiring_within_days: also list expired ones"),
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        access = allowed(request, "credentials.read")
        today = datetime.now(UTC).date()
        items = []
        for res in wq.read(store, lambda tx: wq.all_records(tx, "Practitioner")):
            emp = employee_view(res)
            if not access.permits(emp["id"], emp["department"]):
                continue
            for i, cred in enumerate(emp["credentials"]):
                days_left = rules.days_left(cred["valid_to"], today)
                if not rules.credential_due(days_left, expiring_within_days, include_expired):
                    continue
                items.append(
                    {
                        "key": f"{emp['id']}:{i:04d}",
                        "employee_id": emp["id"],
                        "employee_number": emp["employee_number"],
                        "name": emp["family"],
                        "department": emp["department"],
                        "days_left": days_left,
                        "expired": days_left is not None and days_left < 0,
                        **cred,
                    }
                )
        return _page(items, limit, cursor, key="key")

    # ------------------------------------------------------------------ shifts
    def require_shift(access: Access, shift: dict[str, Any]) -> None:
        """RoleDenied unless ``access`` covers the stored ``shift`` (its employee or department)."""
        view = shift_view(shift)
        access.require(view["employee_id"], view["department"], "this shift")

    def shift_plan(body: ShiftIn, shift_id: str | None) -> swap_rules.ShiftPlan:
        return swap_rules.ShiftPlan(
            start=body.start,
            end=body.end,
            status=body.status,
            shift_id=shift_id,
            employee_id=body.employee_id,
            role=body.role,
            department=body.department,
            location_id=body.location_id,
        )

    async def run_record(
        request: Request,
        what: str,
        raw: bytes,
        build: Callable[[Tx], RecordWrite],
        view: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Response:
        engine = running_pipeline(pipeline_of)
        meta = write_meta(request, what, raw)
        out = await run_write(engine, meta, _record_job(meta, build))
        if isinstance(out, Problem):
            raise out
        created = out.pop("created")
        return Response(
            orjson.dumps(view(out)), status_code=201 if created else 200, media_type="application/json"
        )

    @router.get("/shifts", summary="Shifts by employee, period and status")
    def list_shifts(
        request: Request,
        employee_id: str | None = None,
        status: str | None = None,
        start_from: Annotated[datetime | None, Query(description="shifts starting at or after")] = None,
        start_before: Annotated[datetime | None, Query(description="shifts starting before")] = None,
        unfilled: bool | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        try:
            access = allowed(request, "shifts.read")
            employee_id = narrowed(access, employee_id)
        except RoleDenied:  # denied reads are audited too (docs/audit.md)
            access_log.record_request(request, "search-type", "shifts", 403)
            raise
        lo = _query_time(start_from, "start_from")
        hi = _query_time(start_before, "start_before")

        def keep(res: dict[str, Any]) -> bool:  # the index narrows; this is the filter
            s = shift_view(res)
            if not (
                access.permits(s["employee_id"], s["department"])
                and (employee_id is None or s["employee_id"] == employee_id)
                and (status is None or s["status"] == status)
                and (unfilled is None or (s["employee_id"] is None) == unfilled)
            ):
                return False
            if lo is None and hi is None:
                return True
            st = datetime.fromisoformat(s["start"])
            return (lo is None or st >= lo) and (hi is None or st < hi)

        after = cursor_after(cursor)

        def page_of(tx: Tx) -> tuple[list[dict[str, Any]], str | None]:
            found = wq.scan_shifts(
                tx,
                employee_id=employee_id,
                status=status,
                unfilled=unfilled,
                start_from=lo,
                start_before=hi,
                after=after,
                first=limit + 1,
            )
            return scan_page(found, keep, limit)

        page, nxt = wq.read(store, page_of)
        items = [shift_view(s) for s in page]
        seen = [f"Shift/{s['id']}" for s in items]
        seen += [f"Practitioner/{s['employee_id']}" for s in items if s["employee_id"]]
        access_log.record_request(request, "search-type", "shifts", 200, seen, len(items))
        return {"items": items, "next_cursor": nxt}

    @router.post("/shifts", status_code=201, summary="Create (or, with the same shift_id, replace) a shift")
    async def create_shift(body: ShiftIn, request: Request) -> Response:
        access = allowed(request, "shifts.write")
        access.require(body.employee_id, body.department, "a shift of this department")

        def build(tx: Tx) -> RecordWrite:
            existing = None
            if body.shift_id:
                found = Repository(tx).find_by_key("Shift", SHIFT_SYSTEM, body.shift_id)
                existing = {**found[1], "id": found[0]} if found else None
            if existing is not None:
                require_shift(access, existing)
            return swap_rules.shift_record(wq.StoredRoster(tx), shift_plan(body, body.shift_id), existing)

        return await run_record(
            request, "shift", orjson.dumps(body.model_dump(mode="json")), build, shift_view
        )

    @router.put("/shifts/{shift_record_id}", summary="Replace a shift")
    async def update_shift(shift_record_id: str, body: ShiftIn, request: Request) -> Response:
        access = allowed(request, "shifts.write")
        access.require(body.employee_id, body.department, "a shift of this department")

        def build(tx: Tx) -> RecordWrite:
            roster = wq.StoredRoster(tx)
            existing = rules.existing_shift(roster, shift_record_id)
            require_shift(access, existing)
            return swap_rules.shift_record(
                roster, shift_plan(body, existing["identifier"][0]["value"]), existing
            )

        return await run_record(
            request, "shift", orjson.dumps(body.model_dump(mode="json")), build, shift_view
        )

    def swap_caller(request: Request, access: Access) -> swap_rules.SwapCaller:
        """The caller as the swap rules see it: its subject, own employees and scheduled departments."""
        caller = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
        return swap_rules.SwapCaller(
            subject=str(getattr(caller, "sub", "") or "unknown")[:200],
            own_ids=access.own_ids,
            any_department=access.unrestricted,
            departments=access.grant.departments,
        )

    @router.post("/shifts/{shift_record_id}/swap", summary="Ask to swap a shift to another employee")
    async def request_swap(shift_record_id: str, body: SwapIn, request: Request) -> Response:
        try:
            access = allowed(request, "swaps.request")
        except RoleDenied:  # a scheduler asks on behalf of its staff
            access = allowed(request, "swaps.decide")
        caller = swap_caller(request, access)

        def build(tx: Tx) -> RecordWrite:
            return swap_rules.swap_request(
                wq.StoredRoster(tx), shift_record_id, body.requested_by, body.replacement, caller
            )

        return await run_record(request, "shift swap", orjson.dumps(body.model_dump()), build, shift_view)

    @router.post("/shifts/{shift_record_id}/swap/decision", summary="Approve or reject a swap request")
    async def decide_swap(shift_record_id: str, body: SwapDecision, request: Request) -> Response:
        caller = swap_caller(request, allowed(request, "swaps.decide"))

        def build(tx: Tx) -> RecordWrite:
            return swap_rules.swap_decision(wq.StoredRoster(tx), shift_record_id, body.approve, caller)

        return await run_record(
            request, "shift swap decision", orjson.dumps(body.model_dump()), build, shift_view
        )

    # ------------------------------------------------------------------ timecards
    @router.post("/timecards", status_code=201, summary="Record a worked period from clock-in/clock-out")
    async def create_timecard(body: TimecardIn, request: Request) -> Response:
        allowed(request, "timecards.write").require(body.employee_id, body.department, "this timecard")
        clock_in, clock_out = timecard_rules.check_clock_times(body.clock_in, body.clock_out)
        period = timecard_rules.ClockedPeriod(
            employee_id=body.employee_id,
            clock_in=clock_in,
            clock_out=clock_out,
            timecard_id=body.timecard_id,
            shift_id=body.shift_id,
            department=body.department,
        )

        def build(tx: Tx) -> RecordWrite:
            return timecard_rules.timecard_record(wq.StoredRoster(tx), period)

        return await run_record(
            request, "timecard", orjson.dumps(body.model_dump(mode="json")), build, timecard_view
        )

    @router.post("/timecards/clock-in", status_code=201, summary="A kiosk clock-in: opens a timecard")
    async def clock_in(body: ClockEventIn, request: Request) -> Response:
        allowed(request, "timecards.write").require(body.employee_id, body.department, "this timecard")
        at = rules.aware(body.at, "at")

        def build(tx: Tx) -> RecordWrite:
            try:
                return timecard_rules.clock_in_record(
                    wq.StoredRoster(tx),
                    body.employee_id,
                    at,
                    body.timecard_id,
                    body.shift_id,
                    body.department,
                )
            except rules.RuleBroken as exc:
                exc.field = {**timecard_rules.TIMECARD_FIELDS, "clockIn": "at"}.get(exc.element, exc.element)
                raise

        return await run_record(
            request, "clock-in", orjson.dumps(body.model_dump(mode="json")), build, timecard_view
        )

    @router.post("/timecards/clock-out", summary="A kiosk clock-out: closes the employee's open timecard")
    async def clock_out(body: ClockEventIn, request: Request) -> Response:
        allowed(request, "timecards.write").require(body.employee_id, body.department, "this timecard")
        at = rules.aware(body.at, "at")

        def build(tx: Tx) -> RecordWrite:
            try:
                return timecard_rules.clock_out_record(wq.StoredRoster(tx), body.employee_id, at)
            except rules.RuleBroken as exc:
                exc.field = {**timecard_rules.TIMECARD_FIELDS, "clockOut": "at"}.get(exc.element, exc.element)
                raise

        return await run_record(
            request, "clock-out", orjson.dumps(body.model_dump(mode="json")), build, timecard_view
        )

    @router.get("/timecards", summary="Timecards by employee")
    def list_timecards(
        request: Request,
        employee_id: str | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        access = allowed(request, "timecards.read")
        employee_id = narrowed(access, employee_id)

        def keep(res: dict[str, Any]) -> bool:
            card = timecard_view(res)
            return access.permits(card["employee_id"], card["department"]) and (
                employee_id is None or card["employee_id"] == employee_id
            )

        after = cursor_after(cursor)

        def page_of(tx: Tx) -> tuple[list[dict[str, Any]], str | None, dict[str, int]]:
            found = wq.scan_timecards(tx, employee_id=employee_id, after=after, first=limit + 1)
            cards, nxt = scan_page(found, keep, limit)
            return cards, nxt, overtime_of_page(tx, cards)

        cards, nxt, overtime = wq.read(store, page_of)
        items = [{**timecard_view(t), "overtime_minutes": overtime.get(str(t.get("id")), 0)} for t in cards]
        return {"items": items, "next_cursor": nxt}

    # ------------------------------------------------------------------ compliance and audit
    @router.get(
        "/compliance/status",
        summary="Staff, credentials, shifts, hours, overtime and its cost, rule violations and offboardings "
        "by department",
    )
    def compliance_status(
        request: Request,
        expiring_within_days: int = Query(30, ge=0, le=3650),
        department: str | None = Query(
            None,
            max_length=255,
            description="One department: an Organization identifier value, name or alias (or the text "
            "as stored, for a department that names no Organization)",
        ),
        period_from: datetime | None = from_q,
        period_to: datetime | None = to_q,
    ) -> dict[str, Any]:
        access = allowed(request, "compliance.read")
        if not access.unrestricted:  # a report over everyone
            raise RoleDenied("the compliance report covers every department", access.action)
        period = Period(_query_time(period_from, "from"), _query_time(period_to, "to"))
        if period.start and period.end and period.end <= period.start:
            wrong = rules.InvalidRequest(
                "Invalid request", "'to' must be after 'from'", "to", "not after 'from'"
            )
            raise rule_problem(wrong, "query")
        now = datetime.now(UTC)

        def gather(tx: Tx) -> Inputs:
            # a report over everyone: every employee, Organization and timecard is read; of the shifts
            # only those without an employee (the index tells which) and those the timecards link to
            timecards = wq.all_records(tx, "Timecard")
            linked = [r.split("/", 1)[1] for r in linked_shift_refs(timecards)]
            return Inputs(
                staff=wq.all_records(tx, "Practitioner"),
                unfilled=wq.unassigned_shifts(tx),
                timecards=timecards,
                alerts=list(wq.credential_alerts(tx)),
                scan_run=wq.job_run(tx, CREDENTIAL_SCAN_JOB),
                organizations=wq.all_records(tx, "Organization"),
                linked_shifts=wq.records_by_id(tx, "Shift", linked),
                offboardings=wq.offboardings(tx, period.start, period.end),
                violations=wq.rule_violations(tx, period.start, period.end),
            )

        figures = compliance(wq.read(store, gather), now, expiring_within_days, period, department)
        return {
            "as_of": iso(now),
            "expiring_within_days": expiring_within_days,
            "period": {
                "from": iso(period.start) if period.start else None,
                "to": iso(period.end) if period.end else None,
            },
            "department": department,
            "departments": figures.departments,
            "totals": figures.totals,
            "rule_violations": figures.rule_violations,
            "credential_scan": figures.credential_scan,
        }

    @router.get("/audit", summary="The audit trail, filtered by entity (Practitioner/123), agent and time")
    def list_audit(
        request: Request,
        entity: str | None = Query(None, description="Type/id or a type"),
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        allowed(request, "audit.read")
        after = 0
        if cursor:
            if not cursor.isdigit():
                raise _bad_cursor()
            after = int(cursor)
        lo, hi = _query_time(since, "since"), _query_time(until, "until")
        q = audit.AuditQuery(
            entity=entity,
            agent=agent,
            since=audit.instant(lo) if lo else None,
            until=audit.instant(hi) if hi else None,
            after_seq=after,
            limit=limit,
        )
        rows, nxt = wq.read(store, lambda tx: audit.search(tx, q))
        return {"items": rows, "next_cursor": str(nxt) if nxt is not None else None}

    return router


__all__ = ["Problem", "rule_problem", "workforce_router"]
