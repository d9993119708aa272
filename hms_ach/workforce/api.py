"""The workforce REST API under /api/v1: employees, credentials, shifts, timecards, compliance, audit.

Plain JSON for the personnel and rostering systems that do not speak FHIR. Every write goes
through the engine's group-commit writer as one job that also stores the request in the message
store (channel ``api``): employees are written as FHIR Practitioners through the FHIR mappings
(the same path as the fhir_rest channel), shifts and timecards as canonical ``Shift`` /
``Timecard`` records. Every change therefore has its history version and its audit entry.

Conventions:

* lists take ``limit`` (1-200, default 50) and ``cursor`` (opaque; the ``next_cursor`` of the
  previous page) and answer ``{"items": [...], "next_cursor": ...}``;
* errors are RFC 9457 problem details (``application/problem+json``) whose ``errors`` list each
  failing field with its location (``body.clock_out``, ``query.limit``).

Overtime rule: minutes over ``HMS_ACH_OVERTIME_DAILY_HOURS`` (default 8) in one UTC day or over
``HMS_ACH_OVERTIME_WEEKLY_HOURS`` (default 40) in one ISO week, whichever is more, counted on the
timecard that crosses the line, in clock-in order. Lists and the compliance figures compute it
when read, so timecards from every source (this API, CSV files, FHIR) follow the same rule.

Reads go through the search index (see :mod:`hms_ach.store.workforce_queries`): an overlap check
reads the shifts of one employee around the new shift, a timecard the employee's timecards of its
ISO week, and a list page only the records it shows (plus, for timecards, the weeks they fall in).
Only the compliance figures, a report over everyone, read every employee and timecard.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select
from starlette.responses import Response

from hms_ach.core.records import RecordWrite
from hms_ach.fhir.outcomes import FhirError
from hms_ach.fhir.write import VERIFICATION_EXT, Operation, prepare, request_job
from hms_ach.store import audit, messages
from hms_ach.store import workforce_queries as wq
from hms_ach.store.db import Store
from hms_ach.store.models import CredentialAlert, JobRun
from hms_ach.store.repository import Repository
from hms_ach.workforce.credentials import current_expiries

STAFF_SYSTEM = "urn:hms-ach:id:staff"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SHIFT_SYSTEM = "urn:hms-ach:id:shift"
TIMECARD_SYSTEM = "urn:hms-ach:id:timecard"
CREDENTIAL_SYSTEM = "urn:hms-ach:code:credential-type"
DEPARTMENT_EXT = "urn:hms-ach:fhir:StructureDefinition/department"
SOURCE_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-source"
STATE_EXT = "urn:hms-ach:fhir:StructureDefinition/issuing-state"
PROBLEM_JSON = "application/problem+json"
API_CHANNEL = "api"
CREDENTIAL_ALERTS = CredentialAlert.__table__  # type: ignore[attr-defined]
JOB_RUNS = JobRun.__table__  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- problem details
class Problem(Exception):
    """An RFC 9457 problem details answer."""

    def __init__(self, status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []
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
        if self.errors:
            body["errors"] = self.errors
        return Response(orjson.dumps(body), status_code=self.status, media_type=PROBLEM_JSON)


def _field_errors(errors: list[Any], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "location": ".".join(str(p) for p in (*prefix, *e.get("loc", ()))),
            "detail": e.get("msg", "invalid"),
        }
        for e in errors[:20]
    ]


class ProblemRoute(APIRoute):
    """Routes whose errors (validation, Problem, FhirError from the write path) are problem details."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Problem as exc:
                return exc.response(request.url.path)
            except RequestValidationError as exc:
                return Problem(
                    422,
                    "Invalid request",
                    "the request does not match its schema",
                    _field_errors(list(exc.errors())),
                ).response(request.url.path)
            except FhirError as exc:
                errors = [{"location": exc.expression, "detail": exc.diagnostics}] if exc.expression else []
                return Problem(
                    exc.status, exc.code.replace("-", " ").capitalize(), exc.diagnostics, errors
                ).response(request.url.path)

        return guarded


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


class ShiftIn(BaseModel):
    shift_id: str | None = Field(None, description="Your id of the shift; a new one is made when empty")
    employee_id: str | None = Field(None, description="Practitioner id; empty: an unfilled shift")
    role: str | None = None
    department: str | None = None
    location_id: str | None = Field(None, description="Location id")
    start: datetime = Field(description="Start, with a UTC offset")
    end: datetime = Field(description="End, with a UTC offset; after start")
    status: Literal["planned", "confirmed", "swapped", "cancelled"] = "planned"


class SwapIn(BaseModel):
    requested_by: str = Field(description="Practitioner id of the employee asking")
    replacement: str = Field(description="Practitioner id of the employee who would take the shift")


class SwapDecision(BaseModel):
    approve: bool
    decided_by: str | None = None


class TimecardIn(BaseModel):
    timecard_id: str | None = None
    employee_id: str = Field(description="Practitioner id")
    clock_in: datetime
    clock_out: datetime
    shift_id: str | None = Field(None, description="The Shift record id worked, if any")
    department: str | None = None


# ---------------------------------------------------------------------------- conversions
def _aware(value: datetime, where: str) -> datetime:
    if value.tzinfo is None:
        raise Problem(
            422,
            "Invalid request",
            "times need a UTC offset",
            [{"location": where, "detail": "no UTC offset"}],
        )
    return value


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


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


def _ext(obj: dict[str, Any], url: str) -> Any:
    for e in obj.get("extension") or []:
        if e.get("url") == url:
            return e.get("valueString", e.get("valueCode"))
    return None


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
                "state": _ext(q, STATE_EXT),
                "valid_from": period.get("start"),
                "valid_to": period.get("end"),
                "verification_status": _ext(q, VERIFICATION_EXT),
                "verification_source": _ext(q, SOURCE_EXT),
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
        "department": _ext(res, DEPARTMENT_EXT),
        "credentials": credentials_of(res),
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


# ---------------------------------------------------------------------------- store helpers
def _credential_scan(
    staff: list[dict[str, Any]],
    alerts: list[Any],
    scan_run: Any,
    now: datetime,
    dept: Callable[[str | None], dict[str, Any]],
) -> dict[str, Any]:
    """What the credential-expiry scan (hms_ach/workforce/credentials.py) found: its last run, and its alerts.

    An alert is open while the practitioner still holds that credential with that end date; one
    whose licence was renewed (a new end date) or removed is counted as raised but not open. Open
    alerts are added to their practitioner's department as ``credential_alerts`` by threshold.
    """
    people = {str(res.get("id")): res for res in staff}
    raised: dict[str, int] = {}
    open_: dict[str, int] = {}
    recent = 0
    for alert in alerts:
        threshold = str(alert.threshold)
        raised[threshold] = raised.get(threshold, 0) + 1
        created = alert.created_at if alert.created_at.tzinfo else alert.created_at.replace(tzinfo=UTC)
        recent += created > now - timedelta(days=1)
        res = people.get(str(alert.practitioner_id))
        if res is None or (str(alert.credential), str(alert.expires)) not in current_expiries(res):
            continue
        open_[threshold] = open_.get(threshold, 0) + 1
        counts = dept(employee_view(res)["department"])["credential_alerts"]
        counts[threshold] = counts.get(threshold, 0) + 1
    last = None
    if scan_run is not None:
        last = {
            "status": scan_run.status,
            "started_at": _iso(scan_run.started_at) if scan_run.started_at else None,
            "finished_at": _iso(scan_run.finished_at) if scan_run.finished_at else None,
            "detail": scan_run.detail,
        }
    last_alert = max((a.created_at for a in alerts), default=None)
    return {
        "last_run": last,
        "alerts_raised": sum(raised.values()),
        "raised_by_threshold": dict(sorted(raised.items())),
        "raised_last_24h": recent,
        "open_by_threshold": dict(sorted(open_.items())),
        "last_alert_at": _iso(last_alert) if last_alert else None,
    }


_get = wq.get_record
_records = wq.all_records


def _after(cursor: str | None) -> str:
    """The last key served, from a ``next_cursor`` this API gave out."""
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor.encode() + b"==").decode()
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            400,
            "Invalid cursor",
            "the cursor is not one this API gave out",
            [{"location": "query.cursor", "detail": "unknown cursor"}],
        ) from None


def _cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def _page(items: list[dict[str, Any]], limit: int, cursor: str | None, key: str = "id") -> dict[str, Any]:
    """Keyset page over ``items`` sorted by ``key``: the cursor carries the last key served."""
    after = _after(cursor)
    items = sorted((i for i in items if str(i[key]) > after), key=lambda i: str(i[key]))
    page = items[:limit]
    return {"items": page, "next_cursor": _cursor(page[-1][key]) if len(items) > limit else None}


def _scan_page(
    conn: Connection,
    rtype: str,
    conds: list[Any],
    keep: Callable[[dict[str, Any]], bool],
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A keyset page (by record id) of the records meeting the index conditions ``conds`` and ``keep``.

    The conditions narrow in SQL, ``keep`` decides (the exact rule), and the scan stops once it has
    one record more than the page; without filters that is ``limit + 1`` rows."""
    found: list[dict[str, Any]] = []
    for res in wq.scan(conn, rtype, conds, _after(cursor), first=limit + 1):
        if keep(res):
            found.append(res)
            if len(found) > limit:
                break
    page = found[:limit]
    return page, _cursor(page[-1]["id"]) if len(found) > limit else None


def _meta(request: Request, what: str, body: bytes) -> messages.MessageMeta:
    client = request.headers.get("x-client-id", "")[:200]
    return messages.MessageMeta(
        channel=API_CHANNEL,
        raw=body,
        content_type="json",
        message_type=what[:50],
        control_id=request.headers.get("x-request-id", "")[:200] or str(uuid.uuid4()),
        sending_application=client,
    )


def _engine(request: Request) -> Any:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise Problem(503, "Writes unavailable", "this API runs without an engine; writes need `hms-ach run`")
    return engine


# ---------------------------------------------------------------------------- validators
def _employee(
    conn: Connection, employee_id: str, title: str, where: str, detail: str | None = None
) -> dict[str, Any]:
    """The Practitioner ``employee_id`` (by primary key), or a 422 problem at ``where``."""
    res = _get(conn, "Practitioner", employee_id)
    if res is None:
        raise Problem(
            422,
            title,
            detail or f"no employee {employee_id[:64]}",
            [{"location": where, "detail": "unknown employee"}],
        )
    return res


def _no_overlap(
    conn: Connection, ref: str, start: datetime, end: datetime, skip: str | None, who: str, where: str
) -> None:
    """A 422 problem at ``where`` when ``ref`` already works another shift during [start, end)."""
    clash = wq.shift_overlap(conn, ref, start, end, skip)
    if clash:
        raise Problem(
            422,
            "Overlapping shift",
            f"the {who} already works shift {clash} then",
            [{"location": where, "detail": f"overlaps shift {clash}"}],
        )


def _shift(conn: Connection, shift_record_id: str) -> dict[str, Any]:
    existing = _get(conn, "Shift", shift_record_id)
    if existing is None:
        raise Problem(404, "Not found", f"no shift {shift_record_id[:64]}")
    return existing


def overtime_minutes(prior_day: int, prior_week: int, worked: int) -> int:
    daily = int(float(os.environ.get("HMS_ACH_OVERTIME_DAILY_HOURS", "8")) * 60)
    weekly = int(float(os.environ.get("HMS_ACH_OVERTIME_WEEKLY_HOURS", "40")) * 60)
    day = max(0, prior_day + worked - daily) - max(0, prior_day - daily)
    week = max(0, prior_week + worked - weekly) - max(0, prior_week - weekly)
    return max(day, week)


def overtime_by_timecard(timecards: list[dict[str, Any]]) -> dict[str, int]:
    """Overtime minutes of every timecard (by record id), whatever wrote it (API, CSV, FHIR):
    each employee's timecards are taken in clock-in order and the rule is applied to the minutes
    already worked that UTC day and ISO week, so the timecard that crosses the line carries it."""
    per_employee: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
    for tc in timecards:
        ref = (tc.get("practitioner") or {}).get("reference") or ""
        try:
            start = datetime.fromisoformat(str(tc.get("clockIn"))).astimezone(UTC)
        except ValueError:
            continue
        per_employee.setdefault(ref, []).append((start, tc))
    out: dict[str, int] = {}
    for cards in per_employee.values():
        cards.sort(key=lambda item: item[0])
        by_day: dict[date, int] = {}
        by_week: dict[tuple[int, int], int] = {}
        for start, tc in cards:
            worked = int(tc.get("workedMinutes") or 0)
            iso = start.isocalendar()
            day, week = start.date(), (iso.year, iso.week)
            out[str(tc.get("id"))] = overtime_minutes(by_day.get(day, 0), by_week.get(week, 0), worked)
            by_day[day] = by_day.get(day, 0) + worked
            by_week[week] = by_week.get(week, 0) + worked
    return out


def _ref(tc: dict[str, Any]) -> str:
    return (tc.get("practitioner") or {}).get("reference") or ""


def overtime_of_page(conn: Connection, cards: list[dict[str, Any]]) -> dict[str, int]:
    """:func:`overtime_by_timecard` for ``cards`` only: per employee, it reads the timecards of the
    ISO weeks those cards fall in (the rule never looks beyond a card's week), not every timecard."""
    weeks: dict[str, set[datetime]] = {}
    for tc in cards:
        try:
            start = datetime.fromisoformat(str(tc.get("clockIn"))).astimezone(UTC)
        except ValueError:
            continue
        weeks.setdefault(_ref(tc), set()).add(wq.week_start(start))
    out: dict[str, int] = {}
    for ref, starts in weeks.items():
        context = [tc for tc in wq.timecards_in_weeks(conn, ref or None, starts) if _ref(tc) == ref]
        out.update(overtime_by_timecard(context))
    return out


def _record_job(meta: messages.MessageMeta, build: Callable[[Connection], RecordWrite]) -> Any:
    """A writer job: store the request, build the record inside the transaction (so checks such as
    overlaps see every committed shift), upsert it with history and audit."""

    def job(conn: Connection) -> dict[str, Any] | Problem:
        message_id = messages.insert_message(conn, meta, keyed=False)
        sp = conn.begin_nested()
        try:
            rec = build(conn)
            out = Repository(conn).upsert(rec, rec.content, message_id)
            assert out is not None
            sp.commit()
        except Problem as exc:
            sp.rollback()
            messages.finish(conn, message_id, "error", str(exc.status), None, error=exc.detail)
            return exc
        messages.finish(conn, message_id, "processed", "201" if out.created else "200", out.reference)
        return {"created": out.created, **(_get(conn, out.resource_type, out.id) or {})}

    return job


# ---------------------------------------------------------------------------- router
def workforce_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["workforce"], route_class=ProblemRoute)
    limit_q = Query(50, ge=1, le=200, description="Page size")
    cursor_q = Query(None, description="next_cursor of the previous page")

    def read(fn: Callable[[Connection], Any]) -> Any:
        with store.reader.connect() as conn:
            return fn(conn)

    async def write_employee(request: Request, emp: EmployeeIn, rid: str | None) -> Response:
        engine = _engine(request)
        res = practitioner_json(emp)
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
        prepare(op, engine.pipeline.engine)
        raw = orjson.dumps(emp.model_dump(mode="json"))
        outcome = await engine.writer.run(request_job(_meta(request, "employee", raw), [op], "single"))
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
        department: str | None = None,
        active: bool | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        def keep(res: dict[str, Any]) -> bool:
            emp = employee_view(res)
            return (department is None or emp["department"] == department) and (
                active is None or emp["active"] == active
            )

        page, nxt = read(lambda c: _scan_page(c, "Practitioner", [], keep, limit, cursor))
        return {"items": [employee_view(r) for r in page], "next_cursor": nxt}

    @router.get("/employees/{employee_id}", summary="One employee")
    def get_employee(employee_id: str) -> dict[str, Any]:
        res = read(lambda c: _get(c, "Practitioner", employee_id))
        if res is None:
            raise Problem(404, "Not found", f"no employee {employee_id[:64]}")
        return employee_view(res)

    @router.post("/employees", status_code=201, summary="Create or update an employee by employee_number")
    async def create_employee(emp: EmployeeIn, request: Request) -> Response:
        return await write_employee(request, emp, None)

    @router.put("/employees/{employee_id}", summary="Replace an employee (If-Match for optimistic locking)")
    async def update_employee(employee_id: str, emp: EmployeeIn, request: Request) -> Response:
        return await write_employee(request, emp, employee_id)

    @router.get("/credentials", summary="Credentials, optionally only those expiring soon")
    def list_credentials(
        expiring_within_days: int | None = Query(None, ge=0, le=3650),
        include_expired: bool = Query(False, description="with expiring_within_days: also list expired ones"),
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        today = datetime.now(UTC).date()
        items = []
        for res in read(lambda c: _records(c, "Practitioner")):
            emp = employee_view(res)
            for i, cred in enumerate(emp["credentials"]):
                end = date.fromisoformat(cred["valid_to"][:10]) if cred["valid_to"] else None
                days_left = (end - today).days if end else None
                if expiring_within_days is not None:
                    if days_left is None or days_left > expiring_within_days:
                        continue
                    if days_left < 0 and not include_expired:
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
    def shift_record(body: ShiftIn, conn: Connection, existing: dict[str, Any] | None) -> RecordWrite:
        start, end = _aware(body.start, "body.start"), _aware(body.end, "body.end")
        if end <= start:
            raise Problem(
                422,
                "Invalid shift",
                "the shift ends before it starts",
                [{"location": "body.end", "detail": "must be after start"}],
            )
        content: dict[str, Any] = {
            "resourceType": "Shift",
            "start": _iso(start),
            "end": _iso(end),
            "status": body.status,
        }
        shift_id = (
            body.shift_id or (existing or {}).get("identifier", [{}])[0].get("value") or str(uuid.uuid4())
        )
        content["identifier"] = [{"system": SHIFT_SYSTEM, "value": shift_id}]
        if body.employee_id:
            _employee(conn, body.employee_id, "Invalid shift", "body.employee_id")
            ref = f"Practitioner/{body.employee_id}"
            content["practitioner"] = {"reference": ref}
            if body.status != "cancelled":
                _no_overlap(conn, ref, start, end, (existing or {}).get("id"), "employee", "body.start")
        if body.role:
            content["role"] = {"text": body.role}
        if body.department:
            content["department"] = {"display": body.department}
        if body.location_id:
            content["location"] = {"reference": f"Location/{body.location_id}"}
        if existing and existing.get("swapRequest"):
            content["swapRequest"] = existing["swapRequest"]
        return RecordWrite("shift", "Shift", SHIFT_SYSTEM, shift_id, content, mode="replace")

    async def run_record(
        request: Request,
        what: str,
        raw: bytes,
        build: Callable[[Connection], RecordWrite],
        view: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Response:
        engine = _engine(request)
        out = await engine.writer.run(_record_job(_meta(request, what, raw), build))
        if isinstance(out, Problem):
            raise out
        created = out.pop("created")
        return Response(
            orjson.dumps(view(out)), status_code=201 if created else 200, media_type="application/json"
        )

    @router.get("/shifts", summary="Shifts by employee, period and status")
    def list_shifts(
        employee_id: str | None = None,
        status: str | None = None,
        start_from: Annotated[datetime | None, Query(description="shifts starting at or after")] = None,
        start_before: Annotated[datetime | None, Query(description="shifts starting before")] = None,
        unfilled: bool | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        lo = _aware(start_from, "query.start_from") if start_from is not None else None
        hi = _aware(start_before, "query.start_before") if start_before is not None else None

        def conds(dialect: str) -> list[Any]:  # the index narrows; keep() below is the rule
            out = []
            if employee_id is not None:
                out.append(wq.assigned_to("Shift", employee_id, dialect))
            if status is not None:
                out.append(wq.with_status("Shift", status))
            if unfilled:
                out.append(wq.owned_by("Shift", None, dialect))
            if lo is not None or hi is not None:
                out.append(wq.starts_within("Shift", [(lo, hi)], narrowed=bool(out)))
            return out

        def keep(res: dict[str, Any]) -> bool:
            s = shift_view(res)
            if not (
                (employee_id is None or s["employee_id"] == employee_id)
                and (status is None or s["status"] == status)
                and (unfilled is None or (s["employee_id"] is None) == unfilled)
            ):
                return False
            if lo is None and hi is None:
                return True
            st = datetime.fromisoformat(s["start"])
            return (lo is None or st >= lo) and (hi is None or st < hi)

        page, nxt = read(lambda c: _scan_page(c, "Shift", conds(c.dialect.name), keep, limit, cursor))
        return {"items": [shift_view(s) for s in page], "next_cursor": nxt}

    @router.post("/shifts", status_code=201, summary="Create (or, with the same shift_id, replace) a shift")
    async def create_shift(body: ShiftIn, request: Request) -> Response:
        def build(conn: Connection) -> RecordWrite:
            existing = None
            if body.shift_id:
                found = Repository(conn).find_by_key("Shift", SHIFT_SYSTEM, body.shift_id)
                existing = {**found[1], "id": found[0]} if found else None
            return shift_record(body, conn, existing)

        return await run_record(
            request, "shift", orjson.dumps(body.model_dump(mode="json")), build, shift_view
        )

    @router.put("/shifts/{shift_record_id}", summary="Replace a shift")
    async def update_shift(shift_record_id: str, body: ShiftIn, request: Request) -> Response:
        def build(conn: Connection) -> RecordWrite:
            existing = _shift(conn, shift_record_id)
            body.shift_id = existing["identifier"][0]["value"]
            return shift_record(body, conn, existing)

        return await run_record(
            request, "shift", orjson.dumps(body.model_dump(mode="json")), build, shift_view
        )

    @router.post("/shifts/{shift_record_id}/swap", summary="Ask to swap a shift to another employee")
    async def request_swap(shift_record_id: str, body: SwapIn, request: Request) -> Response:
        def build(conn: Connection) -> RecordWrite:
            existing = _shift(conn, shift_record_id)
            _employee(conn, body.replacement, "Invalid swap", "body.replacement", "unknown replacement")
            content = {k: v for k, v in existing.items() if k not in ("id", "meta")}
            content["swapRequest"] = {
                "requestedBy": {"reference": f"Practitioner/{body.requested_by}"},
                "replacement": {"reference": f"Practitioner/{body.replacement}"},
                "status": "requested",
                "requestedAt": _iso(datetime.now(UTC)),
            }
            return RecordWrite(
                "shift", "Shift", SHIFT_SYSTEM, existing["identifier"][0]["value"], content, mode="replace"
            )

        return await run_record(request, "shift swap", orjson.dumps(body.model_dump()), build, shift_view)

    @router.post("/shifts/{shift_record_id}/swap/decision", summary="Approve or reject a swap request")
    async def decide_swap(shift_record_id: str, body: SwapDecision, request: Request) -> Response:
        def build(conn: Connection) -> RecordWrite:
            existing = _shift(conn, shift_record_id)
            swap = existing.get("swapRequest") or {}
            if swap.get("status") != "requested":
                raise Problem(
                    409, "No open swap request", "this shift has no swap request waiting for a decision"
                )
            content = {k: v for k, v in existing.items() if k not in ("id", "meta")}
            swap = {
                **swap,
                "status": "approved" if body.approve else "rejected",
                "decidedAt": _iso(datetime.now(UTC)),
            }
            if body.decided_by:
                swap["decidedBy"] = body.decided_by
            if body.approve:
                ref = swap["replacement"]["reference"]
                _no_overlap(
                    conn,
                    ref,
                    datetime.fromisoformat(existing["start"]),
                    datetime.fromisoformat(existing["end"]),
                    existing["id"],
                    "replacement",
                    "body.approve",
                )
                content["practitioner"] = {"reference": ref}
                content["status"] = "swapped"
            content["swapRequest"] = swap
            return RecordWrite(
                "shift", "Shift", SHIFT_SYSTEM, existing["identifier"][0]["value"], content, mode="replace"
            )

        return await run_record(
            request, "shift swap decision", orjson.dumps(body.model_dump()), build, shift_view
        )

    # ------------------------------------------------------------------ timecards
    @router.post("/timecards", status_code=201, summary="Record a worked period from clock-in/clock-out")
    async def create_timecard(body: TimecardIn, request: Request) -> Response:
        clock_in, clock_out = _aware(body.clock_in, "body.clock_in"), _aware(body.clock_out, "body.clock_out")
        if clock_out <= clock_in:
            raise Problem(
                422,
                "Invalid timecard",
                "the timecard clocks out before it clocks in",
                [{"location": "body.clock_out", "detail": "must be after clock_in"}],
            )

        def build(conn: Connection) -> RecordWrite:
            emp = _employee(conn, body.employee_id, "Invalid timecard", "body.employee_id")
            ref = f"Practitioner/{body.employee_id}"
            tc_id = body.timecard_id or str(uuid.uuid4())
            day, week = clock_in.astimezone(UTC).date(), clock_in.astimezone(UTC).isocalendar()[:2]
            prior_day = prior_week = 0
            # the employee's timecards clocking in earlier in the same ISO week (the day is in it)
            for tc in wq.practitioner_timecards(conn, ref, [(wq.week_start(clock_in), clock_in)]):
                if (tc.get("practitioner") or {}).get("reference") != ref:
                    continue
                if (tc.get("identifier") or [{}])[0].get("value") == tc_id:
                    continue
                t_in = datetime.fromisoformat(tc["clockIn"]).astimezone(UTC)
                if t_in >= clock_in:
                    continue  # the rule is applied in clock-in order (see overtime_by_timecard)
                if t_in.date() == day:
                    prior_day += int(tc.get("workedMinutes", 0))
                if t_in.isocalendar()[:2] == week:
                    prior_week += int(tc.get("workedMinutes", 0))
            worked = int((clock_out - clock_in) / timedelta(minutes=1))
            content: dict[str, Any] = {
                "resourceType": "Timecard",
                "identifier": [{"system": TIMECARD_SYSTEM, "value": tc_id}],
                "practitioner": {"reference": ref},
                "clockIn": _iso(clock_in),
                "clockOut": _iso(clock_out),
                "workedMinutes": worked,
                "overtimeMinutes": overtime_minutes(prior_day, prior_week, worked),
                "department": body.department or _ext(emp, DEPARTMENT_EXT),
            }
            if body.shift_id:
                content["shift"] = {"reference": f"Shift/{body.shift_id}"}
            return RecordWrite(
                "timecard",
                "Timecard",
                TIMECARD_SYSTEM,
                tc_id,
                {k: v for k, v in content.items() if v is not None},
                mode="replace",
            )

        return await run_record(
            request, "timecard", orjson.dumps(body.model_dump(mode="json")), build, timecard_view
        )

    @router.get("/timecards", summary="Timecards by employee")
    def list_timecards(
        employee_id: str | None = None, limit: int = limit_q, cursor: str | None = cursor_q
    ) -> dict[str, Any]:
        def keep(res: dict[str, Any]) -> bool:
            return employee_id is None or timecard_view(res)["employee_id"] == employee_id

        def page_of(conn: Connection) -> tuple[list[dict[str, Any]], str | None, dict[str, int]]:
            conds = (
                [wq.assigned_to("Timecard", employee_id, conn.dialect.name)]
                if employee_id is not None
                else []
            )
            cards, nxt = _scan_page(conn, "Timecard", conds, keep, limit, cursor)
            return cards, nxt, overtime_of_page(conn, cards)

        cards, nxt, overtime = read(page_of)
        items = [{**timecard_view(t), "overtime_minutes": overtime.get(str(t.get("id")), 0)} for t in cards]
        return {"items": items, "next_cursor": nxt}

    # ------------------------------------------------------------------ compliance and audit
    @router.get(
        "/compliance/status", summary="Active staff, credential, shift and overtime counts by department"
    )
    def compliance_status(expiring_within_days: int = Query(30, ge=0, le=3650)) -> dict[str, Any]:
        now = datetime.now(UTC)
        today = now.date()

        def gather(conn: Connection) -> tuple[list[Any], list[Any], list[Any], list[Any], Any]:
            alerts = list(conn.execute(select(CREDENTIAL_ALERTS).order_by(CREDENTIAL_ALERTS.c.id)).all())
            scan_run = conn.execute(select(JOB_RUNS).where(JOB_RUNS.c.name == "credential_expiry")).first()
            # a report over everyone: every employee and timecard is read; of the shifts only those
            # without an employee (the index tells which)
            return (
                _records(conn, "Practitioner"),
                wq.unassigned_shifts(conn),
                _records(conn, "Timecard"),
                alerts,
                scan_run,
            )

        staff, shifts, timecards, alerts, scan_run = read(gather)
        by: dict[str, dict[str, Any]] = {}

        def dept(name: str | None) -> dict[str, Any]:
            return by.setdefault(
                name or "(none)",
                {
                    "active_staff": 0,
                    "expired_credentials": 0,
                    "expiring_credentials": 0,
                    "unfilled_shifts": 0,
                    "overtime_hours": 0.0,
                    "credential_alerts": {},
                },
            )

        for res in staff:
            emp = employee_view(res)
            d = dept(emp["department"])
            if not emp["active"]:
                continue
            d["active_staff"] += 1
            for cred in emp["credentials"]:
                if not cred["valid_to"]:
                    continue
                left = (date.fromisoformat(cred["valid_to"][:10]) - today).days
                if left < 0:
                    d["expired_credentials"] += 1
                elif left <= expiring_within_days:
                    d["expiring_credentials"] += 1
        for s in shifts:
            if (
                s.get("practitioner") is None
                and s.get("status") != "cancelled"
                and datetime.fromisoformat(s["end"]) > now
            ):
                dept((s.get("department") or {}).get("display"))["unfilled_shifts"] += 1
        overtime = overtime_by_timecard(timecards)
        for tc in timecards:
            dept(tc.get("department"))["overtime_hours"] += round(overtime.get(str(tc.get("id")), 0) / 60, 2)
        totals: dict[str, Any] = {
            k: sum(d[k] for d in by.values())
            for k in (
                "active_staff",
                "expired_credentials",
                "expiring_credentials",
                "unfilled_shifts",
                "overtime_hours",
            )
        }
        scan = _credential_scan(staff, alerts, scan_run, now, dept)
        totals["credential_alerts"] = scan["open_by_threshold"]
        return {
            "as_of": _iso(now),
            "expiring_within_days": expiring_within_days,
            "departments": dict(sorted(by.items())),
            "totals": totals,
            "credential_scan": scan,
        }

    @router.get("/audit", summary="The audit trail, filtered by entity (Practitioner/123), agent and time")
    def list_audit(
        entity: str | None = Query(None, description="Type/id or a type"),
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = limit_q,
        cursor: str | None = cursor_q,
    ) -> dict[str, Any]:
        after = 0
        if cursor:
            if not cursor.isdigit():
                raise Problem(
                    400,
                    "Invalid cursor",
                    "the cursor is not one this API gave out",
                    [{"location": "query.cursor", "detail": "unknown cursor"}],
                )
            after = int(cursor)
        q = audit.AuditQuery(
            entity=entity,
            agent=agent,
            since=audit.instant(_aware(since, "query.since")) if since else None,
            until=audit.instant(_aware(until, "query.until")) if until else None,
            after_seq=after,
            limit=limit,
        )
        rows, nxt = read(lambda c: audit.search(c, q))
        return {"items": rows, "next_cursor": str(nxt) if nxt is not None else None}

    return router


__all__ = ["Problem", "workforce_router"]
