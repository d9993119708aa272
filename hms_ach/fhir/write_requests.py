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

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from hms_ach.channels.fhir_rest import FhirRestChannel
from hms_ach.core.errors import ContentError, Err0357
from hms_ach.core.records import MappingResult
from hms_ach.core.redact import error_kind
from hms_ach.fhir import transaction
from hms_ach.fhir.access import WriteGuard
from hms_ach.fhir.bundles import bundle_response, request_operations
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError
from hms_ach.fhir.write import (
    Operation,
    RequestLine,
    RequestOutcome,
    Result,
    check_writable,
    prepare_all,
    rejection_job,
    submit_request,
)
from hms_ach.ingest.pipeline import (
    INTERNAL_ERROR_TEXT,
    Duplicate,
    Finish,
    check_records,
    commit,
    find_nul,
)
from hms_ach.store import access_log, messages
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.port import Tx
from hms_ach.store.resources import store_request_line

log = logging.getLogger("hms_ach.channels.fhir_rest")
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}
#: The width of the stored If-Match header (``message_fhir_request.if_match``).
MAX_IF_MATCH_CHARS = 255


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


async def _body(request: Request, channel: FhirRestChannel) -> bytes:
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
    return bytes(body)


def _parse(body: bytes) -> Any:
    """The JSON of ``body``; a NUL character in any of its strings is refused with its path (400)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, "structure", f"the body is not valid JSON: {exc}") from None
    root = parsed.get("resourceType") if isinstance(parsed, dict) else None
    where = find_nul(parsed, root if isinstance(root, str) and root.isalnum() else "$")
    if where is not None:
        raise FhirError(
            400,
            "invalid",
            "the value contains a NUL character (U+0000), which is not accepted",
            expression=where,
        )
    return parsed


def _line_storable(line: RequestLine) -> bool:
    return not any("\x00" in (v or "") for v in (line.target, line.if_match, line.if_none_exist)) and (
        line.if_match is None or len(line.if_match) <= MAX_IF_MATCH_CHARS
    )


def _check_line(line: RequestLine) -> None:
    """Refuse a request line that the message store could not keep (a NUL in the URL, an If-Match
    wider than its column) before anything is stored; the request is then stored without it."""
    if any("\x00" in (v or "") for v in (line.target, line.if_match, line.if_none_exist)):
        raise FhirError(400, "invalid", "the URL or a header contains a NUL character (U+0000)")
    if line.if_match is not None and len(line.if_match) > MAX_IF_MATCH_CHARS:
        raise FhirError(400, "invalid", f"If-Match is longer than {MAX_IF_MATCH_CHARS} characters")


def _check_records(ops: list[Operation]) -> None:
    """The mapped records of ``ops`` pass the store's limits (identifier width, NUL, size)."""
    for op in ops:
        records = [r for r in [op.record, *op.extra] if r is not None]
        try:
            check_records(MappingResult(records=records))  # the HL7 v2 channels' default size cap
        except ContentError as exc:
            code = "too-long" if exc.code == Err0357.VALUE_TOO_LONG else "invalid"
            where = f"{op.where}.{exc.location}".lstrip(".") if op.where else exc.location
            raise FhirError(422, code, exc.message, expression=where) from None


async def _store_failed(
    channel: FhirRestChannel, meta: messages.MessageMeta, line: RequestLine, exc: BaseException
) -> FhirError:
    """Store a request whose job failed for a reason not foreseen as an ``error`` (a fresh job:
    the failed one was rolled back), and the generic 500 that answers it (no exception text)."""
    kind = error_kind(exc)
    log.error("fhir.store_failed", extra={"channel": channel.config.name, "error_kind": kind})
    error = FhirError(500, "exception", INTERNAL_ERROR_TEXT)

    def work(tx: Tx, message_id: int) -> tuple[int, Finish]:
        store_request_line(tx, message_id, line)
        return message_id, Finish("error", "500", None, error=f"{INTERNAL_ERROR_TEXT} (store error: {kind})")

    def job(tx: Tx) -> int:
        out = commit(tx, meta, work)
        if isinstance(out, Duplicate):
            raise RuntimeError("an unkeyed request was taken for a duplicate")
        return out

    try:
        await channel.pipeline.writer.run(job)
    except StoreUnavailable:
        raise
    except Exception as again:  # noqa: BLE001 - the store refuses even this: the client resends
        raise StoreUnavailable(f"the request could not be stored ({error_kind(again)})") from None
    return error


def _meta(channel: FhirRestChannel, request: Request, raw: bytes, what: str) -> messages.MessageMeta:
    request_id = request.headers.get("x-request-id", "")[:200] or str(uuid.uuid4())
    return messages.MessageMeta(
        channel=channel.config.name,
        raw=raw,
        content_type="fhir+json",
        control_id=request_id,
        message_type=what[:50],
        actor=access_log.request_actor(request),
    )


def _request_line(request: Request, target: str) -> RequestLine:
    return RequestLine(
        request.method, target, request.headers.get("if-match"), request.headers.get("if-none-exist")
    )


async def _run(
    request: Request, find: WriteChannel, what: str, line: RequestLine, guard: WriteGuard
) -> tuple[FhirRestChannel, RequestOutcome, str]:
    """Read the request, decide its operations by the caller's scopes, validate and map them, then
    commit them with the request line. In a batch, the entries the scopes refuse are not applied:
    their 403/404 results take their places in the outcome."""
    channel = _channel(find)
    raw = b""
    refused: dict[int, Result] = {}
    try:
        _check_line(line)
        raw = await _body(request, channel) if request.method != "DELETE" else b""
        body = _parse(raw) if request.method != "DELETE" else None
        ops, kind = request_operations(line, body, channel.config.max_bundle_entries)
        # Under patient/ scopes the guard reads the records a write targets: on the thread pool.
        refused = (
            await run_in_threadpool(guard.allowed, ops, kind) if guard.reads else guard.allowed(ops, kind)
        )
        ops = [op for i, op in enumerate(ops) if i not in refused]
        await prepare_all(ops, channel.pipeline.engine)
        _check_records(ops)
        if kind == "transaction":  # what the writer need not do, done now in a worker thread
            await _plan(channel, ops)
    except FhirError as exc:
        if exc.status not in (405, 415, 413):  # bodies we did not read or accept are not stored
            keep = line if _line_storable(line) else RequestLine(line.method, "", None, None)
            await channel.pipeline.writer.run(rejection_job(_meta(channel, request, raw, what), exc, keep))
        raise
    meta = _meta(channel, request, raw, what)
    try:
        outcome: RequestOutcome = await submit_request(
            channel.pipeline.writer, meta, ops, kind, line, channel.config.batch_slice_seconds
        )
    except (FhirError, StoreUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - not foreseen: stored as an error, a generic 500
        raise await _store_failed(channel, meta, line, exc) from None
    if refused and outcome.error is None:
        applied = iter(outcome.results)
        total = len(ops) + len(refused)
        outcome.results = [refused[i] if i in refused else next(applied) for i in range(total)]
    log.info(
        "message.%s",
        "error" if outcome.error else "processed",
        extra={"channel": channel.config.name, "message_id": outcome.message_id},
    )
    if outcome.error is not None:
        raise outcome.error
    return channel, outcome, kind


async def _plan(channel: FhirRestChannel, ops: list[Operation]) -> None:
    """Plan a transaction's entries for the bulk path (:func:`hms_ach.fhir.transaction.plan`). It is
    only a head start: should it fail, the writer does that work itself."""
    try:
        await asyncio.to_thread(transaction.plan, ops)
    except Exception as exc:  # noqa: BLE001 - the request goes on without a plan
        for op in ops:
            op.plan = None
        log.warning(
            "fhir.transaction_plan_failed",
            extra={"channel": channel.config.name, "error_kind": error_kind(exc)},
        )


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _single_response(request: Request, res: Result) -> Response:
    if res.status == 204:
        return Response(status_code=204, headers={"ETag": f'W/"{res.version}"'})
    headers = {"ETag": f'W/"{res.version}"', "Location": f"{_base(request)}/{res.location}"}
    return Response(res.body or "{}", status_code=res.status, media_type=FHIR_JSON, headers=headers)


# ---------------------------------------------------------------------------- handlers
async def transaction_or_batch(request: Request, find: WriteChannel, guard: WriteGuard) -> Response:
    """``POST /fhir``: a transaction or batch Bundle."""
    _ch, outcome, kind = await _run(request, find, "Bundle", _request_line(request, ""), guard)
    return bundle_response(_base(request), kind, outcome.results)


async def create(request: Request, find: WriteChannel, resource_type: str, guard: WriteGuard) -> Response:
    check_writable(resource_type)
    _ch, outcome, _k = await _run(
        request, find, f"POST {resource_type}", _request_line(request, resource_type), guard
    )
    return _single_response(request, outcome.results[0])


async def conditional_update(
    request: Request, find: WriteChannel, resource_type: str, guard: WriteGuard
) -> Response:
    check_writable(resource_type)
    line = _request_line(request, f"{resource_type}?{request.url.query}")
    _ch, outcome, _k = await _run(request, find, f"PUT {resource_type}", line, guard)
    return _single_response(request, outcome.results[0])


async def update(
    request: Request, find: WriteChannel, resource_type: str, rid: str, guard: WriteGuard
) -> Response:
    check_writable(resource_type)
    _ch, outcome, _k = await _run(
        request, find, f"PUT {resource_type}", _request_line(request, f"{resource_type}/{rid}"), guard
    )
    return _single_response(request, outcome.results[0])


async def delete(
    request: Request, find: WriteChannel, resource_type: str, rid: str, guard: WriteGuard
) -> Response:
    check_writable(resource_type)
    if resource_type == "Basic":
        raise FhirError(
            405, "not-supported", "a shift sent as Basic is cancelled with status cancelled, not deleted"
        )
    _ch, outcome, _k = await _run(
        request, find, f"DELETE {resource_type}", _request_line(request, f"{resource_type}/{rid}"), guard
    )
    return _single_response(request, outcome.results[0])
