"""The one ingest path: envelope -> evaluate -> commit (one transaction) -> outcome.

Every inbound message, whatever its transport and format, is committed by :func:`commit` inside a
job of the group-commit writer (:mod:`hms_ach.store.writer`):

1. **envelope**: the raw bytes and what is known of them (:data:`Envelope`: channel, content
   type, idempotency key, sender, type...).
2. **evaluate** (pure, no I/O): for HL7 v2, :func:`evaluate` reads MSH, checks it against the
   channel's :class:`~hms_ach.hl7v2.policy.Hl7Policy`, decodes by MSH-18, parses, picks the message
   mapping and runs it. Problems become a RejectError (AR) or a ContentError (AE) with an HL7
   location. CSV rows are evaluated by :mod:`hms_ach.ingest.csv_rows`.
3. **commit** (:func:`commit`, in the writer's transaction): the message row is stored under the
   one idempotency rule: a keyed envelope goes in with ``INSERT .. ON CONFLICT DO NOTHING`` on
   its key, and when the key was stored before nothing else happens and the caller gets a
   :class:`Duplicate` (the earlier row's id, status and answer). Otherwise the caller's ``work``
   writes the records (:func:`write_records`: one SAVEPOINT, a domain error rolls it back and
   becomes the message's error) and returns the :class:`Finish` written on the row (status,
   ACK code and text, error and its location), all in the same transaction.

   A keyed HL7 v2 message also carries its :func:`content_hash`, stored beside its row; on a key
   conflict the hashes are compared (:attr:`Duplicate.same_content`). The same content is a true
   resend: the stored answer, and a ``duplicate`` row. Different content under the same MSH-3,
   MSH-4 and MSH-10 is a *reused control id* (:func:`commit_hl7`), handled as the channel's
   ``on_reused_control_id`` says: ``reject`` stores it (raw, for review and replay) as
   ``rejected`` with AR and an ERR at MSH-10 (code 205) and writes nothing else; ``process`` runs it
   as a new message. Either way it is stored under the derived key :func:`reused_key` (the key
   and the hash), so a resend of *it* is in turn a duplicate that gets its stored answer.
4. **outcome**: only after that transaction committed does the caller get its result (for
   MLLP the ACK to send, for a file the move to ``processed/`` or ``error/``).

Replay runs the same ``work`` again on the stored row (:func:`rerun`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, TypeVar

import orjson

from hms_ach.core.errors import ContentError, Err0357, MessageError, RejectError
from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.core.redact import error_kind
from hms_ach.hl7v2.ack import (
    Acks,
    MasterFile,
    acknowledge,
    build_ack,
    fallback_ack,
    master_file,
    msa_code,
    split_acks,
)
from hms_ach.hl7v2.limits import (
    DEFAULT_MAX_RECORD_BYTES,
    MAX_APPLICATION_CHARS,
    MAX_CONTROL_ID_CHARS,
    MAX_IDENTIFIER_CHARS,
    check_header,
    check_message,
    check_structure,
    limits_of,
)
from hms_ach.hl7v2.parse import MshHeader, codec_for, decode, parse_text, read_header
from hms_ach.hl7v2.policy import Hl7Policy, should_send_application, should_send_commit
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import LoadedFile
from hms_ach.store import conflicts, messages
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository, WriteOutcome
from hms_ach.store.savepoint import SavepointNeeded, is_optimistic, savepoint
from hms_ach.store.writer import StoreWriter

log = logging.getLogger("hms_ach.ingest.pipeline")

#: Called in the transaction of every HL7 v2 message stored as processed, with its envelope, its
#: stored id and its MSH: the outbound routing of the ``mllp`` sink (hms_ach.outbound.hl7_routing)
#: subscribes here while a sink routes inbound messages, so that the outbox row commits with the
#: message (the delivery contract); it gets the records the message produced (FHIRPath filters).
#: Empty: nothing is called.
MESSAGE_ROUTERS: list[Callable[[Tx, Envelope, int, MshHeader, MappingResult | None], None]] = []

R = TypeVar("R")

#: One inbound message as it arrived: raw bytes, metadata and its idempotency key (None: unkeyed).
Envelope: TypeAlias = messages.MessageMeta


# ---------------------------------------------------------------------- commit (every channel)
@dataclass(frozen=True)
class Finish:
    """The final state of a message, written on its row in the commit's transaction."""

    status: str  # processed | error | rejected (a row is received until finished; duplicate rows are added)
    ack_code: str | None  # MSA-1 for HL7 (AA, CE...), the HTTP status for REST, AA/AE for files
    ack: str | None = None  # the answer's text (the ACK message, a JSON summary), if any
    error: str | None = None
    error_location: str | None = None  # an HL7 location, a JSON path, "file line 3 column x"


@dataclass(frozen=True)
class Duplicate:
    """The envelope's idempotency key was stored before: nothing was written for it."""

    original_id: int
    status: str
    ack_code: str | None
    ack: str | None
    #: False when the envelope's content hash differs from the stored message's (a reused key);
    #: always True for an envelope without a content hash.
    same_content: bool = True


#: What a channel does for a stored message: ``work(tx, message_id)`` writes the records and
#: returns its result with the message's :class:`Finish` (None leaves the row ``received``, for a
#: file whose rows are committed in later transactions and finished by :func:`finish`).
Work: TypeAlias = Callable[[Tx, int], tuple[R, Finish | None]]


def commit(tx: Tx, envelope: Envelope, work: Work[R]) -> R | Duplicate:
    """Store ``envelope`` under the one idempotency rule and run ``work`` for it, in ``tx``.

    A keyed envelope whose key is stored already returns :class:`Duplicate` and writes nothing
    (with ``same_content`` False when the envelope has a content hash that differs from the stored
    message's); an unkeyed one is always stored. Call it inside a writer job; the result is durable
    once the job's transaction committed.
    """
    key = envelope.idempotency_key
    if key:
        # The unique key decides (INSERT .. ON CONFLICT DO NOTHING): None means stored before.
        message_id = messages.insert_new(tx, envelope)
        if message_id is None:
            row = messages.find_by_key(tx, key)
            if row is None:
                raise RuntimeError(f"message key {key!r} conflicted but no stored message has it")
            same = envelope.content_hash is None or _stored_hash(tx, row) == envelope.content_hash
            return Duplicate(int(row.id), str(row.status), row.ack_code, row.ack, same)
    else:
        message_id = messages.insert_message(tx, envelope, keyed=False)
    return _run(tx, message_id, work, replay=False)


def content_hash(raw: bytes) -> str:
    """Hex SHA-256 of a message's content, as compared to tell a resend from a reused control id.

    The content is the raw bytes as received, with any MLLP framing (VT at the start, FS CR at the
    end) and segment-terminator differences taken out: CR LF and LF count as CR, and CRs at either
    end are dropped. Nothing else is left out, MSH-7 (date/time of message) included: a sender that
    resends a message repeats it byte for byte, MSH-7 too, so the normalised bytes match; a new
    message under an old control id almost always differs in MSH-7 or beyond. Hashing bytes rather
    than parsed fields keeps this exact, charset-independent and cheap.
    """
    body = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\x0b\x1c\r")
    return hashlib.sha256(body).hexdigest()


def reused_key(key: str, digest: str) -> str:
    """The idempotency key of a message that reused ``key`` with content hashed ``digest``."""
    return f"{key}#sha256:{digest}"


def _stored_hash(tx: Tx, row: messages.StoredMessage) -> str:
    """The content hash of a stored message: as stored, or from its raw bytes (stored before hashes)."""
    return messages.stored_content_hash(tx, row.id) or content_hash(row.raw)


def rerun(tx: Tx, message_id: int, work: Work[R]) -> R:
    """Run ``work`` again for the stored message ``message_id`` (replay); its replay count goes up."""
    return _run(tx, message_id, work, replay=True)


def finish(tx: Tx, message_id: int, done: Finish, replay: bool = False) -> None:
    """Write the final state of a stored message (a file whose rows were committed meanwhile)."""
    messages.finish(
        tx,
        message_id,
        done.status,
        done.ack_code,
        done.ack,
        error=done.error,
        error_location=done.error_location,
        replay=replay,
    )


def _run(tx: Tx, message_id: int, work: Work[R], replay: bool) -> R:
    result, done = work(tx, message_id)
    if done is not None:
        finish(tx, message_id, done, replay)
    return result


def only_finish(done: Finish) -> Work[None]:
    """Work that writes no records: the stored message is only finished with ``done``."""

    def work(_tx: Tx, _message_id: int) -> tuple[None, Finish]:
        return None, done

    return work


def record_duplicate(tx: Tx, envelope: Envelope, dup: Duplicate) -> int:
    """Store a resent message as a ``duplicate`` row pointing at the original, with its answer."""
    return messages.insert_message(
        tx,
        envelope,
        "duplicate",
        keyed=False,
        duplicate_of=dup.original_id,
        ack_code=dup.ack_code,
        ack=dup.ack,
    )


#: The generic text answering a message that failed in the store for a reason not foreseen (no
#: exception text: it can hold field values or SQL).
INTERNAL_ERROR_TEXT = "the message could not be processed (internal error); it is stored for replay"


def find_nul(value: Any, path: str, index: str = "[{}]") -> str | None:
    """The path of the first string (or object key) of the JSON ``value`` that holds a NUL
    character, None when none does: ``Patient.name[0].family`` from ``path`` ``Patient``, or with
    ``index`` ``".{}"``, ``body.given.0``. The one NUL rule of the JSON writes (FHIR, ``/api/v1``):
    refused with the path, the same on both databases. Iterative: any depth is safe."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key, inner in reversed(list(item.items())):
                name = str(key)
                if "\x00" in name:
                    return where
                stack.append((inner, f"{where}.{name}"))
        elif isinstance(item, list):
            for i in range(len(item) - 1, -1, -1):
                stack.append((item[i], where + index.format(i)))
    return None


def check_records(result: MappingResult, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
    """Raise ContentError (ERR-3 104 or 102) when a mapped record cannot be stored the same way on
    every database: a business identifier longer than the key columns (255 characters), a NUL
    character anywhere in it, or its JSON larger than ``max_record_bytes``. The location is the
    record (``Patient.identifier``); :func:`evaluate` turns it into the HL7 field when it can.

    Every channel's records pass here before they are written (HL7 v2 in :func:`evaluate`, FHIR and
    ``/api/v1`` writes in their request checks), so the database never sees a value it would
    refuse on PostgreSQL and take on SQLite."""
    if _all_pass(result.records, max_record_bytes):
        return
    for rec in result.records:
        _check_record(rec, max_record_bytes)


def _all_pass(records: list[RecordWrite], max_record_bytes: int) -> bool:
    """True when every record surely passes :func:`_check_record`: short NUL-free keys, and the
    JSON of all their contents together free of NUL and no larger than one record may be (so no
    single one is larger). One ``orjson.dumps`` for the message instead of one per record; on
    False the records are checked one by one, which finds the first failure and its reason."""
    for rec in records:
        for value in (rec.key_system, rec.key_value):
            if value and ("\x00" in value or len(value) > MAX_IDENTIFIER_CHARS):
                return False
    try:
        body = orjson.dumps([rec.content for rec in records])
    except (TypeError, orjson.JSONEncodeError):
        return False
    return len(body) <= max_record_bytes and b"\\u0000" not in body


def _check_record(rec: RecordWrite, max_record_bytes: int) -> None:
    for part, value in (("system", rec.key_system), ("value", rec.key_value)):
        if not value:
            continue
        if "\x00" in value:
            raise ContentError(
                f"the {rec.resource_type} identifier {part} contains a NUL character (0x00)",
                f"{rec.resource_type}.identifier.{part}",
                Err0357.DATA_TYPE_ERROR,
            )
        if len(value) > MAX_IDENTIFIER_CHARS:
            raise ContentError(
                f"the {rec.resource_type} identifier {part} is {len(value)} characters long; "
                f"at most {MAX_IDENTIFIER_CHARS} are accepted",
                f"{rec.resource_type}.identifier.{part}",
                Err0357.VALUE_TOO_LONG,
            )
    try:
        body = orjson.dumps(rec.content)
    except (TypeError, orjson.JSONEncodeError):
        return  # not JSON-ready here (the store renders it); the size is checked where it can be
    if b"\\u0000" in body:
        raise ContentError(
            f"the {rec.resource_type} record contains a NUL character (0x00), which cannot be stored",
            rec.resource_type,
            Err0357.DATA_TYPE_ERROR,
        )
    if len(body) > max_record_bytes:
        raise ContentError(
            f"the {rec.resource_type} record is {len(body)} bytes of JSON; at most {max_record_bytes} "
            "are stored per record (max_record_bytes)",
            rec.resource_type,
            Err0357.VALUE_TOO_LONG,
        )


def write_records(
    tx: Tx, result: MappingResult, message_id: int, checked: bool = False
) -> tuple[list[WriteOutcome], MessageError | None]:
    """Upsert the records of ``result`` for message ``message_id`` in one SAVEPOINT (none in the
    writer's optimistic batches: store/savepoint.py ``optimistic``).

    A domain error (a missing reference target, an update-only record that is not there...) rolls
    the savepoint back and is returned, so the message row can still be finished with it. The
    records pass :func:`check_records` first (every channel's: HL7 v2 and CSV rows alike), so no
    value reaches the database that one of the two would refuse; ``checked``: they passed it
    already (an HL7 v2 message's, in :func:`evaluate`, under the channel's own size limit).
    """
    if not checked:
        try:
            check_records(result)
        except ContentError as exc:
            return [], exc
    if is_optimistic(tx):  # the writer's batch without SAVEPOINTs: it runs again with them if this fails
        try:
            return Repository(tx).apply(result, message_id), None
        except MessageError as exc:
            raise SavepointNeeded(type(exc).__name__) from exc
    try:
        with savepoint(tx):
            writes = Repository(tx).apply(result, message_id)
    except MessageError as exc:
        return [], exc
    return writes, None


# ---------------------------------------------------------------------- HL7 v2
@dataclass
class Evaluation:
    raw: bytes
    meta: Envelope
    header: MshHeader | None = None
    result: MappingResult | None = None
    error: MessageError | None = None
    crashed: bool = False  # an unexpected exception (a bug) was turned into the error
    #: for a crash: the exception's kind and where it was raised (``ValueError at engine.py:12 (f)``),
    #: never its text; for developers' tools (the ACK says only that an internal error happened)
    crash: str | None = None
    #: an MFN whose MFI-6 asks for an MFK (AL, ER): its answer is the MFK, one MFA per MFE
    master_file: MasterFile | None = None


@dataclass
class Outcome:
    """What happened to one HL7 v2 message, after commit."""

    message_id: int | None
    status: str
    ack_code: str
    ack: str
    send: bool = True
    error: str | None = None
    writes: list[WriteOutcome] = field(default_factory=list)
    charset: str = "utf-8"
    #: Enhanced mode (MSH-15/16), unless refused at commit: the application ACK, sent after ``ack``
    #: when ``app_send`` (MSH-16 says so); see :func:`hms_ach.hl7v2.ack.acknowledge`.
    app_ack: str | None = None
    app_send: bool = False

    def ack_bytes(self) -> bytes:
        return self.ack.encode(self.charset, errors="replace")

    @property
    def app_code(self) -> str | None:
        """MSA-1 of the application ACK (AA/AE), None without one."""
        return msa_code(self.app_ack) if self.app_ack else None

    @property
    def result_code(self) -> str:
        """What became of the message: the application ACK's code, else ``ack_code``."""
        return self.app_code or self.ack_code

    def replies(self) -> list[bytes]:
        """The ACKs to send, in order: the commit (or only) ACK and the application ACK, each
        when MSH-15/16 ask for it."""
        out = [self.ack_bytes()] if self.send else []
        if self.app_send and self.app_ack:
            out.append(self.app_ack.encode(self.charset, errors="replace"))
        return out


def idempotency_key(header: MshHeader) -> str | None:
    """MSH-3|MSH-4|MSH-10; None without a control id."""
    if not header.control_id:
        return None
    return f"{header.sending_application}|{header.sending_facility}|{header.control_id}"


def _describe(meta: Envelope, header: MshHeader) -> None:
    meta.control_id = header.control_id[:200]
    meta.sending_application = header.sending_application[:200]
    meta.sending_facility = header.sending_facility[:200]
    meta.message_type = header.message_type[:50]


def evaluate(raw: bytes, policy: Hl7Policy, engine: MappingEngine) -> Evaluation:
    """Parse, check and map ``raw``; never raises for bad input (the problem is in ``.error``).

    The checks of :mod:`hms_ach.hl7v2.limits` run before anything is mapped: the header fields of
    the key (AR), the structure caps (AR, before the text is split) and NUL characters (AE); the
    mapped records then pass :func:`check_records`. A message refused at the header is stored
    without a key (its key could not be stored), so each resend is stored and answered again."""
    ev = evaluate_header(raw, policy)
    if ev.error is not None or ev.header is None:
        return ev
    header, meta = ev.header, ev.meta
    limits = limits_of(policy)
    try:
        policy.check(header)
        text = decode(raw, header, policy.default_charset)
        check_structure(text, header, limits)
        message = parse_text(text, header.separators)
        check_message(message)
        ev.master_file = master_file(message)
        mapping = engine.mapping_for(message)
        pid = message.first("PID")
        meta.partition_key = pid.field(3).split(header.separators.component)[0][:200] if pid else None
        ev.result = engine.map_message(message, mapping, lineage=False)  # lineage is for the preview only
        try:
            check_records(ev.result, limits.max_record_bytes)
        except ContentError as exc:
            raise _in_message(exc, engine, message, mapping) from None
    except MessageError as exc:
        ev.error = exc
    except Exception as exc:  # noqa: BLE001 - a bug must become an AE, never a crash
        # no traceback and no exception text: both can hold field values
        kind, where = error_kind(exc), _where(exc)
        log.error(
            "pipeline.unexpected_error", extra={"channel": policy.channel, "error_kind": kind, "where": where}
        )
        ev.crashed = True
        ev.crash = f"{kind} at {where}"
        ev.error = MessageError(
            "internal error while mapping the message; it is stored for replay", "", Err0357.INTERNAL_ERROR
        )
    return ev


def evaluate_header(raw: bytes, policy: Hl7Policy) -> Evaluation:
    """The first step of :func:`evaluate`: MSH read and checked, the envelope described, keyed and
    hashed; ``.error`` is set when MSH is refused (AR). Also the evaluation of a message whose map
    worker was lost (:mod:`hms_ach.ingest.workers`), which then gets an internal error."""
    meta = messages.MessageMeta(channel=policy.channel, raw=raw)
    ev = Evaluation(raw, meta)
    try:
        header = read_header(raw)
    except RejectError as exc:
        ev.error = exc
        return ev
    ev.header = header
    _describe(meta, header)
    meta.version = header.version[:20]
    try:
        check_header(header)
    except RejectError as exc:
        ev.error = exc
        return ev
    meta.idempotency_key = idempotency_key(header)
    if meta.idempotency_key:
        meta.content_hash = content_hash(raw)
    return ev


def _where(exc: BaseException) -> str:
    """``module:line`` of the innermost frame of ``exc`` (where a bug is), without its text."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"


def _in_message(
    error: ContentError, engine: MappingEngine, message: Hl7Message, mapping: LoadedFile
) -> ContentError:
    """``error`` (located at a record element such as ``Patient.identifier.value``) located at the
    HL7 field the value came from, found by mapping the message again with lineage (only on this
    error path). Unchanged when lineage does not say."""
    target = error.location
    if "." not in target:
        return error
    try:
        traced = engine.map_message(message, mapping, lineage=True)
    except Exception:  # noqa: BLE001 - it mapped once; if not now, keep the record's location
        return error
    rtype, _, element = target.partition(".")
    element = element.rsplit(".", 1)[0]  # identifier.value -> identifier
    found = [
        line
        for rec in traced.records
        if rec.resource_type == rtype
        for line in rec.lineage
        if element in line.target and line.source[:3].isalnum() and "-" in line.source
    ]
    # the long value is the one shortened in the lineage ("...")
    found.sort(key=lambda line: not line.value.endswith("..."))
    if not found:
        return error
    where = found[0].source.split(" ")[0]
    return ContentError(f"{where}: {error.message}", where, error.code)


def ack_for(ev: Evaluation, code: str, error: MessageError | None) -> str:
    """The ACK text answering ``ev`` with ``code`` (AA/AE/AR); an AR that cannot fail without MSH.
    A NUL character echoed from the message's header is left out (it could not be stored)."""
    if ev.header is None:
        ack = fallback_ack(ev.raw, error or RejectError("unreadable MSH"))
    else:
        ack = build_ack(_echoable(ev.header), code, error)
    return ack.replace("\x00", "")


def _echoable(header: MshHeader) -> MshHeader:
    """``header`` with every field clipped to what an ACK may echo (MSH-10 to
    :data:`MAX_CONTROL_ID_CHARS`, the others to :data:`MAX_APPLICATION_CHARS`): a sender's 5 MB
    MSH-10 is refused, never reflected back at it."""
    if all(len(f) <= MAX_CONTROL_ID_CHARS for f in header.fields):
        return header
    clipped = [
        f[: MAX_CONTROL_ID_CHARS if n == 10 else MAX_APPLICATION_CHARS] if n > 2 else f
        for n, f in enumerate(header.fields)
    ]
    return MshHeader(header.separators, clipped)


def charset_of(ev: Evaluation, policy: Hl7Policy) -> str:
    """The codec the ACK of ``ev`` is sent in (the message's own, ASCII when unknown)."""
    if ev.header is None:
        return "ascii"
    try:
        return codec_for(ev.header, policy.default_charset)
    except MessageError:
        return "ascii"


def hl7_work(ev: Evaluation, charset: str) -> Work[Outcome]:
    """The records of ``ev`` (or its error) and its ACK, for the stored message."""

    def work(tx: Tx, message_id: int) -> tuple[Outcome, Finish]:
        error = ev.error
        writes: list[WriteOutcome] = []
        if error is None and ev.result is not None:
            writes, error = write_records(tx, ev.result, message_id, checked=True)
        if error is None:
            code, status = "AA", "processed"
            if ev.header is not None:
                for route in MESSAGE_ROUTERS:
                    route(tx, ev.meta, message_id, ev.header, ev.result)
        else:
            code = error.ack_code if ev.header is not None else "AR"
            if isinstance(error, RejectError):
                code = "AR"
            status = "rejected" if code == "AR" else "error"
        if ev.header is None:
            acks = Acks(ack_for(ev, code, error), code, True)
        else:
            warnings = ev.result.warnings if error is None and ev.result is not None else []
            acks = acknowledge(ev.header, code, error, ev.master_file, warnings)
        outcome = Outcome(
            message_id,
            status,
            acks.ack_code,
            acks.ack,
            acks.send,
            str(error) if error else None,
            writes,
            charset,
            acks.app_ack,
            acks.app_send,
        )
        done = Finish(
            status,
            acks.result_code,
            acks.text,
            error=error.message if error else _warnings_text(ev),
            error_location=error.location if error else _warnings_location(ev),
        )
        return outcome, done

    return work


def _warnings_text(ev: Evaluation) -> str | None:
    """What a processed message was stored without (rules and records marked ``critical: false``
    that failed), kept on the message row as its error text, prefixed ``warning:``."""
    if ev.result is None or not ev.result.warnings:
        return None
    return "; ".join(f"warning: {w.message}" for w in ev.result.warnings)[:2000]


def _warnings_location(ev: Evaluation) -> str | None:
    return ev.result.warnings[0].location or None if ev.result is not None and ev.result.warnings else None


def reused_control_id(ev: Evaluation, policy: Hl7Policy) -> Evaluation:
    """``ev`` as the channel takes it when its control id was used before for different content:
    unchanged under ``process``; under ``reject`` an AR at MSH-10 (205) that writes no records."""
    if policy.on_reused_control_id == "process":
        return ev
    error = RejectError(
        "MSH-10 control id reused with different content (an earlier message from this MSH-3/MSH-4 "
        f"has it); channel {policy.channel} has on_reused_control_id: reject",
        "MSH-10",
        Err0357.DUPLICATE_KEY,
    )
    return replace(ev, result=None, error=error, crashed=False)


def _reuses_control_id(tx: Tx, ev: Evaluation, message_id: int) -> bool:
    """Another stored message has ``ev``'s key (MSH-3|MSH-4|MSH-10) with different content."""
    key = ev.meta.idempotency_key
    if not key or not ev.meta.content_hash:
        return False
    row = messages.find_by_key(tx, key)
    return row is not None and row.id != message_id and _stored_hash(tx, row) != ev.meta.content_hash


def commit_hl7(ev: Evaluation, policy: Hl7Policy) -> Callable[[Tx], Outcome]:
    """The writer job for one evaluated HL7 v2 message; a resent one is answered with the stored ACK,
    one that reuses a stored control id for different content as the channel's policy says."""

    def job(tx: Tx) -> Outcome:
        charset = charset_of(ev, policy)
        out = commit(tx, ev.meta, hl7_work(ev, charset))
        if isinstance(out, Duplicate) and not out.same_content and ev.meta.content_hash:
            # Stored under a key of its own (the key and the hash): its own resend is a duplicate.
            meta = replace(
                ev.meta, idempotency_key=reused_key(str(ev.meta.idempotency_key), ev.meta.content_hash)
            )
            log.warning(
                "message.reused_control_id",
                extra={
                    "channel": policy.channel,
                    "original_id": out.original_id,
                    "policy": policy.on_reused_control_id,
                },
            )
            out = commit(tx, meta, hl7_work(reused_control_id(ev, policy), charset))
        if not isinstance(out, Duplicate):
            return out
        dup_id = record_duplicate(tx, ev.meta, out)
        return stored_outcome(dup_id, ev.header, out, charset)

    return job


def stored_outcome(dup_id: int, header: MshHeader | None, dup: Duplicate, charset: str) -> Outcome:
    """The answer to a resend: the stored ACK and, when one was stored, the stored application
    ACK, each sent as the (same) MSH-15/16 say."""
    parts = split_acks(dup.ack or "")
    ack = parts[0] if parts else ""
    app_ack = parts[1] if len(parts) > 1 else None
    ack_code = msa_code(ack) or dup.ack_code or ""
    send = bool(ack) and should_send_commit(header, ack_code)
    app_send = should_send_application(header, msa_code(app_ack) if app_ack else None)
    return Outcome(
        dup_id, "duplicate", ack_code, ack, send, charset=charset, app_ack=app_ack, app_send=app_send
    )


def replay_hl7(tx: Tx, message_id: int, raw: bytes, policy: Hl7Policy, engine: MappingEngine) -> Outcome:
    """Evaluate the stored HL7 v2 message again and rewrite its records, status and ACK in ``tx``.

    A message that reused the control id of another stored message for different content is taken
    as the channel's ``on_reused_control_id`` says now: still rejected under ``reject`` (the ERR
    says why; set ``process`` on the channel to have it processed), processed under ``process``.
    """
    ev = evaluate(raw, policy, engine)
    if policy.on_reused_control_id != "process" and _reuses_control_id(tx, ev, message_id):
        ev = reused_control_id(ev, policy)
    return rerun(tx, message_id, hl7_work(ev, charset_of(ev, policy)))


def store_failed(ev: Evaluation, policy: Hl7Policy, exc: BaseException) -> Callable[[Tx], Outcome]:
    """The writer job that stores ``ev`` as an ``error`` after its own job failed in the store for
    a reason not foreseen (any error of the job that is not :class:`StoreUnavailable`; that job's
    transaction or savepoint was rolled back, so this one starts clean).

    The message is stored unkeyed with its raw bytes and only the descriptive columns that cannot
    be the cause (its key could be), answered AE (CE in enhanced mode) with ERR-3 207 and the
    generic :data:`INTERNAL_ERROR_TEXT`; the row's error adds the reason kind (the error's class
    and SQLSTATE, never its text) for the operator. ``hms-ach replay`` runs it again after a fix.
    Raises :class:`StoreUnavailable` if even that cannot be stored."""
    kind = error_kind(exc)
    log.error("message.store_failed", extra={"channel": policy.channel, "error_kind": kind})
    meta = messages.MessageMeta(
        channel=policy.channel,
        raw=ev.raw,
        control_id=ev.meta.control_id[:64],
        message_type=ev.meta.message_type,
        version=ev.meta.version,
    )
    failed = Evaluation(
        ev.raw, meta, ev.header, error=MessageError(INTERNAL_ERROR_TEXT, "", Err0357.INTERNAL_ERROR)
    )
    work = hl7_work(failed, charset_of(failed, policy))

    def noted(tx: Tx, message_id: int) -> tuple[Outcome, Finish | None]:
        outcome, done = work(tx, message_id)
        if done is not None:
            done = replace(done, error=f"{done.error} (store error: {kind})")
        return outcome, done

    def job(tx: Tx) -> Outcome:
        try:
            out = commit(tx, meta, noted)
        except StoreUnavailable:
            raise
        except Exception as again:  # noqa: BLE001 - the store refuses even this: try later
            raise StoreUnavailable(f"the message could not be stored ({error_kind(again)})") from None
        if isinstance(out, Duplicate):
            raise RuntimeError("an unkeyed message was taken for a duplicate")
        return out

    return job


# --- cluster (task J, docs/scale-out.md): a unique violation caused by a concurrent insert of the
# same key by another instance; the message's job runs again and then finds the committed row.
async def retry_unique(run: Callable[[], Awaitable[R]]) -> R:
    """``run()``, again (bounded by ``conflicts.MAX_ATTEMPTS``) while it fails on a unique violation."""
    for attempt in range(conflicts.MAX_ATTEMPTS - 1):
        try:
            return await run()
        except StoreUnavailable:
            raise
        except Exception as exc:
            if not conflicts.is_unique_violation(exc):
                raise
            log.warning("message.conflict_retry", extra={"attempt": attempt + 1})
            await asyncio.sleep(conflicts.pause(attempt))
    return await run()


# --- end cluster


class Pipeline:
    """Runs messages through evaluate -> commit with the current mapping engine (hot-swappable)."""

    def __init__(self, writer: StoreWriter, engine: MappingEngine):
        self.writer = writer
        self.engine = engine
        # --- map workers (engine.map_workers, hms_ach/ingest/workers.py): when set, the HL7 v2
        # evaluate runs there, given this engine as the fallback; None: in this process.
        self.remote: Callable[[bytes, Hl7Policy, MappingEngine], Awaitable[Evaluation]] | None = None
        # --- end map workers

    async def process_hl7(self, raw: bytes, policy: Hl7Policy, actor: str | None = None) -> Outcome:
        """Evaluate and commit one HL7 message; its writer jobs run in its channel's lane, so that
        one busy channel cannot fill every group commit (store/writer.py). ``actor``: who sent it
        (JSON, see :func:`hms_ach.store.audit.actor_json`), for the audit trail."""
        if self.remote is not None:  # map workers
            try:
                ev = await self.remote(raw, policy, self.engine)
            except Exception as exc:  # noqa: BLE001 - a fault of the pool: mapped here instead
                log.error(
                    "map_workers.failed", extra={"channel": policy.channel, "error_kind": error_kind(exc)}
                )
                ev = evaluate(raw, policy, self.engine)
        else:
            ev = evaluate(raw, policy, self.engine)
        ev.meta.actor = actor
        try:
            outcome = await retry_unique(lambda: self.writer.run(commit_hl7(ev, policy), lane=policy.channel))
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - not foreseen: stored as an error, answered AE
            outcome = await self.writer.run(store_failed(ev, policy, exc), lane=policy.channel)
        _log(outcome, policy)
        return outcome

    async def record_rejection(self, prefix: bytes, error: MessageError, policy: Hl7Policy) -> Outcome:
        """Store a message that cannot be accepted at all (e.g. over the size limit) by its first
        bytes, with the AR sent for it, so the operator sees it in ``hms-ach messages``."""
        ev = Evaluation(prefix, messages.MessageMeta(channel=policy.channel, raw=prefix), error=error)
        try:
            ev.header = read_header(prefix)
            _describe(ev.meta, ev.header)
        except RejectError:
            ev.header = None
        work = hl7_work(ev, "ascii")

        def job(tx: Tx) -> Outcome:
            out = commit(tx, ev.meta, work)  # unkeyed: never a duplicate
            if isinstance(out, Duplicate):
                raise RuntimeError("an unkeyed message was taken for a duplicate")
            return out

        try:
            outcome = await self.writer.run(job, lane=policy.channel)
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - not foreseen: stored as an error, answered AE
            outcome = await self.writer.run(store_failed(ev, policy, exc), lane=policy.channel)
        _log(outcome, policy)
        return outcome

    def replay(self, message_id: int, policies: dict[str, Hl7Policy]) -> Outcome:
        """Re-run a stored HL7 v2 message through the current mappings; updates its row and records."""

        def job(tx: Tx) -> Outcome:
            row = messages.get(tx, message_id)
            if row is None:
                raise KeyError(f"no message with id {message_id}")
            if row.status == "duplicate" and row.duplicate_of:
                raise ValueError(
                    f"message {message_id} is a duplicate of {row.duplicate_of}; replay that one"
                )
            policy = policies.get(row.channel) or Hl7Policy(row.channel)
            return replay_hl7(tx, message_id, bytes(row.raw), policy, self.engine)

        return self.writer.run_sync(job)


def _log(outcome: Outcome, policy: Hl7Policy) -> None:
    extra: dict[str, Any] = {
        "channel": policy.channel,
        "message_id": outcome.message_id,
        "status": outcome.status,
        "ack_code": outcome.ack_code,
    }
    log.info("message.%s", outcome.status, extra=extra)
