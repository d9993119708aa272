"""The audit trail: one append-only row per record change, chained by SHA-256.

:func:`record` is the store's own change listener, always on (see :mod:`hms_ach.store.changes`):
it runs inside the transaction that writes the record version, so the version and its audit row
commit together or not at all. Each row holds who (the channel of the message, or the API client), when, which
message or request, what changed (a JSON diff), the hash of the previous row and its own hash over
all of that. Editing, deleting or reordering a row breaks the chain, and :func:`verify` names the
first row that no longer fits.

The chain stays linear under concurrent writers: on PostgreSQL the writer takes a
transaction-level advisory lock before reading the last hash; SQLite write transactions are
serialised already (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, bindparam, func, select, text

from hms_ach.store import fastexec, txcache
from hms_ach.store.db import Store
from hms_ach.store.models import AuditEntry, InboundMessage

if TYPE_CHECKING:  # changes.py calls record() first on every change: it imports this module
    from hms_ach.store.changes import Change

T = AuditEntry.__table__  # type: ignore[attr-defined]
M = InboundMessage.__table__  # type: ignore[attr-defined]

GENESIS = "0" * 64
#: Key of the PostgreSQL advisory lock that serialises appends to the chain ("hmsaudit").
ADVISORY_LOCK_KEY = 0x686D7361756474
_META = ("meta",)


def instant(value: datetime | None = None) -> str:
    """A fixed-width UTC instant (``2026-01-02T03:04:05.000006Z``): sorts and compares as text."""
    value = (value or datetime.now(UTC)).astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def diff(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """What changed from ``before`` to ``after``: objects are compared element by element, lists
    and scalars as a whole. ``meta`` (version and time) is left out; it changes every time."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[dict[str, Any]] = []
        for key in sorted(set(before) | set(after)):
            if not path and key in _META:
                continue
            sub = f"{path}.{key}" if path else key
            if key not in before:
                out.append({"op": "add", "path": sub, "new": after[key]})
            elif key not in after:
                out.append({"op": "remove", "path": sub, "old": before[key]})
            else:
                out.extend(diff(before[key], after[key], sub))
        return out
    if before == after:
        return []
    if before is None:
        return [{"op": "add", "path": path, "new": after}]
    if after is None:
        return [{"op": "remove", "path": path, "old": before}]
    return [{"op": "replace", "path": path, "old": before, "new": after}]


def entry_hash(row: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and every field of the row but its own hash and number."""
    fields = {
        k: row[k]
        for k in (
            "recorded",
            "agent",
            "action",
            "entity_type",
            "entity_id",
            "version_id",
            "message_id",
            "diff",
            "prev_hash",
        )
    }
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


_AGENT = select(M.c.channel, M.c.sending_application).where(M.c.id == bindparam("mid"))
_LAST_HASH = select(T.c.hash).order_by(T.c.seq.desc()).limit(1)


def _agent(conn: Connection, message_id: int | None, cache: dict[str, Any]) -> str:
    if message_id is None:
        return "system"
    sender = cache.get("message.sender")  # (id, channel, sending application), see store/messages.py
    if sender is not None and sender[0] == message_id:
        channel, application = sender[1], sender[2]
    else:
        row = conn.execute(_AGENT, {"mid": message_id}).first()
        if row is None:
            return "system"
        channel, application = row.channel, row.sending_application
        cache["message.sender"] = (message_id, channel, application)
    who = str(channel)
    if application and application != channel:
        who = f"{who}/{application}"
    return who[:255]


def _lock_chain(conn: Connection, cache: dict[str, Any]) -> None:
    if conn.dialect.name == "postgresql" and not cache.get("audit.locked"):
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        cache["audit.locked"] = True


def record(conn: Connection, change: Change) -> None:
    """The change listener: append one chained audit row for ``change``.

    The lock, the last hash and the agent are read once per transaction and then kept in its
    cache (:mod:`hms_ach.store.txcache`), which a rolled-back SAVEPOINT empties: the next entry
    then reads the chain's end again, so an undone entry is never linked to.
    """
    cache = txcache.cache(conn)
    _lock_chain(conn, cache)
    last = cache.get("audit.last_hash")
    if last is None:
        last = conn.execute(_LAST_HASH).scalar()
    row: dict[str, Any] = {
        "recorded": instant(),
        "agent": _agent(conn, change.message_id, cache),
        "action": change.action,
        "entity_type": change.resource_type,
        "entity_id": change.id,
        "version_id": change.version_id,
        "message_id": change.message_id,
        "diff": orjson.dumps(diff(change.before or {}, change.after or {})).decode(),
        "prev_hash": last or GENESIS,
    }
    row["hash"] = entry_hash(row)
    fastexec.insert_rows(conn, T, [row])
    cache["audit.last_hash"] = row["hash"]


# ---------------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    checked: int
    bad_seq: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.bad_seq is None


def _rows(conn: Connection, batch: int = 1000) -> Iterator[Any]:
    after = 0
    while True:
        rows = conn.execute(select(T).where(T.c.seq > after).order_by(T.c.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].seq


def verify(conn: Connection) -> VerifyResult:
    """Walk the chain from the first row; stop at the first row whose links or hash do not hold."""
    prev = GENESIS
    checked = 0
    for row in _rows(conn):
        data = dict(row._mapping)
        if data["prev_hash"] != prev:
            return VerifyResult(
                checked,
                data["seq"],
                "its prev_hash is not the hash of the entry before it "
                "(an entry was removed, inserted or reordered)",
            )
        if entry_hash(data) != data["hash"]:
            return VerifyResult(
                checked, data["seq"], "its content does not match its hash (the row was edited)"
            )
        prev = data["hash"]
        checked += 1
    return VerifyResult(checked)


# ---------------------------------------------------------------------------- reads
@dataclass
class AuditQuery:
    entity: str | None = None  # "Practitioner/123" or "Practitioner"
    agent: str | None = None
    since: str | None = None  # inclusive, an instant or date text
    until: str | None = None  # exclusive
    after_seq: int = 0
    limit: int = 50


def search(conn: Connection, q: AuditQuery) -> tuple[list[dict[str, Any]], int | None]:
    """The rows matching ``q`` in chain order, and the ``seq`` to continue after (None: no more)."""
    stmt = select(T).where(T.c.seq > q.after_seq)
    if q.entity:
        rtype, _, rid = q.entity.partition("/")
        stmt = stmt.where(T.c.entity_type == rtype)
        if rid:
            stmt = stmt.where(T.c.entity_id == rid)
    if q.agent:
        stmt = stmt.where((T.c.agent == q.agent) | T.c.agent.like(q.agent.replace("%", "") + "/%"))
    if q.since:
        stmt = stmt.where(T.c.recorded >= q.since)
    if q.until:
        stmt = stmt.where(T.c.recorded < q.until)
    rows = conn.execute(stmt.order_by(T.c.seq).limit(q.limit + 1)).all()
    more = len(rows) > q.limit
    out = [_public(r) for r in rows[: q.limit]]
    return out, (out[-1]["seq"] if more and out else None)


def search_trail(store: Store, q: AuditQuery) -> tuple[list[dict[str, Any]], int | None]:
    """:func:`search` on a connection of the reader pool of ``store``."""
    with store.read() as conn:
        return search(conn, q)


def count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(T)).scalar_one())


def _public(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data["diff"] = orjson.loads(data["diff"])
    return data


_ACTION_CODES = {"create": "C", "update": "U", "delete": "D"}


def as_audit_event(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row rendered as a FHIR R4 AuditEvent (rest operation on the record)."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{row['seq']}",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction",
                "code": {"create": "create", "update": "update", "delete": "delete"}[row["action"]],
            }
        ],
        "action": _ACTION_CODES[row["action"]],
        "recorded": row["recorded"],
        "outcome": "0",
        "agent": [{"who": {"display": row["agent"]}, "name": row["agent"], "requestor": True}],
        "source": {"observer": {"display": "hms-ach"}},
        "entity": [
            {
                "what": {
                    "reference": f"{row['entity_type']}/{row['entity_id']}/_history/{row['version_id']}"
                },
                "detail": [
                    {"type": "diff", "valueString": orjson.dumps(row["diff"]).decode()},
                    {"type": "hash", "valueString": row["hash"]},
                    {"type": "prev_hash", "valueString": row["prev_hash"]},
                ],
            }
        ],
    }
    if row["message_id"] is not None:
        event["entity"].append(
            {
                "what": {"identifier": {"system": "urn:hms-ach:message", "value": str(row["message_id"])}},
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "20",
                    "display": "Job",
                },
            }
        )
    return event
