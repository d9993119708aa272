"""The single path every HL7 v2 message takes: envelope -> parse -> map -> store (one transaction) -> ACK.

1. ``evaluate`` (pure, no I/O): read MSH, check it, decode by MSH-18, parse, pick the message mapping
   and run it. Problems become a RejectError (AR) or a ContentError (AE) with an HL7 location.
2. ``commit_job`` (in the group-commit writer, one SAVEPOINT): store the raw message under its
   idempotency key (MSH-3|MSH-4|MSH-10); a duplicate gets the stored ACK again and nothing else
   happens; otherwise the records, their history and the ACK text are written together.
3. Only after the transaction committed does the caller get the ACK to send.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from hms_ach.core.errors import Err0357, MessageError, RejectError
from hms_ach.core.records import MappingResult
from hms_ach.hl7v2.ack import ack_code_for, build_ack, fallback_ack, should_send
from hms_ach.hl7v2.parse import MshHeader, codec_for, decode, parse_text, read_header
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store import messages
from hms_ach.store.repository import Repository, WriteOutcome
from hms_ach.store.writer import StoreWriter

log = logging.getLogger("hms_ach.ingest.pipeline")


@dataclass
class Hl7Policy:
    """What a channel accepts, and how it reads text."""

    channel: str
    default_charset: str = "utf-8"
    versions: list[str] = field(
        default_factory=lambda: ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8"]
    )
    processing_ids: list[str] = field(default_factory=lambda: ["P", "T", "D"])


@dataclass
class Evaluation:
    raw: bytes
    meta: messages.MessageMeta
    header: MshHeader | None = None
    result: MappingResult | None = None
    error: MessageError | None = None
    crashed: bool = False  # an unexpected exception (a bug) was turned into the error


@dataclass
class Outcome:
    """What happened to one message, after commit."""

    message_id: int | None
    status: str
    ack_code: str
    ack: str
    send: bool = True
    error: str | None = None
    writes: list[WriteOutcome] = field(default_factory=list)
    charset: str = "utf-8"

    def ack_bytes(self) -> bytes:
        return self.ack.encode(self.charset, errors="replace")


def idempotency_key(header: MshHeader) -> str | None:
    if not header.control_id:
        return None
    return f"{header.sending_application}|{header.sending_facility}|{header.control_id}"


def _version_ok(version: str, accepted: list[str]) -> bool:
    return any(version == v or version.startswith(v + ".") for v in accepted)


def evaluate(raw: bytes, policy: Hl7Policy, engine: MappingEngine) -> Evaluation:
    """Parse and map ``raw``; never raises for bad input (the problem is in ``.error``)."""
    meta = messages.MessageMeta(channel=policy.channel, raw=raw)
    ev = Evaluation(raw, meta)
    try:
        header = read_header(raw)
    except RejectError as exc:
        ev.error = exc
        return ev
    ev.header = header
    meta.control_id = header.control_id[:200]
    meta.sending_application = header.sending_application[:200]
    meta.sending_facility = header.sending_facility[:200]
    meta.message_type = header.message_type[:50]
    meta.version = header.version[:20]
    meta.idempotency_key = idempotency_key(header)
    try:
        if not header.control_id:
            raise RejectError("MSH-10 message control id is empty", "MSH-10", Err0357.REQUIRED_FIELD_MISSING)
        if not header.message_code:
            raise RejectError("MSH-9 message type is empty", "MSH-9", Err0357.REQUIRED_FIELD_MISSING)
        if not _version_ok(header.version, policy.versions):
            raise RejectError(
                f"version {header.version or '(empty)'} is not accepted by channel {policy.channel} "
                f"(accepts {', '.join(policy.versions)})",
                "MSH-12",
                Err0357.UNSUPPORTED_VERSION,
            )
        if header.processing_id not in policy.processing_ids:
            raise RejectError(
                f"processing id {header.processing_id or '(empty)'} is not accepted "
                f"(accepts {', '.join(policy.processing_ids)})",
                "MSH-11",
                Err0357.UNSUPPORTED_PROCESSING_ID,
            )
        text = decode(raw, header, policy.default_charset)
        message = parse_text(text)
        mapping = engine.mapping_for(message)
        pid = message.first("PID")
        meta.partition_key = pid.field(3).split(header.separators.component)[0][:200] if pid else None
        ev.result = engine.map_message(message, mapping, lineage=False)  # lineage is for the preview only
    except MessageError as exc:
        ev.error = exc
    except Exception as exc:  # noqa: BLE001 - a bug must become an AE with its reason, never a crash
        log.exception("pipeline.unexpected_error")
        ev.crashed = True
        ev.error = MessageError(
            f"internal error while mapping: {type(exc).__name__}: {exc}", "", Err0357.INTERNAL_ERROR
        )
    return ev


def _ack_for(ev: Evaluation, code: str, error: MessageError | None) -> str:
    if ev.header is None:
        return fallback_ack(ev.raw, error or RejectError("unreadable MSH"))
    return build_ack(ev.header, code, error)


def _charset(ev: Evaluation, policy: Hl7Policy) -> str:
    if ev.header is None:
        return "ascii"
    try:
        return codec_for(ev.header, policy.default_charset)
    except MessageError:
        return "ascii"


def commit_job(ev: Evaluation, policy: Hl7Policy) -> Callable[[Connection], Outcome]:
    """The store work for one evaluated message, to run in the writer's transaction."""

    def job(conn: Connection) -> Outcome:
        charset = _charset(ev, policy)
        key = ev.meta.idempotency_key
        if key:
            # The unique key decides (INSERT .. ON CONFLICT DO NOTHING): None means stored before.
            new_id = messages.insert_new(conn, ev.meta)
            if new_id is None:
                dup = _duplicate(conn, ev, key, charset)
                if dup is None:
                    raise RuntimeError(f"message key {key!r} conflicted but no stored message has it")
                return dup
            message_id = new_id
        else:
            message_id = messages.insert_message(conn, ev.meta, keyed=False)
        return apply_evaluation(conn, ev, message_id, charset)

    return job


def _duplicate(conn: Connection, ev: Evaluation, key: str, charset: str) -> Outcome | None:
    row = messages.find_by_key(conn, key)
    if row is None:
        return None
    dup_id = messages.insert_message(
        conn, ev.meta, "duplicate", keyed=False, duplicate_of=row.id, ack_code=row.ack_code, ack=row.ack
    )
    plain = {"CA": "AA", "CE": "AE", "CR": "AR"}.get(row.ack_code or "", row.ack_code or "AA")
    send = should_send(ev.header, plain) if ev.header else True
    return Outcome(dup_id, "duplicate", row.ack_code or "", row.ack or "", send, charset=charset)


def apply_evaluation(
    conn: Connection, ev: Evaluation, message_id: int, charset: str, replay: bool = False
) -> Outcome:
    """Write the records of ``ev`` (or its error) for the stored message ``message_id``."""
    error = ev.error
    writes: list[WriteOutcome] = []
    if error is None and ev.result is not None:
        savepoint = conn.begin_nested()
        try:
            writes = Repository(conn).apply(ev.result, message_id)
            savepoint.commit()
        except MessageError as exc:
            savepoint.rollback()
            error = exc
    if error is None:
        code, status = "AA", "processed"
    else:
        code = error.ack_code if ev.header is not None else "AR"
        if isinstance(error, RejectError):
            code = "AR"
        status = "rejected" if code == "AR" else "error"
    ack = _ack_for(ev, code, error)
    ack_code = ack_code_for(ev.header, code)
    messages.finish(
        conn,
        message_id,
        status,
        ack_code,
        ack,
        error=error.message if error else None,
        error_location=error.location if error else None,
        replay=replay,
    )
    send = should_send(ev.header, code) if ev.header is not None else True
    return Outcome(message_id, status, ack_code, ack, send, str(error) if error else None, writes, charset)


class Pipeline:
    """Runs messages through evaluate -> commit with the current mapping engine (hot-swappable)."""

    def __init__(self, writer: StoreWriter, engine: MappingEngine):
        self.writer = writer
        self.engine = engine

    async def process_hl7(self, raw: bytes, policy: Hl7Policy) -> Outcome:
        ev = evaluate(raw, policy, self.engine)
        outcome = await self.writer.run(commit_job(ev, policy))
        _log(outcome, policy)
        return outcome

    def process_hl7_sync(self, raw: bytes, policy: Hl7Policy) -> Outcome:
        ev = evaluate(raw, policy, self.engine)
        outcome = self.writer.run_sync(commit_job(ev, policy))
        _log(outcome, policy)
        return outcome

    async def record_rejection(self, prefix: bytes, error: MessageError, policy: Hl7Policy) -> Outcome:
        """Store a message that cannot be accepted at all (e.g. over the size limit) by its first
        bytes, with the AR sent for it, so the operator sees it in ``hms-ach messages``."""
        ev = Evaluation(prefix, messages.MessageMeta(channel=policy.channel, raw=prefix), error=error)
        try:
            ev.header = read_header(prefix)
            ev.meta.control_id = ev.header.control_id[:200]
            ev.meta.message_type = ev.header.message_type[:50]
            ev.meta.sending_application = ev.header.sending_application[:200]
            ev.meta.sending_facility = ev.header.sending_facility[:200]
        except RejectError:
            ev.header = None

        def job(conn: Connection) -> Outcome:
            message_id = messages.insert_message(conn, ev.meta, keyed=False)
            return apply_evaluation(conn, ev, message_id, "ascii")

        outcome = await self.writer.run(job)
        _log(outcome, policy)
        return outcome

    def replay(self, message_id: int, policies: dict[str, Hl7Policy]) -> Outcome:
        """Re-run a stored message through the current mappings; updates its row and records."""

        def job(conn: Connection) -> Outcome:
            row = messages.get(conn, message_id)
            if row is None:
                raise KeyError(f"no message with id {message_id}")
            if row.status == "duplicate" and row.duplicate_of:
                raise ValueError(
                    f"message {message_id} is a duplicate of {row.duplicate_of}; replay that one"
                )
            policy = policies.get(row.channel) or Hl7Policy(row.channel)
            ev = evaluate(bytes(row.raw), policy, self.engine)
            return apply_evaluation(conn, ev, message_id, _charset(ev, policy), replay=True)

        return self.writer.run_sync(job)


def _log(outcome: Outcome, policy: Hl7Policy) -> None:
    extra: dict[str, Any] = {
        "channel": policy.channel,
        "message_id": outcome.message_id,
        "status": outcome.status,
        "ack_code": outcome.ack_code,
    }
    log.info("message.%s", outcome.status, extra=extra)
