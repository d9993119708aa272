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
from datetime import UTC
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

import jsonpatch
import jsonpointer
import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from hms_ach.channels.fhir_rest import FhirRestChannel
from hms_ach.core.errors import ContentError, Err0357
from hms_ach.core.records import MappingResult
from hms_ach.core.redact import error_kind
from hms_ach.fhir import access, audit_events, transaction
from hms_ach.fhir import read as reads_mod
from hms_ach.fhir.access import WriteGuard
from hms_ach.fhir.basic import as_fhir, fhir_type
from hms_ach.fhir.bundles import bundle_response, request_operations, written_outcome
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError
from hms_ach.fhir.write import (
    Operation,
    RequestLine,
    RequestOutcome,
    Result,
    check_writable,
    prepare_all,
    prepare_batch,
    refused_result,
    rejection_job,
    release,
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
from hms_ach.store import access_log, messages, resources
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.port import Tx
from hms_ach.store.resources import store_request_line

log = logging.getLogger("hms_ach.channels.fhir_rest")
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}
#: PATCH takes a JSON Patch (RFC 6902) or a JSON Merge Patch (RFC 7396); with a plain JSON type a
#: list is a JSON Patch and an object a merge patch (what fhirpy's ``patch()`` sends).
PATCH_TYPES = {"application/json-patch+json", "application/merge-patch+json", *JSON_TYPES}
#: A PATCH without If-Match is applied to the version it read; when another write comes between,
#: it is read and applied again, at most this many times (then 409).
PATCH_ATTEMPTS = 3
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


async def _body(request: Request, channel: FhirRestChannel, accepted: set[str] = JSON_TYPES) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if accepted is PATCH_TYPES and ctype not in PATCH_TYPES:
        raise FhirError(
            415,
            "not-supported",
            f"content type {ctype[:64] or '(none)'!r} is not accepted for PATCH; send a JSON Patch "
            "(application/json-patch+json) or a JSON Merge Patch (application/merge-patch+json). "
            "FHIRPath Patch is not supported",
        )
    if ctype not in accepted:
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


#: Fairness between channels (docs/reliability.md): a request body of at least this many bytes is
#: parsed and split into operations on a worker thread, and a Bundle of more entries than
#: ``OFF_LOOP_ENTRIES`` has its records checked and its answer built there too. A 1,000-entry Bundle
#: costs the event loop about 0.1 s of that work otherwise, which every MLLP ACK then waits for;
#: a small request is cheaper done in place than handed to a thread.
OFF_LOOP_BYTES = 64 * 1024
OFF_LOOP_ENTRIES = 50


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


def _operations(raw: bytes, line: RequestLine, max_entries: int) -> tuple[list[Operation], str]:
    """The request's operations from its body (none for a DELETE) and its kind."""
    body = _parse(raw) if line.method != "DELETE" else None
    return request_operations(line, body, max_entries)


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


def _records_failed(ops: list[Operation]) -> dict[int, FhirError]:
    """:func:`_check_records` per entry of a batch: the refusal of each entry that fails, by index."""
    failed: dict[int, FhirError] = {}
    for i, op in enumerate(ops):
        try:
            _check_records([op])
        except FhirError as exc:
            failed[i] = exc
    return failed


async def _batch_reads(request: Request, guard: WriteGuard, reads: dict[int, Operation]) -> dict[int, Result]:
    """Answer the GET entries of a batch (after its writes, so they see them): each a read
    (``T/id``) or a search (``T?query``) decided by the caller's scopes and recorded in the access
    audit like the same request on its own; a refusal answers that entry only."""
    out: dict[int, Result] = {}
    for i, op in reads.items():
        try:
            out[i] = await run_in_threadpool(_batch_read, request, guard, op)
        except FhirError as exc:
            out[i] = refused_result(op, exc)
    return out


def _batch_read(request: Request, guard: WriteGuard, op: Operation) -> Result:
    store, rtype = guard.store, op.resource_type
    seen = reads_mod.Seen()
    base = _base(request)
    if op.rid is not None and "/" not in op.rid and not op.query:
        try:
            reads_mod.check_served(rtype)
            decision = access.decide(guard.policy, rtype, "read")
            resp = reads_mod.read(store, rtype, op.rid, None, decision, seen)
        except FhirError as exc:
            audit_events.record_access(request, "read", rtype, exc.status, seen.refs or [f"{rtype}/{op.rid}"])
            raise
        audit_events.record_access(request, "read", rtype, resp.status_code, seen.refs, seen.count)
        return Result(200, rtype, op.rid, _etag(resp), bytes(resp.body).decode(), read_body=True)
    if op.rid is not None:
        raise FhirError(
            400,
            "not-supported",
            f"{op.where}.request.url: a batch reads Type/id or searches Type?query",
            expression=f"{op.where}.request.url",
        )
    try:
        reads_mod.check_served(rtype)
        access.decide(guard.policy, rtype, "search")
        scope = access.search_access(guard.policy)
        params = parse_qsl(op.query or "", keep_blank_values=True)
        resp = reads_mod.search_type(store, base, rtype, params, False, scope, seen)
    except FhirError as exc:
        audit_events.record_access(request, "search-type", rtype, exc.status, seen.refs)
        raise
    audit_events.record_access(request, "search-type", rtype, resp.status_code, seen.refs, seen.count)
    return Result(200, "Bundle", "", 0, bytes(resp.body).decode(), read_body=True)


def _etag(resp: Response) -> int:
    tag = resp.headers.get("etag", "")
    digits = "".join(c for c in tag if c.isdigit())
    return int(digits) if digits else 0


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
    request: Request,
    find: WriteChannel,
    what: str,
    line: RequestLine,
    guard: WriteGuard,
    raw_body: bytes | None = None,
) -> tuple[FhirRestChannel, RequestOutcome, str]:
    """Read the request, decide its operations by the caller's scopes, validate and map them, then
    commit them with the request line. In a batch, the entries the scopes refuse are not applied:
    their 403/404 results take their places in the outcome. ``raw_body``: the body to write, when it
    is not the request's (a PATCH writes the patched resource)."""
    channel = _channel(find)
    raw = b""
    parsed: list[Operation] = []
    refused: dict[int, Result] = {}
    reads: dict[int, Operation] = {}
    total = 0
    try:
        _check_line(line)
        if raw_body is not None:
            raw = raw_body
        elif request.method != "DELETE":
            raw = await _body(request, channel)
        limit = channel.config.max_bundle_entries
        if len(raw) >= OFF_LOOP_BYTES:  # a large Bundle: parsed and split on a worker thread
            ops, kind = await asyncio.to_thread(_operations, raw, line, limit)
        else:
            ops, kind = _operations(raw, line, limit)
        parsed = ops
        # A batch's malformed entries and its reads are answered apart from its writes.
        refused = {i: refused_result(op, op.refused) for i, op in enumerate(ops) if op.refused}
        reads = {i: op for i, op in enumerate(ops) if op.method == "GET" and i not in refused}
        writes = [i for i in range(len(ops)) if i not in refused and i not in reads]
        pending = [ops[i] for i in writes]
        # Under patient/ scopes the guard reads the records a write targets: on the thread pool.
        by_guard = (
            await run_in_threadpool(guard.allowed, pending, kind)
            if guard.reads
            else guard.allowed(pending, kind)
        )
        refused.update({writes[j]: res for j, res in by_guard.items()})
        writes = [i for i in writes if i not in refused]
        if kind == "batch":
            failed = await asyncio.to_thread(prepare_batch, [ops[i] for i in writes], channel.pipeline.engine)
            failed.update(_records_failed([ops[i] for i in writes]))
            refused.update({writes[j]: refused_result(ops[writes[j]], exc) for j, exc in failed.items()})
            writes = [i for i in writes if i not in refused]
        else:
            await prepare_all([ops[i] for i in writes], channel.pipeline.engine)
            if len(writes) > OFF_LOOP_ENTRIES:
                await asyncio.to_thread(_check_records, [ops[i] for i in writes])
            else:
                _check_records([ops[i] for i in writes])
        total = len(ops)
        ops = [ops[i] for i in writes]
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
    if (refused or reads) and outcome.error is None:
        read_results = await _batch_reads(request, guard, reads)
        applied = iter(outcome.results)
        outcome.results = [
            refused[i] if i in refused else read_results[i] if i in read_results else next(applied)
            for i in range(total)
        ]
    log.info(
        "message.%s",
        "error" if outcome.error else "processed",
        extra={"channel": channel.config.name, "message_id": outcome.message_id},
    )
    if len(parsed) > OFF_LOOP_ENTRIES:  # a large request's objects are freed off the loop
        await asyncio.to_thread(release, parsed)
    if outcome.error is not None:
        raise outcome.error
    return channel, outcome, kind


async def _plan(channel: FhirRestChannel, ops: list[Operation]) -> None:
    """Plan a transaction's entries for the bulk path (:func:`hms_ach.fhir.transaction.plan`). It is
    only a head start: should it fail, the writer does that work itself."""
    try:
        await asyncio.to_thread(transaction.plan, ops, channel.config.name)
    except Exception as exc:  # noqa: BLE001 - the request goes on without a plan
        for op in ops:
            op.plan = None
        log.warning(
            "fhir.transaction_plan_failed",
            extra={"channel": channel.config.name, "error_kind": error_kind(exc)},
        )


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


#: The ``Prefer: return=`` values (RFC 7240, FHIR R4 3.1.0.5.2); representation is the default.
RETURN_PREFERENCES = ("minimal", "representation", "OperationOutcome")


def prefer_return(request: Request) -> str:
    """What the client asked a write to return (``Prefer: return=...``); an unknown value is ignored
    (a preference, not a requirement)."""
    for part in request.headers.get("prefer", "").replace(";", ",").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "return" and value.strip().strip('"') in RETURN_PREFERENCES:
            return value.strip().strip('"')
    return "representation"


def _single_response(request: Request, res: Result) -> Response:
    if res.status == 204:
        return Response(status_code=204, headers={"ETag": f'W/"{res.version}"'})
    headers = {
        "ETag": f'W/"{res.version}"',
        "Location": f"{_base(request)}/{fhir_type(res.resource_type) or res.resource_type}/{res.rid}"
        f"/_history/{res.version}",
    }
    if res.last_updated is not None:
        headers["Last-Modified"] = format_datetime(
            (
                res.last_updated if res.last_updated.tzinfo else res.last_updated.replace(tzinfo=UTC)
            ).astimezone(UTC),
            usegmt=True,
        )
    wanted = prefer_return(request)
    body = as_fhir(res.resource_type, res.body)
    if wanted == "minimal":
        return Response(status_code=res.status, headers=headers)
    if wanted == "OperationOutcome" or body is None:
        outcome = orjson.dumps(written_outcome(res))
        return Response(outcome, status_code=res.status, media_type=FHIR_JSON, headers=headers)
    return Response(body, status_code=res.status, media_type=FHIR_JSON, headers=headers)


# ---------------------------------------------------------------------------- handlers
async def transaction_or_batch(request: Request, find: WriteChannel, guard: WriteGuard) -> Response:
    """``POST /fhir``: a transaction or batch Bundle."""
    _ch, outcome, kind = await _run(request, find, "Bundle", _request_line(request, ""), guard)
    answer = (_base(request), kind, outcome.results, prefer_return(request))
    if len(outcome.results) > OFF_LOOP_ENTRIES:  # a thousand entries' answer: built off the loop
        return await asyncio.to_thread(bundle_response, *answer)
    return bundle_response(*answer)


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


async def patch(
    request: Request, find: WriteChannel, resource_type: str, rid: str, guard: WriteGuard
) -> Response:
    """``PATCH T/id`` with a JSON Patch (RFC 6902) or a JSON Merge Patch (RFC 7396): applied to the
    current version, then written as
    an update of the whole resource (validated, mapped, scoped as ``update`` and stored like a PUT,
    so ``hms-ach replay`` runs it as one). ``If-Match`` is honoured (412); without it the patch is
    applied to the version read, and read and applied again if another write came between."""
    check_writable(resource_type)
    if resource_type == "Basic":
        raise FhirError(405, "not-supported", "a shift sent as Basic is updated with PUT, not patched")
    channel = _channel(find)
    _check_line(_request_line(request, f"{resource_type}/{rid}"))
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    doc = _parse_patch(await _body(request, channel, PATCH_TYPES), ctype)
    if_match = request.headers.get("if-match")
    if not reads_mod.ID_RE.match(rid):
        raise FhirError(404, "not-found", f"{resource_type}/{rid[:64]} is not known")
    for attempt in range(1, PATCH_ATTEMPTS + 1):
        current = await run_in_threadpool(resources.read, guard.store, resource_type, rid)
        if current is None:
            raise FhirError(404, "not-found", f"{resource_type}/{rid[:64]} is not known")
        if current.deleted:
            raise FhirError(410, "deleted", f"{resource_type}/{rid} was deleted")
        patched = _apply_patch(doc, orjson.loads(current.text), resource_type, rid)
        line = RequestLine("PUT", f"{resource_type}/{rid}", if_match or f'W/"{current.version}"', None)
        try:
            _ch, outcome, _k = await _run(
                request, find, f"PATCH {resource_type}", line, guard, raw_body=orjson.dumps(patched)
            )
        except FhirError as exc:
            if exc.status != 412 or if_match is not None:
                raise
            if attempt == PATCH_ATTEMPTS:
                raise FhirError(
                    409, "conflict", f"{resource_type}/{rid} kept changing while the patch was applied"
                ) from None
            continue
        return _single_response(request, outcome.results[0])
    raise RuntimeError("unreachable")  # the loop returns or raises


def _parse_patch(raw: bytes, ctype: str) -> list[dict[str, Any]] | dict[str, Any]:
    """The operations of a JSON Patch document (a list of operation objects), or the object of a
    JSON Merge Patch; 400 for anything else."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, "structure", f"the patch is not valid JSON: {exc}") from None
    if ctype != "application/json-patch+json" and isinstance(doc, dict):
        return doc  # a merge patch
    if ctype == "application/merge-patch+json":
        raise FhirError(400, "structure", "a JSON Merge Patch is an object")
    if not isinstance(doc, list) or not all(isinstance(op, dict) and "op" in op for op in doc):
        raise FhirError(400, "structure", 'a JSON Patch is a list of operations like {"op": "replace", ...}')
    return doc


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: ``patch``'s members replace ``target``'s, objects merge, ``null`` removes."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _apply_patch(
    doc: list[dict[str, Any]] | dict[str, Any], resource: dict[str, Any], resource_type: str, rid: str
) -> Any:
    """``resource`` with the JSON Patch or merge patch ``doc`` applied; a patch that cannot be applied
    (a failed ``test``, a path that does not exist) is 422, one that changes the id or type 400."""
    if isinstance(doc, dict):
        patched = merge_patch(resource, {**doc, "meta": None} if "meta" in doc else doc)
        if patched.get("resourceType") != resource_type or patched.get("id") != rid:
            raise FhirError(
                400, "invalid", f"a patch may not change the resourceType or id of {resource_type}/{rid}"
            )
        patched.pop("meta", None)
        return patched
    try:
        patched = jsonpatch.apply_patch(resource, doc)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise FhirError(422, "processing", f"the JSON Patch cannot be applied: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise FhirError(400, "structure", f"the JSON Patch is malformed: {exc}") from None
    if (
        not isinstance(patched, dict)
        or patched.get("resourceType") != resource_type
        or patched.get("id") != rid
    ):
        raise FhirError(
            400, "invalid", f"a patch may not change the resourceType or id of {resource_type}/{rid}"
        )
    patched.pop("meta", None)  # the store writes meta
    return patched
