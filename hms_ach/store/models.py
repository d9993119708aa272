"""The tables of the canonical store.

Three kinds of table:

* ``message``: every inbound message, raw, with its outcome and the ACK that was sent.
* one table per canonical record type (``patient``, ``encounter``, ``location``, ...). A record is
  held as FHIR R4-shaped JSON (``resource``, rendered once at write time, served as stored
  bytes), under a business key (``key_system``, ``key_value``) with a database unique
  constraint, so concurrent senders can never create two records for one identifier.
  ``resource_history`` keeps every version.
* the search index (``search_token``, ``search_string``, ``search_date``, ``search_reference``):
  rows extracted from each record by the search-parameter declarations in
  :mod:`hms_ach.store.search_params` and rebuilt whenever the record changes.

``table=True`` sqlmodel classes do not validate; input is validated before it gets here.
"""

from __future__ import annotations

import types
from datetime import UTC, datetime

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from hms_ach.core.records import RECORD_TYPES, RecordType


def utcnow() -> datetime:
    return datetime.now(UTC)


class InboundMessage(SQLModel, table=True):
    """One inbound message as received, with its outcome. The message store of the engine."""

    __tablename__ = "message"
    __table_args__ = (
        Index("ix_message_status_received", "status", "received_at"),
        Index("ix_message_type", "message_type"),
    )

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(description="Name of the inbound channel in channels.yaml")
    idempotency_key: str | None = Field(
        default=None, unique=True, description="MLLP: MSH-3|MSH-4|MSH-10; duplicates share it"
    )
    control_id: str = Field(default="", description="MSH-10 (or the request id)")
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = Field(default="", description="e.g. ADT^A01")
    version: str = ""
    content_type: str = Field(default="hl7v2", description="hl7v2 | fhir+json | csv")
    status: str = Field(default="received", description="processed | error | rejected | duplicate")
    error: str | None = Field(default=None, sa_column=Column(Text))
    error_location: str | None = None
    ack_code: str | None = Field(default=None, description="AA/AE/AR or CA/CE/CR")
    ack: str | None = Field(default=None, sa_column=Column(Text))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    partition_key: str | None = None
    duplicate_of: int | None = None
    received_at: datetime = Field(default_factory=utcnow)
    processed_at: datetime | None = None
    replay_count: int = 0


class FhirRequestLine(SQLModel, table=True):
    """What a stored FHIR write needs besides its body to be replayed: method, URL and conditions.

    A table of its own (not columns of ``message``) so that stores created before it gain it with
    ``create_all`` and no migration.
    """

    __tablename__ = "message_fhir_request"

    message_id: int = Field(primary_key=True, description="The message row (content type fhir+json)")
    method: str = Field(max_length=10, description="POST, PUT or DELETE")
    target: str = Field(
        default="",
        sa_type=Text,
        description="The URL under /fhir: Practitioner, Practitioner/123, "
        "Practitioner?identifier=s|v, or empty for a Bundle",
    )
    if_match: str | None = Field(default=None, max_length=255, description="The If-Match header, if any")
    if_none_exist: str | None = Field(
        default=None, sa_type=Text, description="The If-None-Exist header, if any"
    )


class MessageContentHash(SQLModel, table=True):
    """The SHA-256 of a keyed HL7 v2 message's content, to tell a true resend (same content) from a
    message that reuses an earlier control id (MSH-3, MSH-4, MSH-10) with different content.

    A table of its own (not a column of ``message``) so that stores created before it gain it with
    ``create_all`` and no migration; a message stored before it has no row here, and its hash is then
    computed from its stored raw bytes.
    """

    __tablename__ = "message_content_hash"

    message_id: int = Field(primary_key=True, description="The message row (content type hl7v2)")
    sha256: str = Field(max_length=64, description="Hex SHA-256 of the normalised raw message")


class ResourceBase(SQLModel):
    """Columns shared by every canonical record table."""

    id: str = Field(primary_key=True, max_length=64)
    key_system: str | None = Field(default=None, max_length=255)
    key_value: str | None = Field(default=None, max_length=255)
    version_id: int = 1
    last_updated: datetime = Field(default_factory=utcnow, index=True)
    deleted: bool = False
    resource: str = Field(sa_type=Text)


def _record_table(record_type: RecordType) -> type[ResourceBase]:
    """The table class of one record type (its current versions), named after the type."""
    namespace = {
        "__tablename__": record_type.table,
        "__table_args__": (UniqueConstraint("key_system", "key_value", name=f"uq_{record_type.table}_key"),),
        "__doc__": record_type.description,
        "__module__": __name__,
    }
    cls = types.new_class(record_type.name, (ResourceBase,), {"table": True}, lambda ns: ns.update(namespace))
    return cls


#: Record type -> table class, one per row of RECORD_TYPES (hms_ach/core/records.py).
RECORD_TABLES: dict[str, type[ResourceBase]] = {name: _record_table(rt) for name, rt in RECORD_TYPES.items()}


class AuditEntry(SQLModel, table=True):
    """One change of one record, append-only, chained by SHA-256 to its predecessor (see store/audit.py)."""

    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entity", "entity_type", "entity_id"),
        Index("ix_audit_recorded", "recorded"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    recorded: str = Field(max_length=40, description="UTC instant, fixed-width ISO 8601 (sorts as text)")
    agent: str = Field(max_length=255, description="channel name, authenticated client or 'api'")
    action: str = Field(max_length=16, description="create | update | delete")
    entity_type: str = Field(max_length=64)
    entity_id: str = Field(max_length=64)
    version_id: int
    message_id: int | None = Field(default=None, description="the inbound message or request")
    diff: str = Field(sa_type=Text, description="JSON list of {op, path, old, new}")
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)
    actor: str | None = Field(
        default=None,
        sa_type=Text,
        description="who acted, JSON (http: sub, client_id, roles, source_address; mllp: channel, peer, "
        "certificate_subject; file: channel, file); hashed when set. Added after the first release: "
        "db.make_engine adds the column to older stores",
    )


class AccessRecord(SQLModel, table=True):
    """One access (read, vread, search, history, export) of patient or staff data, or its refusal.

    Written in batches by :mod:`hms_ach.store.access_log`; served as BALP AuditEvents at /fhir/AuditEvent.
    """

    __tablename__ = "access_record"
    __table_args__ = (
        Index("ix_access_recorded", "recorded"),
        Index("ix_access_sub", "sub"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    recorded: str = Field(max_length=40, description="UTC instant, fixed-width ISO 8601 (sorts as text)")
    subtype: str = Field(max_length=32, description="read | vread | search-type | history | export")
    resource_type: str = Field(max_length=64, description="the type read or searched; '' when unknown")
    outcome: int = Field(description="the HTTP status answered (200, 401, 403, 404...)")
    sub: str = Field(default="", max_length=255, description="the caller's sub ('' before authentication)")
    actor: str = Field(sa_type=Text, description="who, JSON: sub, client_id, roles, source_address")
    entities: str = Field(
        default="", sa_type=Text, description="space-separated references returned ('Patient/1 Patient/2')"
    )
    result_count: int | None = Field(default=None, description="matches of a search")
    query: str = Field(default="", sa_type=Text, description="the request's path and query string")
    prev_hash: str | None = Field(
        default=None, max_length=64, description="hash of the access record before it (the chain's link)"
    )
    hash: str = Field(
        max_length=64, description="HMAC-SHA256 of the row and its link under the audit entry key"
    )


class ResourceHistory(SQLModel, table=True):
    """Every version of every record, appended on each change."""

    __tablename__ = "resource_history"
    # what one message wrote (`hms-ach messages show ID --records`, the console's message view)
    __table_args__ = (Index("ix_history_message", "message_id"),)

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version_id: int = Field(primary_key=True)
    last_updated: datetime = Field(default_factory=utcnow)
    deleted: bool = False
    message_id: int | None = Field(default=None, description="The inbound message that made this version")
    resource: str = Field(sa_type=Text)


class SearchToken(SQLModel, table=True):
    __tablename__ = "search_token"
    __table_args__ = (
        Index("ix_search_token_lookup", "resource_type", "param", "value", "system"),
        Index("ix_search_token_owner", "resource_type", "resource_id"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=64)
    system: str | None = Field(default=None, max_length=255)
    value: str = Field(max_length=255)


class SearchString(SQLModel, table=True):
    __tablename__ = "search_string"
    __table_args__ = (
        # resource_id last: the index answers a search alone. text_pattern_ops: PostgreSQL serves
        # the prefix search (LIKE 'x%') from it whatever the database collation.
        Index(
            "ix_search_string_lookup",
            "resource_type",
            "param",
            "norm",
            "resource_id",
            postgresql_ops={"norm": "text_pattern_ops"},
        ),
        Index("ix_search_string_owner", "resource_type", "resource_id"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=64)
    norm: str = Field(max_length=255, description="lower case, accents removed: for default and :contains")
    exact: str = Field(max_length=255, description="as written: for :exact")


class SearchDate(SQLModel, table=True):
    __tablename__ = "search_date"
    __table_args__ = (
        Index("ix_search_date_lookup", "resource_type", "param", "start", "end"),
        Index("ix_search_date_owner", "resource_type", "resource_id"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=64)
    start: datetime = Field(description="inclusive lower bound of the value's precision range, UTC")
    end: datetime = Field(description="exclusive upper bound of the value's precision range, UTC")


class SearchReference(SQLModel, table=True):
    __tablename__ = "search_reference"
    __table_args__ = (
        Index(
            "ix_search_reference_lookup", "resource_type", "param", "target_id", "target_type", "resource_id"
        ),
        Index("ix_search_reference_owner", "resource_type", "resource_id"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=64)
    target_type: str = Field(max_length=64)
    target_id: str = Field(max_length=64)


INDEX_TABLES = {
    "token": SearchToken,
    "string": SearchString,
    "date": SearchDate,
    "reference": SearchReference,
}


class OutboxEvent(SQLModel, table=True):
    """One outbound event (``encounter.admitted``...), written in the transaction of the change that caused it."""

    __tablename__ = "outbox_event"

    id: int | None = Field(default=None, primary_key=True)
    event: str = Field(max_length=64, index=True, description="stable event name")
    payload: str = Field(sa_type=Text, description="versioned JSON: FHIR references, no PHI")
    created_at: datetime = Field(default_factory=utcnow)


class OutboxRow(SQLModel, table=True):
    """One delivery of one event to one sink; delivered at least once, in id order per destination."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("destination", "event_id", name="uq_outbox_destination_event"),
        Index("ix_outbox_destination_status", "destination", "status", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    destination: str = Field(max_length=128, description="sink name in channels.yaml")
    event_id: int = Field(description="outbox_event.id")
    event: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16, description="pending | delivered | dead")
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    retry_from: datetime = Field(default_factory=utcnow, description="start of the retry window (max age)")
    delivered_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    response: str | None = Field(default=None, sa_column=Column(Text), description="what the sink answered")


class OutboxCursor(SQLModel, table=True):
    """Per sink: the last event fanned out to it, and the lease of the instance that delivers for it."""

    __tablename__ = "outbox_cursor"

    destination: str = Field(primary_key=True, max_length=128)
    last_event_id: int = 0
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = None


class ControlNumber(SQLModel, table=True):
    """Persisted counters (X12 ISA13/GS06/ST02...): each value is handed out once."""

    __tablename__ = "control_number"

    name: str = Field(primary_key=True, max_length=64)
    value: int = 0


class AlertState(SQLModel, table=True):
    """Each alert rule's state (see hms_ach/outbound/alerts.py): an episode fires once and recovers once."""

    __tablename__ = "alert_state"

    name: str = Field(primary_key=True, max_length=200)
    firing: bool = False
    since: datetime | None = Field(default=None, description="When the current state began")
    value: str = Field(default="", max_length=400, description="What the rule measured last")
    checked_at: datetime | None = None


class JobRun(SQLModel, table=True):
    """The last run of each scheduled job (see hms_ach/app/scheduler.py), shown by ``hms-ach jobs``."""

    __tablename__ = "job_run"

    name: str = Field(primary_key=True, max_length=200)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: str = Field(default="", max_length=20, description="running | ok | error")
    detail: str | None = Field(default=None, sa_column=Column(Text))
    runs: int = 0


class CredentialAlert(SQLModel, table=True):
    """One alert per credential, expiry date and threshold, so the nightly scan never repeats one."""

    __tablename__ = "credential_alert"
    __table_args__ = (
        UniqueConstraint("practitioner_id", "credential", "expires", "threshold", name="uq_credential_alert"),
    )

    id: int | None = Field(default=None, primary_key=True)
    practitioner_id: str = Field(max_length=64)
    credential: str = Field(max_length=255, description="qualification identifier (or its code and position)")
    expires: str = Field(max_length=40, description="qualification.period.end as stored")
    threshold: str = Field(max_length=40, description="expiring-30d | expired")
    created_at: datetime = Field(default_factory=utcnow)


class BulkExport(SQLModel, table=True):
    """One Bulk Data ``$export`` request and its progress (see hms_ach/fhir/export.py): the state a
    restarted engine resumes from. The NDJSON files live under the data directory (``directory``)."""

    __tablename__ = "bulk_export"
    __table_args__ = (Index("ix_bulk_export_status", "status", "created_at"),)

    id: str = Field(primary_key=True, max_length=64, description="random, unguessable; in the status URL")
    status: str = Field(max_length=16, description="accepted | running | complete | failed")
    kind: str = Field(max_length=16, description="system | patient")
    sub: str = Field(max_length=255, description="the kick-off caller's sub: only it may poll and download")
    client_id: str | None = Field(default=None, max_length=255, description="the kick-off caller's client")
    request: str = Field(sa_type=Text, description="the kick-off URL (the manifest's request)")
    base: str = Field(sa_type=Text, description="the /fhir base URL the file URLs are built on")
    types: str = Field(sa_type=Text, description="JSON list of the resource types exported, in order")
    since: datetime | None = Field(default=None, description="_since: records changed at or after it")
    transaction_time: datetime = Field(description="the kick-off instant (the manifest's transactionTime)")
    directory: str = Field(sa_type=Text, description="where its NDJSON files are written")
    progress: str = Field(
        default="{}",
        sa_type=Text,
        description="JSON: the type being written (index), the last id written, the file's length then, "
        "and the files done [{type, file, count}]",
    )
    error: str | None = Field(default=None, sa_type=Text, description="why it failed (no field values)")
    lease_until: datetime | None = Field(default=None, description="while a worker writes it")
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
