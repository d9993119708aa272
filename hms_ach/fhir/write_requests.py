"""The write interactions of ``/fhir``, served when a ``fhir_rest`` channel is configured.

Create (``POST /fhir/{type}``, conditional with ``If-None-Exist``), update (``PUT /fhir/{type}/{id}``,
``If-Match``), conditional update (``PUT /fhir/{type}?identifier=s|v``), delete (a tombstone
version; reads then answer 410) and ``POST /fhir`` with a transaction or batch Bundle. Each request
is read (size-limited), parsed into operations (:mod:`hms_ach.fhir.bundles`), validated and mapped
(:func:`hms_ach.fhir.write.prepare`), then committed with its request line as one job of the
group-commit writer; the 201/200 is sent only after that commit. A request refused before it could
be applied is stored too, with its reason (except bodies not read or not accepted: 405, 413, 415).

The channel (:class:`~hms_ach.channels.fhir_rest.FhirRestChannel`) is looked up per request with
the :data:`WriteChannel` function the composition root gives :func:`hms_ach.fhir.routes.fhir_router`
(channels come and go on reload): without one the write routes answer 405.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from hms_ach.channels.fhir_rest import FhirRestChannel
from hms_ach.fhir.bundles import bundle_response, request_operations
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError
from hms_ach.fhir.write import (
    RequestLine,
    RequestOutcome,
    Result,
    check_writable,
    prepare_all,
    rejection_job,
    submit_request,
)
from hms_ach.store import messages

log = logging.getLogger("hms_ach.channels.fhir_rest")
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}


#: Finds the running ``fhir_rest`` channel, if one is configured (None: writes answer 405).
WriteChannel = Callable[[], FhirRestChannel | None]


def _channel(find: WriteChannel) -> FhirRestChannel:
    channel = find()
    if channel is None:
        raise FhirError(
            405,
            "not-supported",
            "writes are not enabled: declare a channel of type fhir_rest in channels.yaml",
        )
    return channel


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


def _request_line(request: Request, target: str) -> RequestLine:
    return RequestLine(
        request.method, target, request.headers.get("if-match"), request.headers.get("if-none-exist")
    )


async def _run(
    request: Request, find: WriteChannel, what: str, line: RequestLine
) -> tuple[FhirRestChannel, RequestOutcome, str]:
    """Read, validate and map the request, then commit it with its request line."""
    channel = _channel(find)
    raw = b""
    try:
        raw, body = await _body(request, channel) if request.method != "DELETE" else (b"", None)
        ops, kind = request_operations(line, body, channel.config.max_bundle_entries)
        await prepare_all(ops, channel.pipeline.engine)
    except FhirError as exc:
        if exc.status not in (405, 415, 413):  # bodies we did not read or accept are not stored
            await channel.pipeline.writer.run(rejection_job(_meta(channel, request, raw, what), exc, line))
        raise
    outcome: RequestOutcome = await submit_request(
        channel.pipeline.writer,
        _meta(channel, request, raw, what),
        ops,
        kind,
        line,
        channel.config.batch_slice_seconds,
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


# ---------------------------------------------------------------------------- handlers
async def transaction_or_batch(request: Request, find: WriteChannel) -> Response:
    """``POST /fhir``: a transaction or batch Bundle."""
    _ch, outcome, kind = await _run(request, find, "Bundle", _request_line(request, ""))
    return bundle_response(_base(request), kind, outcome.results)


async def create(request: Request, find: WriteChannel, resource_type: str) -> Response:
    check_writable(resource_type)
    _ch, outcome, _k = await _run(
        request, find, f"POST {resource_type}", _request_line(request, resource_type)
    )
    return _single_response(request, outcome.results[0])


async def conditional_update(request: Request, find: WriteChannel, resource_type: str) -> Response:
    check_writable(resource_type)
    line = _request_line(request, f"{resource_type}?{request.url.query}")
    _ch, outcome, _k = await _run(request, find, f"PUT {resource_type}", line)
    return _single_response(request, outcome.results[0])


async def update(request: Request, find: WriteChannel, resource_type: str, rid: str) -> Response:
    check_writable(resource_type)
    _ch, outcome, _k = await _run(
        request, find, f"PUT {resource_type}", _request_line(request, f"{resource_type}/{rid}")
    )
    return _single_response(request, outcome.results[0])


async def delete(request: Request, find: WriteChannel, resource_type: str, rid: str) -> Response:
    check_writable(resource_type)
    if resource_type == "Basic":
        raise FhirError(
            405, "not-supported", "a shift sent as Basic is cancelled with status cancelled, not deleted"
        )
    _ch, outcome, _k = await _run(
        request, find, f"DELETE {resource_type}", _request_line(request, f"{resource_type}/{rid}")
    )
    return _single_response(request, outcome.results[0])
