"""FHIR ``AuditEvent`` search and read at /fhir/AuditEvent, rendered from the audit trail (read-only).

The routes are declared in :mod:`hms_ach.fhir.routes`; :func:`search_audit_events` and
:func:`read_audit_event` answer them. Every ``fullUrl`` of a search resolves with a read.

Two kinds of entries are served: the change trail (:mod:`hms_ach.store.audit`, subtypes create,
update, delete; ids ``audit-N``) and the access records (:mod:`hms_ach.store.access_log`, subtypes
read, vread, search-type, history, export; ids ``access-N``) in the IHE BALP patterns.

Parameters: ``entity`` (``Patient/123`` or a type) or ``patient`` (``Patient/123`` or ``123``),
``agent`` (channel or client name; the caller's ``sub`` for access records), ``subtype``,
``date`` and ``_lastUpdated`` (``ge``/``gt``/``le``/``lt``/``eq`` prefixes on the recorded
instant, repeatable; an entry is never changed, so both are its recording time), ``_count``,
``_cursor`` (keyset paging on the change trail) and ``_access_cursor`` (on the access records).
An unknown parameter is ignored, with a warning in an OperationOutcome entry (search mode
``outcome``), unless ``Prefer: handling=strict`` asks for a 400. Every parameter takes ``:missing`` (``true``/``false``). The first page fixes a snapshot: its next
links carry ``_upto`` and ``_access_upto``, the newest entries when the search began, so that
paging ends even while the paging itself is being recorded as access.

:func:`record_access` is what the read routes call: it queues one access record (never waits for
a commit) on the engine's :class:`~hms_ach.store.access_log.AccessLog` (``app.state.access_audit``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import Request
from starlette.responses import Response

from hms_ach.fhir.outcomes import FHIR_JSON, FhirError, operation_outcome
from hms_ach.store import access_log, audit
from hms_ach.store.db import Store
from hms_ach.store.search_params import date_range

MAX_COUNT = 200
#: The search parameters of AuditEvent (the CapabilityStatement declares the same).
SEARCH_PARAMS = ("entity", "patient", "agent", "date", "_lastUpdated", "subtype")
#: Parameters every AuditEvent served has a value for: ``:missing=true`` matches nothing.
ALWAYS_PRESENT = ("agent", "date", "_lastUpdated", "subtype")


def date_bounds(values: list[str], name: str = "date") -> tuple[str | None, str | None]:
    """FHIR date criteria (with prefixes) -> (inclusive since, exclusive until) as audit instants."""
    since: str | None = None
    until: str | None = None
    for raw in values:
        prefix = raw[:2] if raw[:2] in ("ge", "gt", "le", "lt", "eq") else "eq"
        text = raw[2:] if raw[:2] == prefix else raw
        try:
            lo, hi = date_range(text)
        except ValueError as exc:
            raise FhirError(400, "invalid", f"{name}={raw[:40]!r}: {exc}", expression=name) from None
        lo_s, hi_s = audit.instant(lo), audit.instant(hi)
        if prefix in ("ge", "eq"):
            since = max(since or lo_s, lo_s)
        if prefix == "gt":
            since = max(since or hi_s, hi_s)
        if prefix in ("le", "eq"):
            until = min(until or hi_s, hi_s)
        if prefix == "lt":
            until = min(until or lo_s, lo_s)
    return since, until


CHANGE_SUBTYPES = ("create", "update", "delete")
ACCESS_SUBTYPES = ("read", "vread", "search-type", "search-system", "history", "export")


def search_audit_events(
    store: Store, request: Request, visible: bool = True, strict: bool = False
) -> Response:
    """``GET /fhir/AuditEvent``: a searchset of the change entries and access records matching the
    query parameters; empty when the caller may not see the trail (``visible``: a grant limited to
    a patient compartment, which the trail is not in)."""
    params = request.query_params
    known = {
        *SEARCH_PARAMS,
        *(f"{name}:missing" for name in SEARCH_PARAMS),
        "_count",
        "_cursor",
        "_access_cursor",
        "_upto",
        "_access_upto",
        "_format",
    }
    unknown = sorted(set(params) - known)
    ignored = [] if strict else unknown  # lenient handling (the default): ignored, and said so
    if unknown and strict:
        raise FhirError(
            400,
            "not-supported",
            f"unknown AuditEvent search parameter(s): {', '.join(unknown)}; "
            "supported: entity, patient, agent, date, _lastUpdated, subtype",
            expression=unknown[0],
        )
    count_text, cursor_text = params.get("_count", "50"), params.get("_cursor", "0")
    access_cursor_text = params.get("_access_cursor", "0")
    paging = (
        count_text,
        cursor_text,
        access_cursor_text,
        params.get("_upto", "0"),
        params.get("_access_upto", "0"),
    )
    if not all(text.isdigit() for text in paging):
        raise FhirError(
            400, "invalid", "_count, _cursor, _access_cursor, _upto and _access_upto must be whole numbers"
        )
    missing = _missing(params)
    if any(missing.get(name) for name in ALWAYS_PRESENT):
        visible = False  # every AuditEvent has an agent, a date and a subtype: nothing matches
    subtype = params.get("subtype")
    if subtype is not None and subtype not in CHANGE_SUBTYPES + ACCESS_SUBTYPES:
        raise FhirError(
            400,
            "invalid",
            f"subtype={subtype[:40]!r} is not known; use one of {', '.join(CHANGE_SUBTYPES + ACCESS_SUBTYPES)}",
            expression="subtype",
        )
    entity = params.get("entity")
    patient = params.get("patient")
    if patient is not None:
        entity = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    since, until = date_bounds(params.getlist("date"))
    # An AuditEvent is written once, when it is recorded: its _lastUpdated is its date.
    if params.getlist("_lastUpdated"):
        since2, until2 = date_bounds(params.getlist("_lastUpdated"), "_lastUpdated")
        since = max(x for x in (since, since2) if x is not None) if since or since2 else None
        until = min(x for x in (until, until2) if x is not None) if until or until2 else None
    limit = min(int(count_text), MAX_COUNT)
    first_page = "_upto" not in params
    upto = audit.last_seq(store) if first_page else min(int(params["_upto"]), _MAX_SEQ)
    access_upto = access_log.last_seq(store) if first_page else min(int(params["_access_upto"]), _MAX_SEQ)
    rows: list[dict[str, Any]] = []
    accesses: list[dict[str, Any]] = []
    next_seq = next_access = None
    # a cursor at _END (or past any seq): that half of the trail is done; a bound past the column's
    # range would be refused by PostgreSQL
    if visible and int(cursor_text) < _MAX_SEQ and (subtype is None or subtype in CHANGE_SUBTYPES):
        q = audit.AuditQuery(
            entity=entity,
            agent=params.get("agent"),
            since=since,
            until=until,
            after_seq=int(cursor_text),
            upto_seq=upto,
            limit=limit,
        )
        rows, next_seq = audit.search_trail(store, q)
        if subtype is not None:
            rows = [r for r in rows if r["action"] == subtype]
    if visible and int(access_cursor_text) < _MAX_SEQ and (subtype is None or subtype in ACCESS_SUBTYPES):
        aq = access_log.AccessQuery(
            entity=entity,
            agent=params.get("agent"),
            subtype=subtype,
            since=since,
            until=until,
            after_seq=int(access_cursor_text),
            upto_seq=access_upto,
            limit=limit,
        )
        accesses, next_access = access_log.search_records(store, aq)
    base = str(request.base_url).rstrip("/") + "/fhir/AuditEvent"
    keep = [
        (k, v)
        for k, v in params.multi_items()
        if k not in ("_cursor", "_access_cursor", "_upto", "_access_upto")
    ]
    keep += [("_upto", str(upto)), ("_access_upto", str(access_upto))]
    links = [{"relation": "self", "url": f"{base}?{urlencode(params.multi_items())}"}]
    if next_seq is not None or next_access is not None:
        cursors = [("_cursor", str(next_seq if next_seq is not None else _END))]
        cursors.append(("_access_cursor", str(next_access if next_access is not None else _END)))
        links.append({"relation": "next", "url": f"{base}?{urlencode(keep + cursors)}"})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/audit-{r['seq']}",
            "resource": audit.as_audit_event(r),
            "search": {"mode": "match"},
        }
        for r in rows
    ]
    entries += [
        {"fullUrl": f"{base}/access-{r['seq']}", "resource": as_access_event(r), "search": {"mode": "match"}}
        for r in accesses
    ]
    entries = [e for e in entries if _presence_matches(e["resource"], missing)]
    matches = len(entries)
    if ignored:
        text = f"parameter(s) {', '.join(repr(k[:64]) for k in ignored)} not supported for AuditEvent and ignored"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": operation_outcome("not-supported", text, severity="warning"),
                "search": {"mode": "outcome"},
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "meta": {"lastUpdated": datetime.now(UTC).isoformat().replace("+00:00", "Z")},
        "link": links,
        "entry": entries,
    }
    if next_seq is None and next_access is None and int(cursor_text) == 0 and int(access_cursor_text) == 0:
        bundle["total"] = matches  # every match is on this first page (the trail is not counted otherwise)
    # Reading the trail is an access too: its diffs and queries are patient and staff data. The
    # record names the records whose trail was returned (not the access records' own entities).
    seen = [f"{r['entity_type']}/{r['entity_id']}" for r in rows]
    record_access(request, "search-type", "AuditEvent", 200, seen, len(entries))
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON)


def _missing(params: Any) -> dict[str, bool]:
    """The ``name:missing=true|false`` of the query, by parameter name."""
    out: dict[str, bool] = {}
    for name in SEARCH_PARAMS:
        value = params.get(f"{name}:missing")
        if value is None:
            continue
        if value not in ("true", "false"):
            raise FhirError(
                400, "invalid", f"{name}:missing takes true or false", expression=f"{name}:missing"
            )
        out[name] = value == "true"
    return out


def _presence_matches(event: dict[str, Any], missing: dict[str, bool]) -> bool:
    """Whether ``event`` has (or lacks) the elements ``entity:missing`` / ``patient:missing`` ask about."""
    refs = [(e.get("what") or {}).get("reference", "") for e in event.get("entity") or []]
    present = {
        "entity": any(refs),
        "patient": any(r.startswith("Patient/") for r in refs),
    }
    return all(present[name] != is_missing for name, is_missing in missing.items() if name in present)


def read_audit_event(store: Store, rid: str, visible: bool = True) -> Response:
    """``GET /fhir/AuditEvent/{id}``: one change entry (``audit-N``) or access record
    (``access-N``), the same resource a search serves with that id; 404 for any other id, and when
    the caller may not see the trail (``visible``)."""
    kind, _, number = rid.partition("-")
    if not visible or kind not in ("audit", "access") or not number.isdigit() or len(number) > 18:
        raise FhirError(404, "not-found", f"AuditEvent/{rid[:64]} is not known")
    seq = int(number)
    if seq > _MAX_SEQ:
        raise FhirError(404, "not-found", f"AuditEvent/{rid[:64]} is not known")
    resource: dict[str, Any] | None = None
    if kind == "audit" and seq > 0:
        rows, _next = audit.search_trail(store, audit.AuditQuery(after_seq=seq - 1, limit=1))
        if rows and rows[0]["seq"] == seq:
            resource = audit.as_audit_event(rows[0])
    elif kind == "access" and seq > 0:
        found, _more = access_log.search_records(store, access_log.AccessQuery(after_seq=seq - 1, limit=1))
        if found and found[0]["seq"] == seq:
            resource = as_access_event(found[0])
    if resource is None:
        raise FhirError(404, "not-found", f"AuditEvent/{rid[:64]} is not known")
    return Response(orjson.dumps(resource), media_type=FHIR_JSON)


#: A cursor past every entry: the next page of a kind that has no more.
_END = 2**62
#: The largest ``seq`` the trail's tables hold (a 32-bit key on PostgreSQL): a cursor or id past it
#: matches nothing, and is never sent to the database as a bound it would refuse.
_MAX_SEQ = 2**31 - 1


# ---------------------------------------------------------------------------- access records
_BALP_OUTCOME = {True: "0", False: "4"}  # success / minor failure (the request was refused or failed)


def as_access_event(row: dict[str, Any]) -> dict[str, Any]:
    """An access record as a FHIR R4 AuditEvent in the IHE BALP patterns (Basic Audit Log Patterns):
    type ``rest``, subtype the interaction, the caller as the requestor agent with its network
    address, the server as the custodian agent, an entity per patient or record returned, and the
    query as an entity (type query, its text in ``query``, base64 as R4 wants)."""
    actor = orjson.loads(row["actor"]) if row["actor"] else {}
    ok = 200 <= int(row["outcome"]) < 400
    who: dict[str, Any] = {"display": "anonymous (refused before authentication)"}
    if row["sub"]:
        who = {"identifier": {"system": "urn:hms-ach:sub", "value": row["sub"]}}
    requestor: dict[str, Any] = {
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
            ]
        },
        "who": who,
        "requestor": True,
    }
    if isinstance(actor, dict):
        if actor.get("client_id"):
            requestor["altId"] = str(actor["client_id"])
        if actor.get("roles"):
            requestor["role"] = [{"text": str(r)} for r in actor["roles"]]
        if actor.get("source_address"):
            requestor["network"] = {"address": str(actor["source_address"]), "type": "2"}
    server = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "custodian",
                }
            ]
        },
        "who": {"display": "hms-ach"},
        "requestor": False,
    }
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"access-{row['seq']}",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": row["subtype"]}],
        "action": "E" if row["subtype"] in ("search-type", "search-system", "export") else "R",
        "recorded": row["recorded"],
        "outcome": _BALP_OUTCOME[ok],
        "outcomeDesc": f"HTTP {row['outcome']}",
        "agent": [requestor, server],
        "source": {"observer": {"display": "hms-ach"}},
        "entity": [],
    }
    for ref in row["entities"].split():
        patient = ref.startswith("Patient/")
        item: dict[str, Any] = {"what": {"reference": ref}}
        item["type"] = {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "1",
            "display": "Person" if patient else "System Object",
        }
        if patient:
            item["role"] = {
                "system": "http://terminology.hl7.org/CodeSystem/object-role",
                "code": "1",
                "display": "Patient",
            }
        event["entity"].append(item)
    if row["query"]:
        query: dict[str, Any] = {
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "2",
                "display": "System Object",
            },
            "role": {
                "system": "http://terminology.hl7.org/CodeSystem/object-role",
                "code": "24",
                "display": "Query",
            },
            "query": base64.b64encode(row["query"].encode()).decode(),
            "description": row["query"],
        }
        if row["result_count"] is not None:
            query["detail"] = [{"type": "result-count", "valueString": str(row["result_count"])}]
        event["entity"].append(query)
    return event


def record_access(
    request: Request,
    subtype: str,
    resource_type: str,
    outcome: int,
    entities: Sequence[str] = (),
    result_count: int | None = None,
) -> None:
    """Queue one access record for ``request`` (its caller, path and query); never waits for a commit.
    Does nothing when the engine runs no access audit (a bare app in a test)."""
    access_log.record_request(request, subtype, resource_type, outcome, entities, result_count)


def record_refusal(scope: MutableMapping[str, Any], status: int, peer: str | None) -> None:
    """Queue the access record of a request refused before routing (401 from the authentication
    middleware): no caller, its source address, the interaction and query it asked for."""
    app = scope.get("app")
    recorder: access_log.AccessLog | None = getattr(getattr(app, "state", None), "access_audit", None)
    if recorder is None:
        return
    path = str(scope.get("path", ""))
    subtype, rtype = access_log.interaction_of(str(scope.get("method", "GET")), path)
    query_bytes = scope.get("query_string", b"")
    query = path + ("?" + query_bytes.decode("latin-1") if query_bytes else "")
    sub, actor = access_log.http_actor(None, peer)
    recorder.record(access_log.Access(subtype, rtype, status, sub, actor, (), None, query))


#: Kept here for callers of the FHIR layer; defined with the access records.
interaction_of = access_log.interaction_of
