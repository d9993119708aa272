"""The message store: every inbound message, raw, with its status, error and the ACK we sent.

A message whose :attr:`MessageMeta.content_hash` is set (keyed HL7 v2) also gets a row in
``message_content_hash``, read back by :func:`stored_content_hash` when its key is met again.

The raw message is stored as bytes (``LargeBinary``: BLOB on SQLite, bytea on PostgreSQL),
exactly as received, NUL bytes and all, so any message can be replayed. The text columns that
describe it (control id, sender, type, error, ACK...) never hold a NUL character: PostgreSQL
refuses one in text, SQLite takes it, so :func:`storable` replaces it with U+FFFD on both. (Whether
a message *with* a NUL is accepted is decided before the store, in :mod:`hms_ach.hl7v2.limits`.)

Functions take a SQLAlchemy connection inside the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, desc, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.store import fastexec, txcache
from hms_ach.store.models import InboundMessage, MessageContentHash, ResourceHistory

T = InboundMessage.__table__  # type: ignore[attr-defined]
H = MessageContentHash.__table__  # type: ignore[attr-defined]
H_VERSIONS = ResourceHistory.__table__  # type: ignore[attr-defined]


@dataclass
class MessageMeta:
    """What is known of a message before it is processed."""

    channel: str
    raw: bytes
    content_type: str = "hl7v2"
    idempotency_key: str | None = None
    control_id: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    version: str = ""
    partition_key: str | None = None
    #: Hex SHA-256 of the content (keyed HL7 v2): stored beside the row, compared on a key conflict.
    content_hash: str | None = None
    #: Who sent it, as JSON for the audit trail's ``actor`` (see :func:`hms_ach.store.audit.actor_json`).
    actor: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    """One row of the message log, as stored (see :class:`hms_ach.store.models.InboundMessage`)."""

    id: int
    channel: str
    idempotency_key: str | None
    control_id: str
    sending_application: str
    sending_facility: str
    message_type: str
    version: str
    content_type: str
    status: str
    error: str | None
    error_location: str | None
    ack_code: str | None
    ack: str | None
    raw: bytes
    partition_key: str | None
    duplicate_of: int | None
    received_at: datetime
    processed_at: datetime | None
    replay_count: int


def _stored(row: Any) -> StoredMessage | None:
    if row is None:
        return None
    values = {f: getattr(row, f) for f in StoredMessage.__dataclass_fields__}
    values["raw"] = bytes(values["raw"])  # some drivers hand back a memoryview
    return StoredMessage(**values)


_BY_KEY = select(T).where(T.c.idempotency_key == bindparam("key"))
_INSERT = insert(T)
#: INSERT .. ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, per dialect
_INSERT_NEW = {
    "sqlite": sqlite_insert(T).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(T.c.id),
    "postgresql": pg_insert(T).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(T.c.id),
}


def find_by_key(conn: Connection, key: str) -> StoredMessage | None:
    return _stored(conn.execute(_BY_KEY, {"key": key}).first())


def _remember(conn: Connection, message_id: int, meta: MessageMeta, status: str = "received") -> None:
    """Keep who sent the message for the rest of the transaction (the audit trail's agent), and
    store its content hash (none for a ``duplicate`` row: its original has it)."""
    cache = txcache.cache(conn)
    cache["message.sender"] = (message_id, meta.channel, meta.sending_application)
    cache["message.actor"] = (message_id, meta.actor)
    if meta.content_hash and status != "duplicate":
        fastexec.execute(
            conn,
            "message.content_hash",
            _INSERT_HASH,
            {"message_id": message_id, "sha256": meta.content_hash},
            H,
        )


_INSERT_HASH = insert(H)
_HASH_OF = select(H.c.sha256).where(H.c.message_id == bindparam("mid"))


def stored_content_hash(conn: Connection, message_id: int) -> str | None:
    """The content hash stored for ``message_id``; None when none was (stored before hashes, or not
    HL7 v2)."""
    row = fastexec.first_row(conn, "message.content_hash_of", _HASH_OF, {"mid": message_id})
    return str(row[0]) if row is not None else None


def insert_new(conn: Connection, meta: MessageMeta) -> int | None:
    """Store a keyed message unless its idempotency key is stored already: its id, or None for a
    duplicate. The unique constraint decides (``ON CONFLICT DO NOTHING``), so it is race-free."""
    stmt = _INSERT_NEW.get(conn.dialect.name)
    if stmt is None or not meta.idempotency_key:
        raise ValueError(
            f"insert_new needs an idempotency key and SQLite or PostgreSQL, not {conn.dialect.name}"
        )
    row = fastexec.first_row(
        conn, "message.insert_new", stmt, _values(meta, "received", True, None, None, None), T
    )
    if row is None:
        return None
    _remember(conn, int(row[0]), meta)
    return int(row[0])


def insert_message(
    conn: Connection,
    meta: MessageMeta,
    status: str = "received",
    *,
    keyed: bool = True,
    duplicate_of: int | None = None,
    ack_code: str | None = None,
    ack: str | None = None,
) -> int:
    key = conn.execute(
        _INSERT, _values(meta, status, keyed, duplicate_of, ack_code, ack)
    ).inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no id for the stored message")
    _remember(conn, int(key[0]), meta, status)
    return int(key[0])


def storable(value: str | None) -> str | None:
    """``value`` as a text column can hold it on every database: a NUL character becomes U+FFFD."""
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\ufffd")


def _values(
    meta: MessageMeta,
    status: str,
    keyed: bool,
    duplicate_of: int | None,
    ack_code: str | None,
    ack: str | None,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return dict(
        channel=meta.channel,
        raw=meta.raw,
        content_type=meta.content_type,
        idempotency_key=storable(meta.idempotency_key) if keyed else None,
        control_id=storable(meta.control_id),
        sending_application=storable(meta.sending_application),
        sending_facility=storable(meta.sending_facility),
        message_type=storable(meta.message_type),
        version=storable(meta.version),
        partition_key=storable(meta.partition_key),
        status=status,
        received_at=now,
        duplicate_of=duplicate_of,
        ack_code=storable(ack_code),
        ack=storable(ack),
        processed_at=now if status != "received" else None,
        replay_count=0,
        error=None,
        error_location=None,
    )


def finish(
    conn: Connection,
    message_id: int,
    status: str,
    ack_code: str | None,
    ack: str | None,
    error: str | None = None,
    error_location: str | None = None,
    replay: bool = False,
) -> None:
    values: dict[str, Any] = dict(
        status=status,
        ack_code=storable(ack_code),
        ack=storable(ack),
        error=storable(error),
        error_location=storable(error_location),
        processed_at=datetime.now(UTC),
    )
    if replay:
        values["replay_count"] = T.c.replay_count + 1
        conn.execute(update(T).where(T.c.id == message_id).values(**values))
        return
    fastexec.execute(conn, "message.finish", _FINISH, {"mid": message_id, **values}, T)


_FINISH = update(T).where(T.c.id == bindparam("mid"))


def errors_under_key(conn: Connection, prefix: str) -> list[tuple[str, str | None, str | None]]:
    """(control id, error, error location) of the messages whose idempotency key starts with
    ``prefix``, in the order stored: the bad rows of one file."""
    rows = conn.execute(
        select(T.c.control_id, T.c.error, T.c.error_location)
        .where(T.c.idempotency_key.like(prefix + "%"))
        .order_by(T.c.id)
    ).all()
    return [(str(r.control_id), r.error, r.error_location) for r in rows]


def get(conn: Connection, message_id: int) -> StoredMessage | None:
    return _stored(conn.execute(select(T).where(T.c.id == message_id)).first())


def list_messages(
    conn: Connection,
    status: str | None = None,
    message_type: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Any]:
    q = select(
        T.c.id,
        T.c.channel,
        T.c.control_id,
        T.c.message_type,
        T.c.status,
        T.c.ack_code,
        T.c.error,
        T.c.error_location,
        T.c.received_at,
        T.c.replay_count,
    )
    if status:
        q = q.where(T.c.status == status)
    if message_type:
        q = q.where(
            T.c.message_type.like(message_type.replace("*", "%") + ("" if "*" in message_type else "%"))
        )
    if since:
        q = q.where(T.c.received_at >= since)
    return list(conn.execute(q.order_by(desc(T.c.id)).limit(limit)).all())


def versions_written(conn: Connection, message_id: int, limit: int = 1000) -> list[dict[str, Any]]:
    """The record versions ``message_id`` wrote (type, id, version, deleted, the resource JSON text),
    in the order written; through ``ix_history_message``."""
    rows = conn.execute(
        select(H_VERSIONS.c.resource_type, H_VERSIONS.c.id, H_VERSIONS.c.version_id, H_VERSIONS.c.deleted,
               H_VERSIONS.c.resource)
        .where(H_VERSIONS.c.message_id == message_id)
        .order_by(H_VERSIONS.c.last_updated, H_VERSIONS.c.resource_type, H_VERSIONS.c.id)
        .limit(limit)
    ).all()  # fmt: skip
    return [dict(r._mapping) for r in rows]


def ids_since(conn: Connection, since: datetime | None, status: str | None = None) -> list[int]:
    q = select(T.c.id).where(T.c.status != "duplicate")
    if since:
        q = q.where(T.c.received_at >= since)
    if status:
        q = q.where(T.c.status == status)
    return [int(r) for r in conn.execute(q.order_by(T.c.id)).scalars().all()]
