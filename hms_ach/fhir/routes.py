"""The FHIR R4 REST API at ``/fhir``: metadata, read, vread, instance history and search.

Records are served as the JSON text the store rendered at write time; Bundles are assembled by
joining those stored texts inside an envelope made with orjson, so no FHIR model object is built
per request. Database work runs in FastAPI's threadpool on short reader connections. Every error
is an OperationOutcome (see :mod:`hms_ach.fhir.outcomes`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from importlib import metadata as importlib_metadata
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, Table, select
from starlette.responses import Response

from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError, operation_outcome
from hms_ach.store import search
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, ResourceHistory
from hms_ach.store.search_params import COMMON_PARAMS, SEARCH_PARAMS

FHIR_VERSION = "4.0.1"
INTERACTIONS = ("read", "vread", "history-instance", "search-type")
#: Served by a fhir_rest channel (hms_ach/channels/fhir_rest.py), when one is configured.
WRITE_INTERACTIONS = ("create", "update", "delete")
_WRITE_FLAGS: dict[str, Any] = {
    "conditionalCreate": True,
    "conditionalUpdate": True,
    "conditionalDelete": "not-supported",
}
WRITE_DOC = (
    "Writes are mapped into the canonical record (the elements a mapping does not read are not kept). "
    "Update needs the record to exist (updateCreate: false) and honours If-Match (412 on a mismatch); "
    "a conditional update (PUT ?identifier=system|value) creates when nothing matches. If-None-Exist "
    "and conditional update accept identifier=[system|]value only. Delete stores a deleted version: "
    "reads then answer 410 and history keeps every version."
)
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "text/json", "json"}
ACCEPT_ANY = {"*/*", "application/*"}
MAX_FORM_BYTES = 64 * 1024
HISTORY_DEFAULT_COUNT = 20
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def _software_version() -> str:
    try:
        return importlib_metadata.version("hms-ach")
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


# ---------------------------------------------------------------------------- negotiation
async def negotiate(request: Request) -> None:
    """Refuse (406) a ``_format`` or ``Accept`` that asks for anything but JSON.

    ``async`` because it only reads headers: FastAPI runs a plain ``def`` dependency in its thread
    pool, which would cost every request a thread hand-off."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt.split(";")[0].strip().lower() not in JSON_TYPES:
        raise FhirError(
            406, "not-supported", f"_format={fmt[:64]!r} is not supported; this server speaks JSON only"
        )
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return
    for media_range in accept.split(","):
        mtype, *params = [p.strip() for p in media_range.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            weight = float(q)
        except ValueError:
            weight = 0.0
        if weight > 0 and (mtype.lower() in JSON_TYPES or mtype in ACCEPT_ANY):
            return
    raise FhirError(406, "not-supported", "none of the Accept types is served; use application/fhir+json")


def _strict(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().replace(" ", "") == "handling=strict" for p in re.split(r"[,;]", prefer))


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _instant(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _http_date(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return format_datetime(value.astimezone(UTC), usegmt=True)


def _fhir(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


@contextmanager
def _reading(store: Store) -> Iterator[Connection]:
    """A short read transaction; on PostgreSQL one snapshot for all its statements."""
    with store.reader.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _table(resource_type: str) -> Table:
    model = RECORD_TABLES.get(resource_type) if resource_type in FHIR_SERVED else None
    if model is None:
        raise FhirError(
            404,
            "not-supported",
            f"resource type {resource_type[:64]!r} is not supported here; "
            f"supported: {', '.join(FHIR_SERVED)}",
        )
    return model.__table__  # type: ignore[attr-defined, no-any-return]


def _not_found(resource_type: str, rid: str) -> FhirError:
    return FhirError(404, "not-found", f"{resource_type}/{rid[:64]} is not known")


# ---------------------------------------------------------------------------- bundles
def bundle(kind: str, total: int | None, links: list[tuple[str, str]], entries: list[bytes]) -> bytes:
    """A Bundle: an orjson envelope around entries that are already JSON bytes."""
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _instant(datetime.now(UTC))},
        "type": kind,
    }
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": rel, "url": url} for rel, url in links]
    envelope = orjson.dumps(head)
    if not entries:
        return envelope
    return envelope[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def _entry(full_url: str, resource: str | None, extra: dict[str, Any]) -> bytes:
    parts = [b'{"fullUrl":', orjson.dumps(full_url)]
    if resource is not None:
        parts += [b',"resource":', resource.encode()]
    for key, value in extra.items():
        parts += [b",", orjson.dumps(key), b":", orjson.dumps(value)]
    return b"".join(parts) + b"}"


# ---------------------------------------------------------------------------- CapabilityStatement
#: The custom search parameters: (resource type, name) -> (canonical URL, what it matches).
CUSTOM_PARAMS: dict[tuple[str, str], tuple[str, str]] = {
    ("Practitioner", "qualification-period"): (
        "urn:hms-ach:fhir:SearchParameter/Practitioner-qualification-period",
        "Not in the base specification. A date search on Practitioner.qualification.period: matches a "
        "practitioner with a qualification (licence, certification) whose period meets the criterion, with "
        "the prefixes of a FHIR date search applied to the period as a range (an open end is unbounded). "
        "Example: qualification-period=gt2026-06-30 finds practitioners with a qualification still valid "
        "after that day.",
    ),
}

#: AuditEvent search (hms_ach/fhir/audit_routes.py): read-only, search-type only.
AUDIT_PARAMS: list[dict[str, str]] = [
    {
        "name": "entity",
        "type": "reference",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-entity",
        "documentation": "The changed record, as Type/id; a bare type (Practitioner) matches every record of it",
    },
    {
        "name": "agent",
        "type": "token",
        "documentation": "Who made the change: a channel name from channels.yaml, or api / api/<client>; "
        "matched exactly or as the prefix before '/'. Unlike the base AuditEvent-agent "
        "parameter this is a name, not a reference",
    },
    {
        "name": "date",
        "type": "date",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-date",
        "documentation": "The recorded instant, with the eq/ge/gt/le/lt prefixes; repeat it for a range",
    },
]


def _search_param(rtype: str, p: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": p.name,
        "type": p.type,
        "documentation": f"{p.type} search on {rtype}.{p.expression}"
        + (f" (references to {', '.join(p.targets)})" if p.targets else ""),
    }
    custom = CUSTOM_PARAMS.get((rtype, p.name))
    if custom is not None:
        entry["definition"], entry["documentation"] = custom
    return entry


def capability_statement(base: str, writes: bool = False) -> dict[str, Any]:
    """The CapabilityStatement, generated from the record tables and search-parameter declarations.

    ``writes``: a ``fhir_rest`` channel is configured, so the write interactions of
    :mod:`hms_ach.channels.fhir_rest` are served (without one they answer 405 and are not declared).
    """
    from hms_ach.fhir.write import WRITE_TYPES

    resources = []
    for rtype in FHIR_SERVED:
        writable = writes and rtype in WRITE_TYPES
        codes = list(INTERACTIONS) + (list(WRITE_INTERACTIONS) if writable else [])
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": code} for code in codes],
            "versioning": "versioned-update" if writable else "versioned",
            "readHistory": True,
            "updateCreate": False,
        }
        if writable:
            entry.update(_WRITE_FLAGS)
        includes = search.include_params(rtype)
        if includes:
            entry["searchInclude"] = includes
        entry["searchParam"] = [_search_param(rtype, p) for p in SEARCH_PARAMS.get(rtype, {}).values()]
        entry["documentation"] = f"_sort accepts: {', '.join(search.sort_params(rtype))}" + (
            ". " + WRITE_DOC
            if writable
            else ". Read-only: made by hms-ach (claims at discharge, coverage from IN1)"
            if rtype not in WRITE_TYPES
            else ""
        )
        resources.append(entry)
    if writes and "Basic" in WRITE_TYPES:
        resources.append(
            {
                "type": "Basic",
                "interaction": [{"code": "create"}, {"code": "update"}],
                "versioning": "versioned-update",
                "readHistory": False,
                "updateCreate": False,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "conditionalDelete": "not-supported",
                "documentation": "Write-only: a Basic whose code is shift (urn:hms-ach:code:basic-type) is stored as a "
                "Shift record (read it through /api/v1/shifts); update takes the Shift id. A shift is "
                "cancelled with status cancelled, not deleted.",
            }
        )
    resources.append(
        {
            "type": "AuditEvent",
            "interaction": [{"code": "search-type"}],
            "documentation": "Read-only, rendered from the hash-chained audit trail (one entry per record version); "
            "paging by _cursor, _count at most 200. No read or history of single entries.",
            "searchParam": AUDIT_PARAMS,
        }
    )
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            f"Search pages hold {search.DEFAULT_COUNT} entries by default and at most "
            f"{search.MAX_COUNT}; paging is by cursor. Bundle.total is counted on every page; _total=none "
            "(or estimate) saves that count when the client does not need it. "
            "Prefer: handling=strict makes unknown parameters an error."
        ),
        "resource": resources,
        "searchParam": [
            {"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
            {
                "name": "_lastUpdated",
                "type": "date",
                "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
            },
        ]
        if set(COMMON_PARAMS) == {"_id", "_lastUpdated"}
        else [],
    }
    if writes:
        rest["interaction"] = [
            {
                "code": "transaction",
                "documentation": "POST /fhir with a transaction Bundle: all entries or none; "
                "urn:uuid references between entries are resolved",
            },
            {
                "code": "batch",
                "documentation": "POST /fhir with a batch Bundle: each entry succeeds or fails on its own",
            },
        ]
    return {
        "resourceType": "CapabilityStatement",
        "id": "hms-ach",
        "status": "active",
        "date": _instant(datetime.now(UTC)),
        "publisher": "hms-ach",
        "kind": "instance",
        "software": {"name": "hms-ach", "version": _software_version()},
        "implementation": {"description": "hms-ach FHIR R4 API", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [rest],
    }


def _writes_enabled(request: Request) -> bool:
    engine = getattr(request.app.state, "engine", None)
    return any(
        getattr(getattr(ch, "config", None), "type", None) == "fhir_rest"
        for ch in (getattr(engine, "channels", None) or {}).values()
    )


# ---------------------------------------------------------------------------- handlers
def _read(store: Store, resource_type: str, rid: str, if_none_match: str | None) -> Response:
    t = _table(resource_type)
    if not _ID_RE.match(rid):
        raise _not_found(resource_type, rid)
    with _reading(store) as conn:
        row = conn.execute(
            select(t.c.version_id, t.c.last_updated, t.c.deleted, t.c.resource).where(t.c.id == rid)
        ).first()
    if row is None or row.version_id == 0:
        raise _not_found(resource_type, rid)
    headers = {"ETag": f'W/"{row.version_id}"', "Last-Modified": _http_date(row.last_updated)}
    if row.deleted:
        raise FhirError(410, "deleted", f"{resource_type}/{rid} was deleted", headers=headers)
    if if_none_match is not None and if_none_match.strip() == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return _fhir(row.resource.encode(), headers=headers)


def _vread(store: Store, resource_type: str, rid: str, vid: str) -> Response:
    _table(resource_type)
    if not _ID_RE.match(rid) or not vid.isdigit() or len(vid) > 18:
        raise _not_found(resource_type, f"{rid}/_history/{vid}")
    h = ResourceHistory.__table__  # type: ignore[attr-defined]
    with _reading(store) as conn:
        row = conn.execute(
            select(h.c.version_id, h.c.last_updated, h.c.deleted, h.c.resource).where(
                h.c.resource_type == resource_type, h.c.id == rid, h.c.version_id == int(vid)
            )
        ).first()
    if row is None:
        raise _not_found(resource_type, f"{rid}/_history/{vid}")
    headers = {"ETag": f'W/"{row.version_id}"', "Last-Modified": _http_date(row.last_updated)}
    if row.deleted:
        raise FhirError(410, "deleted", f"{resource_type}/{rid} version {vid} is a deletion", headers=headers)
    return _fhir(row.resource.encode(), headers=headers)


def _history(store: Store, base: str, resource_type: str, rid: str, params: dict[str, str]) -> Response:
    _table(resource_type)
    if not _ID_RE.match(rid):
        raise _not_found(resource_type, rid)
    count = _history_int(params, "_count", HISTORY_DEFAULT_COUNT)
    before = _history_int(params, "_cursor", None)
    count = min(count if count is not None else HISTORY_DEFAULT_COUNT, search.MAX_COUNT)
    h = ResourceHistory.__table__  # type: ignore[attr-defined]
    mine = (h.c.resource_type == resource_type, h.c.id == rid)
    stmt = select(h.c.version_id, h.c.last_updated, h.c.deleted, h.c.resource).where(*mine)
    if before is not None:
        stmt = stmt.where(h.c.version_id < before)
    with _reading(store) as conn:
        newest = conn.execute(
            select(h.c.version_id).where(*mine).order_by(h.c.version_id.desc()).limit(1)
        ).first()
        rows = conn.execute(stmt.order_by(h.c.version_id.desc()).limit(count + 1)).all() if count else []
    if newest is None:
        raise _not_found(resource_type, rid)
    url = f"{base}/{resource_type}/{rid}/_history"
    links = [("self", f"{url}?_count={count}" + (f"&_cursor={before}" if before is not None else ""))]
    if len(rows) > count:
        rows = rows[:count]
        links.append(("next", f"{url}?_count={count}&_cursor={rows[-1].version_id}"))
    entries = []
    for row in rows:
        method = "DELETE" if row.deleted else ("POST" if row.version_id == 1 else "PUT")
        status = "204 No Content" if row.deleted else ("201 Created" if row.version_id == 1 else "200 OK")
        entries.append(
            _entry(
                f"{base}/{resource_type}/{rid}",
                None if row.deleted else row.resource,
                {
                    "request": {
                        "method": method,
                        "url": resource_type if method == "POST" else f"{resource_type}/{rid}",
                    },
                    "response": {
                        "status": status,
                        "etag": f'W/"{row.version_id}"',
                        "lastModified": _instant(row.last_updated),
                    },
                },
            )
        )
    return _fhir(bundle("history", int(newest.version_id), links, entries))


def _history_int(params: dict[str, str], name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise FhirError(
            400, "invalid", f"{name} must be a non-negative whole number, got {raw[:64]!r}", expression=name
        )
    return int(raw)


def _search(
    store: Store, base: str, resource_type: str, params: list[tuple[str, str]], strict: bool
) -> Response:
    _table(resource_type)
    try:
        query = search.parse_query(resource_type, params, strict=strict)
        with _reading(store) as conn:
            page = search.execute(conn, query)
    except search.SearchError as exc:
        raise FhirError(400, exc.code, exc.diagnostics, expression=exc.expression) from exc
    url = f"{base}/{resource_type}"
    self_query = query.self_query()
    links = [("self", f"{url}?{self_query}" if self_query else url)]
    if page.next_cursor is not None:
        links.append(("next", f"{url}?{query.next_query(page.next_cursor)}"))
    entries = [_entry(f"{url}/{rid}", text, {"search": {"mode": "match"}}) for rid, text in page.matches]
    entries += [
        _entry(f"{base}/{rtype}/{rid}", text, {"search": {"mode": "include"}})
        for rtype, rid, text in page.included
    ]
    if query.warnings:
        outcome = operation_outcome("not-supported", "; ".join(query.warnings), severity="warning")
        entries.append(
            _entry(
                f"urn:uuid:{uuid.uuid4()}", orjson.dumps(outcome).decode(), {"search": {"mode": "outcome"}}
            )
        )
    return _fhir(bundle("searchset", page.total, links, entries))


async def _form_params(request: Request) -> list[tuple[str, str]]:
    """The form body of ``POST _search`` (size-limited), after the query-string parameters."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FhirError(413, "too-costly", f"the search form is larger than {MAX_FORM_BYTES} bytes")
    if not body:
        return []
    if ctype != "application/x-www-form-urlencoded":
        raise FhirError(
            415,
            "not-supported",
            f"a _search body must be application/x-www-form-urlencoded, not {ctype[:64] or 'untyped'!r}",
        )
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise FhirError(400, "invalid", "the search form is not UTF-8") from None
    return parse_qsl(text, keep_blank_values=True)


def fhir_router(store: Store) -> APIRouter:
    """The ``/fhir`` routes over ``store`` (reads use ``store.reader``)."""
    router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)], tags=["fhir"])

    @router.get("/metadata")
    def metadata(request: Request) -> Response:
        return _fhir(orjson.dumps(capability_statement(_base(request), _writes_enabled(request))))

    @router.get("/{resource_type}")
    def search_get(resource_type: str, request: Request) -> Response:
        params = list(request.query_params.multi_items())
        return _search(store, _base(request), resource_type, params, _strict(request))

    @router.post("/{resource_type}/_search")
    async def search_post(resource_type: str, request: Request) -> Response:
        _table(resource_type)
        params = list(request.query_params.multi_items()) + await _form_params(request)
        return await run_in_threadpool(
            _search, store, _base(request), resource_type, params, _strict(request)
        )

    inline = store.reader.dialect.name == "sqlite"

    @router.get("/{resource_type}/{rid}")
    async def read(resource_type: str, rid: str, request: Request) -> Response:
        # A read by id is one primary-key look-up. On SQLite (a local file, no pool to wait for) it
        # runs on the event loop: a thread hand-off would cost more than the read. On PostgreSQL
        # it waits on the network and the pool, so it goes to the thread pool like the searches.
        if inline:
            return _read(store, resource_type, rid, request.headers.get("if-none-match"))
        return await run_in_threadpool(_read, store, resource_type, rid, request.headers.get("if-none-match"))

    @router.get("/{resource_type}/{rid}/_history")
    def history(resource_type: str, rid: str, request: Request) -> Response:
        return _history(store, _base(request), resource_type, rid, dict(request.query_params))

    @router.get("/{resource_type}/{rid}/_history/{vid}")
    async def vread(resource_type: str, rid: str, vid: str) -> Response:
        if inline:  # one primary-key look-up, as read
            return _vread(store, resource_type, rid, vid)
        return await run_in_threadpool(_vread, store, resource_type, rid, vid)

    return router
