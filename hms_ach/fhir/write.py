"""The FHIR write interactions: validate and map, then one job in the group-commit writer.

Each request becomes a list of :class:`Operation` (one for create/update/delete, one per entry of a
Bundle). :func:`prepare` validates and maps an operation before it reaches the writer (pure, no
I/O): :mod:`hms_ach.fhir.validation` checks the resource, and the FHIR mapping
(``mappings/messages/fhir_*.yaml``) turns the resource into a canonical record write.

:func:`request_job` is the writer job: it stores the request like an inbound message (raw body,
``fhir+json``) with its request line, applies every operation through the store's FHIR
interactions (:mod:`hms_ach.store.resources`) inside a SAVEPOINT and records the outcome on the
message row. A transaction Bundle is all-or-nothing: the first failing entry rolls every entry
back, and only the message row (status ``error``) stays. The store and the checks run inside the
transaction (reference targets, shift rules) refuse with domain errors
(:mod:`hms_ach.store.errors`); :func:`apply_request` turns them into the HTTP status and
OperationOutcome of the entry or the request.

So that a big Bundle cannot starve the other channels (docs/reliability.md, "Fairness between
channels"), :func:`prepare_all` validates and maps a Bundle in a worker thread, and
:func:`submit_request` commits a batch Bundle in time-bounded slices between other jobs. A
transaction Bundle stays one job, but its runs of creates and key-conditional writes are written
in bulk (:mod:`hms_ach.fhir.transaction`), falling back to :func:`_apply` entry by entry.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson

from hms_ach.core import fairness
from hms_ach.core.errors import MessageError
from hms_ach.core.records import RECORD_TYPES, RecordWrite
from hms_ach.core.references import references, rewrite_references
from hms_ach.fhir.outcomes import FhirError, http_error, operation_outcome
from hms_ach.fhir.validation import (
    BASIC_RECORDS,
    BASIC_TYPE_SYSTEM,
    VERIFICATION_EXT,
    WRITE_TYPES,
    validate,
)
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store import messages, resources
from hms_ach.store.errors import (
    AlreadyExists,
    DomainError,
    Invalid,
    MultipleMatches,
    NotFound,
    RuleViolation,
    UniqueViolation,
    VersionConflict,
)
from hms_ach.store.port import Tx
from hms_ach.store.resources import RequestLine, store_request_line, stored_request_line
from hms_ach.store.savepoint import savepoint
from hms_ach.store.workforce_queries import StoredRoster
from hms_ach.store.writer import StoreWriter
from hms_ach.workforce import shift_rules
from hms_ach.workforce.overtime import check_contract
from hms_ach.workforce.rules import RuleBroken

R = TypeVar("R")

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_URN = "urn:uuid:"


@dataclass
class Operation:
    """One write: ``method`` POST/PUT/DELETE on ``resource_type`` (``rid`` or a conditional ``query``)."""

    method: str
    resource_type: str
    rid: str | None = None
    query: str | None = None  # conditional update: identifier=system|value
    resource: dict[str, Any] | None = None
    if_match: str | None = None
    if_none_exist: str | None = None
    full_url: str | None = None
    where: str = ""  # "Bundle.entry[3]" for errors
    record: RecordWrite | None = None
    extra: list[RecordWrite] = field(default_factory=list)
    refused: FhirError | None = None
    """A batch entry refused before it could be applied (malformed, invalid): answered with this."""
    plan: Any = None  # a transaction entry's work done before the writer (hms_ach.fhir.transaction.plan)


@dataclass
class Result:
    status: int
    resource_type: str = ""
    rid: str = ""
    version: int = 0
    body: str | None = None  # the stored resource JSON
    last_updated: datetime | None = None
    outcome: dict[str, Any] | None = None
    changed: bool = False  # this request wrote a new version (replay diffs it against the one before)
    read_body: bool = False  # a batch's GET entry: ``body`` is the answer (a resource or a searchset)

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.rid}/_history/{self.version}" if self.rid else ""


@dataclass
class RequestOutcome:
    message_id: int
    results: list[Result]
    error: FhirError | None = None


# ---------------------------------------------------------------------------- mapping
def prepare(op: Operation, engine: MappingEngine) -> None:
    """Validate and map ``op.resource`` (pure): sets ``op.record`` (and any further records)."""
    if op.method == "DELETE":
        return
    rtype = validate(op.resource, op.where + "." if op.where else "")
    if rtype != op.resource_type:
        raise FhirError(
            400,
            "invalid",
            f"the body is a {rtype} but the URL names {op.resource_type}",
            expression=f"{op.where}.resourceType".lstrip("."),
        )
    assert op.resource is not None
    if op.method == "PUT" and op.rid and op.resource.get("id") is None:
        raise FhirError(
            400,
            "required",
            f"an update must carry the id of the URL in the body ({rtype}.id = {op.rid!r})",
            expression=f"{op.where}.resource.id" if op.where else f"{rtype}.id",
        )
    if op.method == "PUT" and op.rid and op.resource.get("id") != op.rid:
        raise FhirError(
            400,
            "invalid",
            f"the body's id {str(op.resource.get('id'))[:64]!r} is not the id in the URL {op.rid!r}",
            expression=f"{rtype}.id",
        )
    body = {k: v for k, v in op.resource.items() if k not in ("id", "meta")}
    try:
        result = engine.map_input("fhir", rtype, body)
    except MessageError as exc:
        raise FhirError(
            422, "processing", f"{exc}", expression=getattr(exc, "location", None) or None
        ) from exc
    target = rtype
    if rtype == "Basic":
        code = next(c["code"] for c in op.resource["code"]["coding"] if c.get("system") == BASIC_TYPE_SYSTEM)
        target = BASIC_RECORDS[code]
    primary = [r for r in result.records if r.resource_type == target]
    if not primary:
        raise FhirError(422, "processing", f"the mapping for {rtype} produced no {target} record")
    op.record = primary[0]
    op.extra = [r for r in result.records if r is not primary[0]]
    op.resource_type = target


async def prepare_all(ops: list[Operation], engine: MappingEngine) -> None:
    """:func:`prepare` every operation; a Bundle's in a worker thread, so that validating and mapping
    a thousand entries never holds up the event loop (and the other channels' ACKs)."""
    if len(ops) <= 1:
        for op in ops:
            prepare(op, engine)
        return
    await asyncio.to_thread(_prepare_each, ops, engine)


def prepare_batch(ops: list[Operation], engine: MappingEngine) -> dict[int, FhirError]:
    """:func:`prepare` every operation of a batch (independent entries): the refusal of each entry
    that fails, by index, instead of failing the batch. Runs in a worker thread like
    :func:`prepare_all`."""

    def each() -> dict[int, FhirError]:
        failed: dict[int, FhirError] = {}
        for i, op in enumerate(ops, start=1):
            try:
                prepare(op, engine)
            except FhirError as exc:
                failed[i - 1] = exc
            if i % PREPARE_PAUSE_EVERY == 0:
                fairness.pause(PREPARE_PAUSE_SECONDS)
        return failed

    return each()


def release(ops: list[Operation]) -> None:
    """Drop what ``ops`` hold (the parsed resources, the records, the plans) one operation at a time.

    A thousand entries' objects freed at once (when the request's last reference to them goes) hold
    the interpreter for about 10 ms, on whichever thread drops them: on the event loop, every
    channel's ACK waits that long. Run in a worker thread, this frees them in small steps that
    the event loop runs between (the interpreter switches threads between them)."""
    for op in ops:
        op.resource = None
        op.record = None
        op.extra = []
        op.plan = None


def refused_result(op: Operation, error: FhirError) -> Result:
    """The result of a batch entry refused before it was applied."""
    return Result(error.status, op.resource_type, outcome=_outcome(error))


#: While a Bundle is validated and mapped in its worker thread, it pauses this long after every
#: ``PREPARE_PAUSE_EVERY`` entries, so that the event loop gets the interpreter lock promptly.
PREPARE_PAUSE_SECONDS = 0.001
PREPARE_PAUSE_EVERY = 10


def _prepare_each(ops: list[Operation], engine: MappingEngine) -> None:
    for i, op in enumerate(ops, start=1):
        prepare(op, engine)
        if i % PREPARE_PAUSE_EVERY == 0:
            fairness.pause(PREPARE_PAUSE_SECONDS)


# ---------------------------------------------------------------------------- checks in the transaction
def _check_targets(tx: Tx, rtype: str, content: dict[str, Any], where: str) -> None:
    """Every literal reference ``Type/id`` to a type we store must name a live record."""
    for path, ref in references(content):
        if ref.startswith(_URN):
            raise Invalid(
                f"{ref[:80]} is not the fullUrl of any entry of this Bundle",
                code="not-found",
                expression=f"{where}{rtype}.{path}",
            )
        parts = ref.split("/")
        if len(parts) != 2 or parts[0] not in RECORD_TYPES:
            continue
        if not resources.is_live(tx, parts[0], parts[1]):
            raise RuleViolation(
                f"{rtype}.{path} refers to {ref[:80]}, which does not exist",
                code="not-found",
                expression=f"{where}{rtype}.{path}",
            )


def check_shift(tx: Tx, rid: str, content: dict[str, Any], where: str) -> None:
    """The workforce assignment rules (:func:`hms_ach.workforce.shift_rules.check_shift`, the same
    ones /api/v1 and CSV rows pass): a broken one is a business-rule OperationOutcome whose
    diagnostics start with the rule's code (``[shift.overlap] ...``)."""
    try:
        shift_rules.check_shift(StoredRoster(tx), content, rid)
    except RuleBroken as exc:
        element = "subject" if exc.element == "practitioner" else "extension"
        code = "code-invalid" if exc.code == "shift.unknown_status" else "business-rule"
        detail = exc.detail
        if exc.other is not None:  # the clashing shift, by the id a FHIR client knows it by
            detail = detail.replace(f"shift {exc.other}", f"shift Basic/{exc.other}")
        raise RuleViolation(f"[{exc.code}] {detail}", code=code, expression=f"{where}.{element}") from None


def _etag_version(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    m = re.fullmatch(r'\s*(?:W/)?"?(\d{1,18})"?\s*', if_match)
    if not m:
        raise Invalid(f'If-Match {if_match[:40]!r} is not an ETag like W/"3"')
    return int(m.group(1))


#: The version an If-Match header names (None without one); Invalid when it is not an ETag.
etag_version = _etag_version


def parse_identifier_query(query: str, header: str) -> tuple[str | None, str]:
    """``identifier=system|value`` (the only conditional criterion we accept) -> (system, value)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "identifier" or not pairs[0][1]:
        raise Invalid(f"{header} must be identifier=system|value, got {query[:80]!r}", code="not-supported")
    system, sep, value = pairs[0][1].rpartition("|")
    if not value:
        raise Invalid(f"{header}: the identifier has no value")
    return (system or None) if sep else None, value


# ---------------------------------------------------------------------------- store work
def _resource_write(tx: Tx, op: Operation, resolved: dict[str, str]) -> resources.ResourceWrite:
    """``op``'s mapped record as a store write: references resolved, the If-Match read when the store
    checks it, and the checks that need the record id (reference targets, shift rules)."""
    rec = op.record
    if rec is None:
        raise RuntimeError(f"{op.where or op.resource_type}: the operation was not prepared")
    rtype = op.resource_type
    where = f"{op.where}." if op.where else ""

    body_id = (op.resource or {}).get("id")

    def check(rid: str, content: dict[str, Any]) -> None:
        if op.method == "PUT" and op.rid is None and body_id is not None and body_id != rid:
            # a conditional update names its record by the criterion; a body id must agree with it
            raise Invalid(
                f"the body's id {str(body_id)[:64]!r} is not the id of the record the conditional "
                f"update matches ({rtype}/{rid}); leave the id out or send the matched one",
                expression=f"{where}{rtype}.id",
            )
        _check_targets(tx, rtype, content, where)
        if rtype == "Shift":
            check_shift(tx, rid, content, f"{op.where}.Basic" if op.where else "Basic")
        if rtype == "Practitioner":
            try:  # the overtime contract it carries is configured (docs/workforce-rules.md)
                check_contract(content, "employee.unknown_contract")
            except RuleBroken as exc:
                raise RuleViolation(
                    f"[{exc.code}] {exc.detail}",
                    code="business-rule",
                    expression=f"{where}Practitioner.extension",
                ) from None

    return resources.ResourceWrite(
        rec,
        rewrite_references(rec.content, resolved),
        [(extra, rewrite_references(extra.content, resolved)) for extra in op.extra],
        expected_version=lambda: _etag_version(op.if_match),
        check=check,
    )


def _apply(tx: Tx, op: Operation, resolved: dict[str, str], message_id: int) -> Result:
    """Run ``op`` as the store interaction it names; refusals are domain errors."""
    rtype = op.resource_type
    if op.method == "DELETE":
        rid = op.rid or ""
        if not _ID_RE.match(rid):
            raise NotFound(f"{rtype}/{rid[:64]}")
        gone = resources.delete(tx, rtype, rid, message_id, lambda: _etag_version(op.if_match))
        return Result(204, rtype, rid, gone.version, None, gone.last_updated, changed=gone.changed)
    write = _resource_write(tx, op, resolved)
    if op.method == "POST" and op.if_none_exist:
        system, value = parse_identifier_query(op.if_none_exist, "If-None-Exist")
        written = resources.create_unless_exists(tx, write, system, value, message_id)
    elif op.method == "POST":
        written = resources.create(tx, write, message_id)
    elif op.rid is not None:
        written = resources.update(tx, op.rid, write, message_id)
    else:
        system, value = parse_identifier_query(op.query or "", "the conditional update")
        written = resources.update_by_identifier(tx, system, value, write, message_id)
    return Result(
        201 if written.created else 200,
        rtype,
        written.id,
        written.version,
        written.text,
        written.last_updated,
        changed=written.changed,
    )


def _refusal(exc: DomainError, op: Operation | None, batch: bool = False) -> FhirError:
    """The HTTP answer to a refusal of ``op`` (None: of the request as a whole)."""
    error = http_error(exc)
    if isinstance(exc, UniqueViolation) and batch:
        error.diagnostics = f"a unique constraint refused the write: {exc.error_type}"
    if op is None:
        return error
    rtype = op.resource_type
    if isinstance(exc, VersionConflict):
        error.diagnostics = (
            f'If-Match {op.if_match} does not match the current version W/"{exc.current}" of {exc.reference}'
        )
    elif isinstance(exc, MultipleMatches):
        what = "If-None-Exist" if op.method == "POST" else "the conditional update"
        error.diagnostics = f"{what} matches {exc.count} {rtype} records"
    elif isinstance(exc, AlreadyExists):
        error.diagnostics = (
            f"{exc}; use a conditional update (PUT {rtype}?identifier=system|value) or If-None-Exist"
        )
    elif isinstance(exc, NotFound) and op.method == "PUT":
        error.diagnostics = (
            f"{exc.reference} is not known; this server does not create "
            "on update (use POST or a conditional update)"
        )
    return error


_REFERENCE = b'"reference":"'


def _reference_texts(resource: dict[str, Any] | None) -> list[str]:
    """The reference texts of ``resource``. Serialised first (a few microseconds in C), so that the
    Python walk runs only on a resource with a ``reference`` string in it: a 1,000-entry Bundle's
    ordering is part of its one writer job."""
    if not resource:
        return []
    try:
        if _REFERENCE not in orjson.dumps(resource):
            return []
    except TypeError:  # not plain JSON: walk it
        pass
    return [ref for _path, ref in references(resource)]


def order_entries(ops: list[Operation]) -> list[Operation]:
    """DELETEs first, then writes so that every urn:uuid target is written before it is referred to."""
    full_urls = {op.full_url: op for op in ops if op.full_url}
    deletes = [op for op in ops if op.method == "DELETE"]
    pending = [op for op in ops if op.method != "DELETE"]
    done: set[str] = set()
    ordered: list[Operation] = []
    while pending:
        progressed = False
        for op in list(pending):
            needs = {ref for ref in _reference_texts(op.resource) if ref in full_urls} - {op.full_url}
            if needs - done:
                continue
            pending.remove(op)
            ordered.append(op)
            if op.full_url:
                done.add(op.full_url)
            progressed = True
        if not progressed:
            raise Invalid(
                "the Bundle's urn:uuid references form a cycle: " + ", ".join(op.where for op in pending)
            )
    return deletes + ordered


__all__ = [
    "VERIFICATION_EXT",
    "WRITE_TYPES",
    "Operation",
    "RequestLine",
    "RequestOutcome",
    "Result",
    "apply_request",
    "check_writable",
    "prepare",
    "prepare_all",
    "prepare_batch",
    "refused_result",
    "rejection",
    "rejection_job",
    "request_job",
    "store_request_line",
    "stored_request_line",
    "submit_request",
    "validate",
]


def check_writable(resource_type: str) -> None:
    """404 (a type name) or 400 (not even one) unless ``resource_type`` is written here."""
    if resource_type not in WRITE_TYPES:
        raise FhirError(
            404 if resource_type[:1].isupper() else 400,
            "not-supported",
            f"resource type {resource_type[:64]!r} cannot be written here; writable: "
            f"{', '.join(WRITE_TYPES)}",
        )


def request_job(
    meta: messages.MessageMeta, ops: list[Operation], kind: str, line: RequestLine | None = None
) -> Callable[[Tx], RequestOutcome]:
    """The writer job for one request (``kind`` is single, transaction or batch): committed through
    the one ingest path (:func:`hms_ach.ingest.pipeline.commit`) with the request's URL and headers
    kept beside the body for replay."""

    def work(tx: Tx, message_id: int) -> tuple[RequestOutcome, Finish]:
        store_request_line(tx, message_id, line)
        return apply_request(tx, message_id, ops, kind)

    def job(tx: Tx) -> RequestOutcome:
        return _unkeyed(pipeline.commit(tx, meta, work))

    return job


def apply_request(tx: Tx, message_id: int, ops: list[Operation], kind: str) -> tuple[RequestOutcome, Finish]:
    """Apply the prepared ``ops`` of the stored request ``message_id``; its outcome and how its
    message row ends (the pipeline writes that on the row)."""
    results: list[Result] = []
    error: FhirError | None = None
    ordered = ops
    if kind == "batch":
        results = _apply_batch_entries(tx, message_id, ops)
    else:
        resolved: dict[str, str] = {}
        current: Operation | None = None

        def apply_one(op: Operation) -> Result:
            nonlocal current
            current = op
            res = _apply(tx, op, resolved, message_id)
            if op.full_url and res.rid:
                resolved[op.full_url] = f"{res.resource_type}/{res.rid}"
            return res

        try:
            with savepoint(tx):
                if kind == "transaction":
                    # imported here: hms_ach.fhir.transaction builds on this module
                    from hms_ach.fhir.transaction import apply_transaction

                    ordered = order_entries(ops)
                    results = apply_transaction(tx, message_id, ordered, resolved, apply_one)
                else:
                    results = [apply_one(op) for op in ops]
        except DomainError as exc:
            error, results = _refusal(exc, current), []
    if kind == "transaction" and error is None:
        # keep the Bundle's entry order in the response
        by_op = dict(zip([id(o) for o in ordered], results, strict=True))
        results = [by_op[id(o)] for o in ops]
    return RequestOutcome(message_id, results, error), _request_finish(results, error)


def _apply_batch_entries(tx: Tx, message_id: int, ops: list[Operation]) -> list[Result]:
    """Batch entries are independent: each in its own SAVEPOINT, a refusal answers that entry only."""
    results: list[Result] = []
    for op in ops:
        try:
            with savepoint(tx):
                results.append(_apply(tx, op, {}, message_id))
        except DomainError as exc:
            refusal = _refusal(exc, op, batch=True)
            results.append(Result(refusal.status, op.resource_type, outcome=_outcome(refusal)))
    return results


def _request_finish(results: list[Result], error: FhirError | None) -> Finish:
    """How the message row of an applied request ends: its status and the ACK text kept for it."""
    ack = orjson.dumps(
        {
            "status": error.status if error else [r.status for r in results],
            "location": [r.location for r in results],
        }
    ).decode()
    return Finish(
        "error" if error else "processed",
        str(error.status) if error else "200",
        ack,
        error=error.diagnostics if error else None,
        error_location=(error.expression or "")[:200] if error else None,
    )


async def submit_request(
    writer: StoreWriter,
    meta: messages.MessageMeta,
    ops: list[Operation],
    kind: str,
    line: RequestLine | None,
    slice_seconds: float,
) -> RequestOutcome:
    """Commit the prepared request through ``writer`` without starving the other channels.

    A request of one operation is one light job in its channel's lane. A transaction Bundle is one
    heavy job (it is all-or-nothing, so it cannot be split), which the writer commits in a batch
    of its own (on PostgreSQL apart: on its second connection, while other jobs commit). A batch Bundle's entries are independent, so they are applied in slices, each a
    heavy job committed on its own in the request's own lane, and other channels' messages are
    committed between the slices. A slice applies at least one entry and ends once it has used
    ``slice_seconds`` of writer time while another job waits, or ``MAX_SLICE_FACTOR`` times that
    in any case. The message row is stored with the first slice (status ``received``) and finished
    with the last. A slice that cannot commit (503) leaves the entries of the slices before it
    applied and the row ``received``; a resend of the Bundle repairs that (conditional entries
    find their records, plain creates answer 409 for the records already made).
    """
    lane = meta.channel if len(ops) <= 1 else f"{meta.channel}/{meta.control_id}"
    if kind != "batch" or len(ops) <= 1:
        job = request_job(meta, ops, kind, line)
        outcome: RequestOutcome = await writer.run(
            job, lane=lane, heavy=len(ops) > 1, apart=kind == "transaction" and len(ops) > 1
        )
        return outcome
    budget = _SliceBudget(slice_seconds, writer.others_waiting)
    message_id, results = await writer.run(_batch_first_job(meta, ops, line, budget), lane=lane, heavy=True)
    while len(results) < len(ops):
        results += await writer.run(
            _batch_slice_job(message_id, ops, list(results), budget), lane=lane, heavy=True
        )
    return RequestOutcome(message_id, results)


#: A slice of a batch Bundle goes on past ``batch_slice_seconds`` while no other job waits, up to
#: this many times that: a Bundle alone needs fewer commits, and a job that comes meanwhile waits
#: for the entry being applied when it came, or at most this long.
MAX_SLICE_FACTOR = 10


@dataclass
class _SliceBudget:
    """When a slice of a batch Bundle ends: ``seconds`` spent while ``others_waiting()``."""

    seconds: float
    others_waiting: Callable[[], bool]

    def over(self, started: float) -> bool:
        spent = time.monotonic() - started
        if spent >= self.seconds * MAX_SLICE_FACTOR:
            return True
        return spent >= self.seconds and self.others_waiting()


def _apply_batch_slice(
    tx: Tx, message_id: int, ops: list[Operation], done: list[Result], budget: _SliceBudget
) -> list[Result]:
    """Apply the entries after the ``done`` ones, at least one, until ``budget`` is over; the last
    slice also finishes the message row."""
    started = time.monotonic()
    start = len(done)
    results = _apply_batch_entries(tx, message_id, ops[start : start + 1])
    for op in ops[start + 1 :]:
        if budget.over(started):
            break
        results += _apply_batch_entries(tx, message_id, [op])
    if start + len(results) == len(ops):
        pipeline.finish(tx, message_id, _request_finish(done + results, None))
    return results


def _batch_first_job(
    meta: messages.MessageMeta, ops: list[Operation], line: RequestLine | None, budget: _SliceBudget
) -> Callable[[Tx], tuple[int, list[Result]]]:
    """Store the batch request (its row stays ``received`` until its last entry) and apply the
    first slice of its entries."""

    def work(tx: Tx, message_id: int) -> tuple[tuple[int, list[Result]], Finish | None]:
        store_request_line(tx, message_id, line)
        return (message_id, _apply_batch_slice(tx, message_id, ops, [], budget)), None

    def job(tx: Tx) -> tuple[int, list[Result]]:
        return _unkeyed(pipeline.commit(tx, meta, work))

    return job


def _batch_slice_job(
    message_id: int, ops: list[Operation], done: list[Result], budget: _SliceBudget
) -> Callable[[Tx], list[Result]]:
    """Apply the next slice of a batch request's entries (those after the ``done`` ones)."""

    def job(tx: Tx) -> list[Result]:
        return _apply_batch_slice(tx, message_id, ops, done, budget)

    return job


def rejection_job(
    meta: messages.MessageMeta, error: FhirError, line: RequestLine | None = None
) -> Callable[[Tx], int]:
    """Store a request refused before it could be applied (bad JSON, invalid resource) with its reason."""

    def work(tx: Tx, message_id: int) -> tuple[int, Finish]:
        store_request_line(tx, message_id, line)
        return message_id, rejection(error)

    def job(tx: Tx) -> int:
        return _unkeyed(pipeline.commit(tx, meta, work))

    return job


def _unkeyed(result: R | Duplicate) -> R:
    """FHIR requests are stored unkeyed (their records' business keys make them idempotent)."""
    if isinstance(result, Duplicate):
        raise RuntimeError(f"an unkeyed request was answered as a duplicate of {result.original_id}")
    return result


def _outcome(exc: FhirError) -> dict[str, Any]:
    return operation_outcome(
        exc.code, exc.diagnostics, expression=[exc.expression] if exc.expression else None
    )


def rejection(error: FhirError) -> Finish:
    """How the message row of a request refused before it was applied ends."""
    return Finish(
        "rejected",
        str(error.status),
        None,
        error=error.diagnostics,
        error_location=(error.expression or "")[:200] or None,
    )
