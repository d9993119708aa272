"""The ``fhir_rest`` channel type: FHIR R4 write interactions on the engine's HTTP server under /fhir.

Declared in channels.yaml like any channel; its routes are served by the one HTTP server (see
:func:`fhir_write_router`, included by :func:`hms_ach.app.http.create_app`). Without an enabled
``fhir_rest`` channel the write routes answer 405.

Interactions: create (``POST /fhir/{type}``, conditional with ``If-None-Exist``), update
(``PUT /fhir/{type}/{id}``, ``If-Match``), conditional update (``PUT /fhir/{type}?identifier=s|v``),
delete (a tombstone version; reads then answer 410) and ``POST /fhir`` with a transaction or batch
Bundle. Each request is validated and mapped (:mod:`hms_ach.fhir.write`), then committed as
one job of the group-commit writer; the 201/200 is sent only after that commit.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from hms_ach.app.config import ChannelSettings
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError
from hms_ach.fhir.write import (
    WRITE_TYPES,
    Operation,
    RequestLine,
    RequestOutcome,
    Result,
    prepare,
    rejection_job,
    request_job,
)
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.store import messages

log = logging.getLogger("hms_ach.channels.fhir_rest")
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}


class FhirRestChannelConfig(ChannelSettings):
    """FHIR R4 writes (create, update, delete, transaction/batch Bundles) on the HTTP server at /fhir."""

    type: str = Field("fhir_rest", description="fhir_rest")
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Larger request bodies are refused with 413 and never held in memory",
    )
    max_bundle_entries: int = Field(1000, ge=1, description="Bundles with more entries are refused with 413")


class FhirRestChannel:
    Config = FhirRestChannelConfig

    def __init__(self, config: FhirRestChannelConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline

    async def start(self) -> None:
        log.info("channel.started", extra={"channel": self.config.name})

    async def stop(self) -> None:
        return None


# ---------------------------------------------------------------------------- request handling
def _channel(request: Request) -> FhirRestChannel:
    engine = getattr(request.app.state, "engine", None)
    for channel in (getattr(engine, "channels", None) or {}).values():
        if isinstance(channel, FhirRestChannel):
            return channel
    raise FhirError(
        405, "not-supported", "writes are not enabled: declare a channel of type fhir_rest in channels.yaml"
    )


async def _body(request: Request, channel: FhirRestChannel) -> tuple[bytes, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise FhirError(
            415,
            "not-supported",
            f"content type {ctype[:64] or '(none)'!r} is not accepted; send application/fhir+json",
        )
    limit = channel.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FhirError(413, "too-costly", f"the body of {declared} bytes exceeds max_body_bytes {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FhirError(413, "too-costly", f"the body exceeds max_body_bytes {limit}")
    try:
        return bytes(body), orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, "structure", f"the body is not valid JSON: {exc}") from None


def _meta(channel: FhirRestChannel, request: Request, raw: bytes, what: str) -> messages.MessageMeta:
    request_id = request.headers.get("x-request-id", "")[:200] or str(uuid.uuid4())
    return messages.MessageMeta(
        channel=channel.config.name,
        raw=raw,
        content_type="fhir+json",
        control_id=request_id,
        message_type=what[:50],
    )


def request_operations(line: RequestLine, body: Any, max_bundle_entries: int) -> tuple[list[Operation], str]:
    """The operations of one request (its method, URL under /fhir and headers, and its parsed body) and
    its kind (single, transaction or batch). The routes and ``hms-ach replay`` both build them here."""
    path, _, query = line.target.partition("?")
    parts = [p for p in path.split("/") if p]
    if not parts:
        return _bundle_ops(body, max_bundle_entries)
    rtype, rid = parts[0], (parts[1] if len(parts) > 1 else None)
    _check_type(rtype)
    if line.method == "POST":
        return [Operation("POST", rtype, resource=body, if_none_exist=line.if_none_exist)], "single"
    if line.method == "DELETE":
        return [Operation("DELETE", rtype, rid=rid, if_match=line.if_match)], "single"
    if rid is not None:
        return [Operation("PUT", rtype, rid=rid, resource=body, if_match=line.if_match)], "single"
    return [Operation("PUT", rtype, query=query, resource=body, if_match=line.if_match)], "single"


def _request_line(request: Request, target: str) -> RequestLine:
    return RequestLine(
        request.method, target, request.headers.get("if-match"), request.headers.get("if-none-exist")
    )


async def _run(request: Request, what: str, line: RequestLine) -> tuple[FhirRestChannel, RequestOutcome, str]:
    """Read, validate and map the request, then commit it with its request line."""
    channel = _channel(request)
    raw = b""
    try:
        raw, body = await _body(request, channel) if request.method != "DELETE" else (b"", None)
        ops, kind = request_operations(line, body, channel.config.max_bundle_entries)
        for op in ops:
            prepare(op, channel.pipeline.engine)
    except FhirError as exc:
        if exc.status not in (405, 415, 413):  # bodies we did not read or accept are not stored
            await channel.pipeline.writer.run(rejection_job(_meta(channel, request, raw, what), exc, line))
        raise
    outcome: RequestOutcome = await channel.pipeline.writer.run(
        request_job(_meta(channel, request, raw, what), ops, kind, line)
    )
    log.info(
        "message.%s",
        "error" if outcome.error else "processed",
        extra={"channel": channel.config.name, "message_id": outcome.message_id},
    )
    if outcome.error is not None:
        raise outcome.error
    return channel, outcome, kind


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _single_response(request: Request, res: Result) -> Response:
    if res.status == 204:
        return Response(status_code=204, headers={"ETag": f'W/"{res.version}"'})
    headers = {"ETag": f'W/"{res.version}"', "Location": f"{_base(request)}/{res.location}"}
    return Response(res.body or "{}", status_code=res.status, media_type=FHIR_JSON, headers=headers)


def _check_type(resource_type: str) -> None:
    if resource_type not in WRITE_TYPES:
        raise FhirError(
            404 if resource_type[:1].isupper() else 400,
            "not-supported",
            f"resource type {resource_type[:64]!r} cannot be written here; writable: "
            f"{', '.join(WRITE_TYPES)}",
        )


_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


def _bundle_ops(body: Any, max_entries: int) -> tuple[list[Operation], str]:
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
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            raise FhirError(400, "structure", f"{where} must be an object", expression=where)
        full_url = entry.get("fullUrl")
        if full_url is not None:
            if not isinstance(full_url, str) or full_url in seen:
                raise FhirError(
                    400,
                    "duplicate",
                    f"{where}.fullUrl {str(full_url)[:80]!r} occurs twice",
                    expression=f"{where}.fullUrl",
                )
            seen.add(full_url)
        req = entry.get("request") or {}
        method = str(req.get("method", "")).upper()
        url = str(req.get("url", "")).strip().removeprefix("/")
        if method not in ("POST", "PUT", "DELETE"):
            raise FhirError(
                400,
                "not-supported",
                f"{where}.request.method {method[:16] or '(none)'!r} is not supported (POST, PUT, DELETE)",
                expression=f"{where}.request.method",
            )
        path, _, query = url.partition("?")
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise FhirError(
                400, "invalid", f"{where}.request.url is empty", expression=f"{where}.request.url"
            )
        rtype = parts[0]
        _check_type(rtype)
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
        resource = entry.get("resource")
        if method != "DELETE" and resource is None:
            raise FhirError(400, "required", f"{where}.resource is missing", expression=f"{where}.resource")
        ops.append(
            Operation(
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
        )
    return ops, kind


def _bundle_response(request: Request, kind: str, results: list[Result]) -> Response:
    base = _base(request)
    entries = []
    for res in results:
        response: dict[str, Any] = {"status": _STATUS_TEXT.get(res.status, str(res.status))}
        if res.rid:
            response["location"] = f"{res.location}"
            response["etag"] = f'W/"{res.version}"'
        if res.outcome is not None:
            response["outcome"] = res.outcome
        entry: dict[str, Any] = {"response": response}
        if res.rid:
            entry["fullUrl"] = f"{base}/{res.resource_type}/{res.rid}"
        if res.body:
            entry["resource"] = orjson.loads(res.body)
        entries.append(entry)
    bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{kind}-response", "entry": entries}
    return Response(orjson.dumps(bundle), status_code=200, media_type=FHIR_JSON)


def fhir_write_router() -> APIRouter:
    """The write routes; the channel is looked up on ``request.app.state.engine`` per request."""
    router = APIRouter(prefix="/fhir", tags=["fhir"])

    @router.post("")
    @router.post("/", include_in_schema=False)
    async def bundle(request: Request) -> Response:
        _ch, outcome, kind = await _run(request, "Bundle", _request_line(request, ""))
        return _bundle_response(request, kind, outcome.results)

    @router.post("/{resource_type}")
    async def create(resource_type: str, request: Request) -> Response:
        _check_type(resource_type)
        _ch, outcome, _k = await _run(request, f"POST {resource_type}", _request_line(request, resource_type))
        return _single_response(request, outcome.results[0])

    @router.put("/{resource_type}")
    async def conditional_update(resource_type: str, request: Request) -> Response:
        _check_type(resource_type)
        line = _request_line(request, f"{resource_type}?{request.url.query}")
        _ch, outcome, _k = await _run(request, f"PUT {resource_type}", line)
        return _single_response(request, outcome.results[0])

    @router.put("/{resource_type}/{rid}")
    async def update(resource_type: str, rid: str, request: Request) -> Response:
        _check_type(resource_type)
        _ch, outcome, _k = await _run(
            request, f"PUT {resource_type}", _request_line(request, f"{resource_type}/{rid}")
        )
        return _single_response(request, outcome.results[0])

    @router.delete("/{resource_type}/{rid}")
    async def delete(resource_type: str, rid: str, request: Request) -> Response:
        _check_type(resource_type)
        if resource_type == "Basic":
            raise FhirError(
                405, "not-supported", "a shift sent as Basic is cancelled with status cancelled, not deleted"
            )
        _ch, outcome, _k = await _run(
            request, f"DELETE {resource_type}", _request_line(request, f"{resource_type}/{rid}")
        )
        return _single_response(request, outcome.results[0])

    return router
