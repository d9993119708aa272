"""Bundles: the searchset and history Bundles served, and the transaction and batch Bundles written.

Served Bundles are assembled by joining the resource texts the store rendered at write time inside
an envelope made with orjson (:func:`bundle`, :func:`entry`), so no FHIR model object is built per
request. A write request, single or a transaction/batch Bundle, becomes a list of
:class:`~hms_ach.fhir.write.Operation` (:func:`request_operations`: the routes and ``hms-ach
replay`` both build them here), and its results the transaction-response or batch-response
(:func:`bundle_response`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.responses import Response

from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir.basic import as_fhir, fhir_type
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError, operation_outcome
from hms_ach.fhir.write import Operation, RequestLine, Result, check_writable


def instant(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def bundle(kind: str, total: int | None, links: list[tuple[str, str]], entries: list[bytes]) -> bytes:
    """A Bundle: an orjson envelope around entries that are already JSON bytes."""
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(datetime.now(UTC))},
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


def entry(full_url: str, resource: str | None, extra: dict[str, Any]) -> bytes:
    parts = [b'{"fullUrl":', orjson.dumps(full_url)]
    if resource is not None:
        parts += [b',"resource":', resource.encode()]
    for key, value in extra.items():
        parts += [b",", orjson.dumps(key), b":", orjson.dumps(value)]
    return b"".join(parts) + b"}"


def request_operations(line: RequestLine, body: Any, max_bundle_entries: int) -> tuple[list[Operation], str]:
    """The operations of one request (its method, URL under /fhir and headers, and its parsed body) and
    its kind (single, transaction or batch). The routes and ``hms-ach replay`` both build them here."""
    path, _, query = line.target.partition("?")
    parts = [p for p in path.split("/") if p]
    if not parts:
        return bundle_operations(body, max_bundle_entries)
    rtype, rid = parts[0], (parts[1] if len(parts) > 1 else None)
    check_writable(rtype)
    if line.method == "POST":
        return [Operation("POST", rtype, resource=body, if_none_exist=line.if_none_exist)], "single"
    if line.method == "DELETE":
        return [Operation("DELETE", rtype, rid=rid, if_match=line.if_match)], "single"
    if rid is not None:
        return [Operation("PUT", rtype, rid=rid, resource=body, if_match=line.if_match)], "single"
    return [Operation("PUT", rtype, query=query, resource=body, if_match=line.if_match)], "single"


def _entry_operation(i: int, item: Any, seen: set[str], kind: str) -> Operation:
    """The operation of ``Bundle.entry[i]``; FhirError names what is wrong with it. A batch may also
    hold GET entries (reads and searches, answered after its writes)."""
    where = f"Bundle.entry[{i}]"
    if not isinstance(item, dict):
        raise FhirError(400, "structure", f"{where} must be an object", expression=where)
    full_url = item.get("fullUrl")
    if full_url is not None:
        if not isinstance(full_url, str) or full_url in seen:
            raise FhirError(
                400,
                "duplicate",
                f"{where}.fullUrl {str(full_url)[:80]!r} occurs twice",
                expression=f"{where}.fullUrl",
            )
        seen.add(full_url)
    req = item.get("request") or {}
    method = str(req.get("method", "")).upper()
    url = str(req.get("url", "")).strip().removeprefix("/")
    methods = ("POST", "PUT", "DELETE", "GET") if kind == "batch" else ("POST", "PUT", "DELETE")
    if method not in methods:
        raise FhirError(
            400,
            "not-supported",
            f"{where}.request.method {method[:16] or '(none)'!r} is not supported ({', '.join(methods)})",
            expression=f"{where}.request.method",
        )
    path, _, query = url.partition("?")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise FhirError(400, "invalid", f"{where}.request.url is empty", expression=f"{where}.request.url")
    rtype = parts[0]
    if method == "GET":
        return Operation("GET", rtype, rid="/".join(parts[1:]) or None, query=query or None, where=where)
    check_writable(rtype)
    rid = parts[1] if len(parts) > 1 else None
    if method in ("PUT", "DELETE") and rid is None and not query:
        raise FhirError(
            400,
            "invalid",
            f"{where}.request.url must name {rtype}/id or {rtype}?identifier=s|v",
            expression=f"{where}.request.url",
        )
    if method == "DELETE" and rtype == "Basic":
        raise FhirError(
            400,
            "not-supported",
            "a shift sent as Basic is cancelled with status cancelled, not deleted",
            expression=f"{where}.request",
        )
    if method == "DELETE" and rid is None:
        raise FhirError(
            400, "not-supported", "conditional delete is not supported", expression=f"{where}.request"
        )
    resource = item.get("resource")
    if method != "DELETE" and resource is None:
        raise FhirError(400, "required", f"{where}.resource is missing", expression=f"{where}.resource")
    return Operation(
        method,
        rtype,
        rid=rid,
        query=query or None,
        resource=resource,
        if_match=req.get("ifMatch"),
        if_none_exist=req.get("ifNoneExist"),
        full_url=full_url,
        where=where,
    )


_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


def bundle_operations(body: Any, max_entries: int) -> tuple[list[Operation], str]:
    """The operations of a transaction or batch Bundle, and its type; FhirError names the bad entry."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FhirError(
            400,
            "invalid",
            "POST /fhir takes a Bundle of type transaction or batch",
            expression="Bundle.resourceType",
        )
    kind = body.get("type")
    if kind not in ("transaction", "batch"):
        raise FhirError(
            400,
            "not-supported",
            f"Bundle.type {str(kind)[:32]!r} is not processed; send transaction or batch",
            expression="Bundle.type",
        )
    entries = body.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError(400, "structure", "Bundle.entry must be a list", expression="Bundle.entry")
    if len(entries) > max_entries:
        raise FhirError(
            413, "too-costly", f"the Bundle has {len(entries)} entries; max_bundle_entries is {max_entries}"
        )
    ops: list[Operation] = []
    seen: set[str] = set()
    for i, item in enumerate(entries):
        try:
            ops.append(_entry_operation(i, item, seen, kind))
        except FhirError as exc:
            if kind != "batch":
                raise
            # a batch is not a transaction: a malformed entry fails alone (its own 4xx entry)
            ops.append(Operation("INVALID", "", where=f"Bundle.entry[{i}]", refused=exc))
    return ops, kind


def bundle_response(base: str, kind: str, results: list[Result], prefer: str = "representation") -> Response:
    """The transaction-response or batch-response Bundle (``base``: the server's /fhir URL).

    ``prefer`` is the request's ``Prefer: return=``: ``minimal`` leaves the resources out,
    ``OperationOutcome`` puts an outcome in each entry's response instead. A record that is not a
    FHIR resource appears in its FHIR form (a shift as its ``Basic``) without a ``fullUrl`` (it is
    not readable under /fhir), or, with no FHIR form, as its status alone; never as itself."""
    entries = []
    for res in results:
        if res.read_body:  # a batch's GET entry: the answer as it is
            read: dict[str, Any] = {"resource": orjson.loads(res.body or "{}")}
            if res.rid:
                read["fullUrl"] = f"{base}/{res.resource_type}/{res.rid}"
            read["response"] = {"status": "200 OK"}
            if res.rid:
                read["response"]["etag"] = f'W/"{res.version}"'
            entries.append(read)
            continue
        response: dict[str, Any] = {"status": _STATUS_TEXT.get(res.status, str(res.status))}
        served = res.resource_type in FHIR_SERVED
        if res.rid:
            if served:
                response["location"] = f"{res.location}"
            response["etag"] = f'W/"{res.version}"'
            if res.last_updated is not None:
                response["lastModified"] = instant(res.last_updated)
        if res.outcome is not None:
            response["outcome"] = res.outcome
        elif prefer == "OperationOutcome" and res.rid:
            response["outcome"] = written_outcome(res)
        item: dict[str, Any] = {}
        if res.rid and served:
            item["fullUrl"] = f"{base}/{res.resource_type}/{res.rid}"
        body = as_fhir(res.resource_type, res.body) if prefer == "representation" else None
        if body:
            item["resource"] = orjson.loads(body)
        item["response"] = response
        entries.append(item)
    envelope = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": f"{kind}-response",
        "entry": entries,
    }
    return Response(orjson.dumps(envelope), status_code=200, media_type=FHIR_JSON)


def written_outcome(res: Result) -> dict[str, Any]:
    """The OperationOutcome that answers a write under ``Prefer: return=OperationOutcome``."""
    what = {201: "created", 200: "updated", 204: "deleted"}.get(res.status, "processed")
    ftype = fhir_type(res.resource_type) or res.resource_type
    ref = f"{ftype}/{res.rid}" if res.rid else ftype
    return operation_outcome("informational", f"{ref} {what} (version {res.version})", severity="information")
