"""The audit trail: one append-only row per record change, chained by HMAC-SHA256.

:func:`record` is the store's own change listener, always on (see :mod:`hms_ach.store.changes`):
it runs inside the transaction that writes the record version, so the version and its audit row
commit together or not at all. Each row holds who (the channel of the message, or the API client), when, which
message or request, what changed (a JSON diff, sensitive values masked by
:mod:`hms_ach.store.audit_mask`), the hash of the previous row and its own hash over all of that.

The hash is an HMAC-SHA256 under the audit key of the store (:mod:`hms_ach.store.audit_keys`),
which is not in the database: someone who can write the database cannot recompute the chain after
an edit. A store without a key writes the plain SHA-256 chain of earlier versions; such entries
are accepted only before the first keyed one and, once there is a checkpoint file, only up to its
anchor. :func:`verify` walks the chain and the signed checkpoints
(:mod:`hms_ach.store.audit_checkpoints`) and names what it finds: an edited entry, a recomputed
chain, deleted entries, a truncated tail, a forged checkpoint.

The chain stays linear under concurrent writers: on PostgreSQL the writer takes a
transaction-level advisory lock before reading the last hash; SQLite write transactions are
serialised already (``BEGIN IMMEDIATE``). The group-commit writer's transactions on PostgreSQL
make their rows as they go and link them at the end (:func:`defer`), so that the lock is held
only from then to the COMMIT.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, bindparam, func, select, text

from hms_ach.store import audit_mask, fastexec, pglocks, txcache
from hms_ach.store.audit_checkpoints import Checkpoint, anchor
from hms_ach.store.audit_keys import DEFAULT_SEAL, AuditSeal, attach, hmac_sha256, open_seal, seal_for
from hms_ach.store.audit_settings import AuditSettings
from hms_ach.store.db import Store
from hms_ach.store.models import AuditEntry, InboundMessage

if TYPE_CHECKING:  # changes.py calls record() first on every change: it imports this module
    from hms_ach.store.changes import Change

log = logging.getLogger("hms_ach.store.audit")

T = AuditEntry.__table__  # type: ignore[attr-defined]
M = InboundMessage.__table__  # type: ignore[attr-defined]

GENESIS = "0" * 64
#: Class of the PostgreSQL advisory lock that serialises appends to the chain ("hmsa", keyed per
#: schema by :mod:`hms_ach.store.pglocks`).
ADVISORY_LOCK_CLASS = 0x686D7361
_LOCK = text(f"SELECT {pglocks.xact_lock(ADVISORY_LOCK_CLASS)}")
_META = ("meta",)
_HASHED = (
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


def _payload(row: dict[str, Any]) -> bytes:
    """The hashed fields; ``actor`` only when set, so entries written before it verify unchanged."""
    fields = {k: row[k] for k in _HASHED}
    if row.get("actor") is not None:
        fields["actor"] = row["actor"]
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def actor_json(**fields: Any) -> str:
    """Who acted, as the ``actor`` text of an audit entry: ``kind`` (http, mllp, file, system) and
    its fields, None values kept (a field is named even when unknown, e.g. ``certificate_subject``)."""
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()


_ACTING = "hms_ach.acting"


@contextmanager
def acting(conn: Connection, actor: str) -> Iterator[None]:
    """Within this block, ``actor`` (an ``actor_json`` text) is who acts on ``conn``: the actor of the
    audit entries of a scheduled job or a replay, whose changes come from no received message. Kept
    on the connection (not in the transaction cache), so a rolled-back savepoint inside the block
    does not lose it; the block's end removes it, so the next job of a group commit is not named."""
    conn.info[_ACTING] = actor
    try:
        yield
    finally:
        conn.info.pop(_ACTING, None)


def _actor(conn: Connection, message_id: int | None, cache: dict[str, Any]) -> str | None:
    acting_now = conn.info.get(_ACTING)  # a job or a replay, see acting()
    if acting_now is not None:
        return acting_now  # type: ignore[no-any-return]
    cached = cache.get("message.actor")  # (id, actor JSON), see store/messages.py
    if cached is not None and message_id is not None and cached[0] == message_id:
        return cached[1]  # type: ignore[no-any-return]
    return None


def plain_hash(row: dict[str, Any]) -> str:
    """The unkeyed chain of earlier versions: SHA-256 over the previous hash and every field of
    the row but its own hash and number."""
    return hashlib.sha256(_payload(row)).hexdigest()


def keyed_hash(row: dict[str, Any], entry_key: bytes) -> str:
    """HMAC-SHA256 under the entry key over the same fields as :func:`plain_hash`."""
    return hmac_sha256(entry_key, _payload(row)).hex()


def entry_hash(row: dict[str, Any], seal: AuditSeal = DEFAULT_SEAL) -> str:
    """The hash ``seal`` gives the row: keyed when the seal has a key, else plain."""
    return keyed_hash(row, seal.entry_key) if seal.entry_key is not None else plain_hash(row)


_AGENT = select(M.c.channel, M.c.sending_application).where(M.c.id == bindparam("mid"))
#: The chain's end, read once per write transaction: a literal LIMIT (no bound value), so that it
#: runs on the driver's cursor (store/fastexec.py) like the rows it precedes.
_LAST_HASH = text(f"SELECT hash FROM {T.name} ORDER BY seq DESC LIMIT 1")


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


def lock_chain(conn: Connection) -> None:
    """Take the audit chain's lock for the rest of ``conn``'s transaction (PostgreSQL; once per
    transaction). Outbox events do not need it: their fan-out waits for the transactions that could
    still commit a lower id (:func:`hms_ach.store.outbox.settled_event_id`)."""
    _lock_chain(conn, txcache.cache(conn))


def _lock_chain(conn: Connection, cache: dict[str, Any]) -> None:
    if conn.dialect.name == "postgresql" and not cache.get("audit.locked"):
        conn.execute(_LOCK)
        cache["audit.locked"] = True


def record(conn: Connection, change: Change) -> None:
    """The change listener: append one chained audit row for ``change``.

    The lock, the last hash and the agent are read once per transaction and then kept in its
    cache (:mod:`hms_ach.store.txcache`), which a rolled-back SAVEPOINT empties: the next entry
    then reads the chain's end again, so an undone entry is never linked to.
    """
    record_many(conn, [change])


def diff_text(change: Change, seal: AuditSeal) -> str:
    """The stored ``diff`` of ``change``'s audit row under ``seal`` (its sensitive values masked).
    Pure: a transaction Bundle's planned entries have it made before the writer (:func:`record_many`'s
    ``diffs``)."""
    before = audit_mask.mask(change.before, seal)
    after = audit_mask.mask(change.after, seal)
    return orjson.dumps(diff(before or {}, after or {})).decode()


#: A diff made ahead by :func:`diff_text`, with the seal it was made under.
MadeDiff = tuple[AuditSeal, str]


def record_many(
    conn: Connection, changes: list[Change], diffs: Sequence[MadeDiff | None] | None = None
) -> None:
    """Append one chained audit row for each of ``changes`` in turn, inserted with one statement
    (one change for the listener, many for the bulk path of a transaction Bundle). ``diffs``: for
    each change, its diff made ahead (or None); used when made under this store's seal."""
    if not changes:
        return
    seal = seal_for(conn)
    cache = txcache.cache(conn)
    # the rows first, their links after the chain's lock: the lock (PostgreSQL: other writers wait
    # for it) is held only for the hashes, the INSERT and the rest of the transaction
    rows: list[dict[str, Any]] = []
    for i, change in enumerate(changes):
        made = diffs[i] if diffs is not None else None
        rows.append(
            {
                "agent": _agent(conn, change.message_id, cache),
                "action": change.action,
                "entity_type": change.resource_type,
                "entity_id": change.id,
                "version_id": change.version_id,
                "message_id": change.message_id,
                "diff": made[1] if made is not None and made[0] is seal else diff_text(change, seal),
                "actor": _actor(conn, change.message_id, cache),
            }
        )
    kept = txcache.kept(conn)
    if kept is not None:  # linked at the transaction's end (defer)
        kept.extend(rows)
        return
    _append(conn, rows, seal, cache)


def _append(conn: Connection, rows: list[dict[str, Any]], seal: AuditSeal, cache: dict[str, Any]) -> None:
    """Link ``rows`` to the chain's end (under its lock) and insert them."""
    _lock_chain(conn, cache)
    last = cache.get("audit.last_hash")
    if last is None:
        found = fastexec.first_row(conn, "audit_last_hash", _LAST_HASH, {})
        last = found[0] if found is not None else None
    recorded = instant()  # once for all: they commit together
    for row in rows:
        row["recorded"] = recorded
        row["prev_hash"] = last or GENESIS
        row["hash"] = last = entry_hash(row, seal)
    fastexec.insert_rows(conn, T, rows)
    cache["audit.last_hash"] = last


# ------------------------------------------------------------- entries appended at the commit
def defer(conn: Connection) -> None:
    """Until :func:`append_deferred`, the audit rows of ``conn``'s transaction are made (diff, who,
    when) but kept, in order, instead of linked and inserted (:func:`hms_ach.store.txcache.keep`:
    a SAVEPOINT rolled back drops its rows): the chain's lock is then taken only for the last
    statements before the COMMIT. The group-commit writer does so on PostgreSQL, where engines
    sharing the database wait for that lock: taken with a message's first change, it was held
    through the rest of the batch, and an engine holding a record the other wanted deadlocked with
    it (docs/scale-out.md)."""
    txcache.keep(conn)


def append_deferred(conn: Connection) -> None:
    """Link and insert the rows :func:`defer` kept (a call before the COMMIT); none are kept after."""
    rows = txcache.take_kept(conn)
    if rows:
        _append(conn, rows, seal_for(conn), txcache.cache(conn))


def install(store: Store, settings: AuditSettings, data_dir: Path, *, create: bool = True) -> AuditSeal:
    """Give the audit trail of ``store`` its key and masking rules (``audit:`` of channels.yaml).

    The engine (``create``) reads the key or creates it in ``data_dir`` on first start, and writes
    the anchor checkpoint if the checkpoint file is new. Other processes that write (``hms-ach
    replay``) pass ``create=False``: they use the key if it exists and never create one."""
    seal = open_seal(settings, data_dir, create=create)
    attach(store, seal)
    if create:
        anchor(store, seal)
        _check_last_entry(store, seal)
    return seal


def _check_last_entry(store: Store, seal: AuditSeal) -> None:
    """Warn when the trail's last entry was not made with this key: instances that share a
    database must share the key (``audit.key_file``), or the trail stops verifying."""
    try:
        with store.read() as conn:
            last = conn.execute(select(T).order_by(T.c.seq.desc()).limit(1)).first()
    except Exception as exc:  # noqa: BLE001 - the store is unreachable now; the writer reports it
        log.warning("audit.key_check_skipped", extra={"error": type(exc).__name__})
        return
    if last is None or seal.entry_key is None:
        return
    row = dict(last._mapping)
    if (
        not hmac.compare_digest(keyed_hash(row, seal.entry_key), row["hash"])
        and plain_hash(row) != row["hash"]
    ):
        log.warning(
            "audit.key_mismatch",
            extra={"seq": row["seq"], "key_id": seal.key_id, "key_path": str(seal.key_path)},
        )


# ---------------------------------------------------------------------------- verify
#: What :func:`verify` can find, as named in its results and by ``hms-ach audit verify``.
PROBLEMS = {
    "edited": "an entry was edited",
    "recomputed": "the chain was recomputed without the audit key",
    "deleted": "entries were deleted",
    "reordered": "entries were inserted or reordered",
    "truncated": "the tail of the trail was deleted",
    "checkpoint-mismatch": "the trail does not match a checkpoint",
    "forged-checkpoint": "a checkpoint is forged or damaged",
    "no-key": "the audit key is missing",
    "unreadable": "the checkpoint file cannot be read",
}


@dataclass
class VerifyResult:
    checked: int
    bad_seq: int | None = None
    reason: str = ""
    problem: str = ""  # a key of PROBLEMS; "" when intact
    legacy: int = 0  # entries of the plain (unkeyed) chain before the keyed one
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


def iter_rows(conn: Connection, table: Any, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Every row of ``table`` in ``seq`` order, read ``batch`` rows at a time (a chain is walked
    without holding it all in memory)."""
    after = 0
    while True:
        rows = conn.execute(select(table).where(table.c.seq > after).order_by(table.c.seq).limit(batch)).all()
        if not rows:
            return
        for r in rows:
            yield dict(r._mapping)
        after = rows[-1].seq


class _Walk:
    """The state of one walk along the chain (see :func:`verify`)."""

    def __init__(self, seal: AuditSeal, checkpoints: list[Checkpoint]):
        self.seal = seal
        self.anchor = checkpoints[0] if checkpoints and checkpoints[0].kind == "anchor" else None
        self.pending = [cp for cp in checkpoints if cp.head_seq]  # in head order (checked on reading)
        self.next_cp = 0
        self.keyed_seen = False
        self.legacy = 0

    def own_hash(self, row: dict[str, Any]) -> str:
        """Which hash the row's stored hash is: keyed, plain, or "" (neither matches)."""
        key = self.seal.entry_key
        if key is not None and hmac.compare_digest(keyed_hash(row, key), row["hash"]):
            return "keyed"
        if plain_hash(row) == row["hash"]:
            return "plain"
        return ""

    def plain_allowed(self, row: dict[str, Any]) -> bool:
        if self.seal.entry_key is None:
            return True
        if self.keyed_seen:
            return False
        return self.anchor is None or row["seq"] <= self.anchor.head_seq


def verify(
    conn: Connection, seal: AuditSeal = DEFAULT_SEAL, checkpoints: list[Checkpoint] | None = None
) -> VerifyResult:
    """Walk the chain from the first row and check it against ``checkpoints`` (already read and
    their signatures checked); stop at the first thing that does not hold and name it."""
    cps = checkpoints or []
    walk = _Walk(seal, cps)
    prev, prev_seq, checked = GENESIS, 0, 0
    rows = iter_rows(conn, T)
    row = next(rows, None)
    while row is not None:
        following = next(rows, None)
        seq = row["seq"]
        kind = walk.own_hash(row)
        if kind == "plain" and not walk.plain_allowed(row):
            return _broken(
                checked, seq, "recomputed", walk,
                f"entry {seq} carries an unkeyed SHA-256 hash where the chain is keyed: the chain was "
                "recomputed from here by someone without the audit key",
            )  # fmt: skip
        if not kind:
            chained = following is not None and following["prev_hash"] == row["hash"]
            if seal.entry_key is None and (chained or checked == 0):
                return _broken(
                    checked, seq, "no-key", walk,
                    f"entries from {seq} on do not carry the unkeyed chain: they are keyed and there is "
                    "no audit key to check them (or they were rewritten)",
                )  # fmt: skip
            if chained and following is not None and not walk.own_hash(following):
                return _broken(
                    checked, seq, "recomputed", walk,
                    f"entries from {seq} on carry hashes the audit key did not make: the chain was "
                    "recomputed from here without the key",
                )  # fmt: skip
            reason = f"entry {seq} does not match its hash: its content was edited after it was written"
            if seal.entry_key is None:
                reason += " (or it is keyed and the audit key is missing)"
            return _broken(checked, seq, "edited", walk, reason)
        if row["prev_hash"] != prev:
            if seq != prev_seq + 1:
                where = f"after entry {prev_seq}" if prev_seq else "at the start of the trail"
                return _broken(
                    checked, seq, "deleted", walk,
                    f"entries were deleted {where}: entry {seq} does not link to the entry before it",
                )  # fmt: skip
            return _broken(
                checked, seq, "reordered", walk,
                f"entry {seq} does not link to entry {prev_seq}: entries were inserted or reordered",
            )  # fmt: skip
        checked += 1
        if kind == "keyed":
            walk.keyed_seen = True
        else:
            walk.legacy += 1
        while walk.next_cp < len(walk.pending) and walk.pending[walk.next_cp].head_seq <= seq:
            cp = walk.pending[walk.next_cp]
            walk.next_cp += 1
            if cp.head_seq < seq:
                return _broken(
                    checked - 1, seq, "deleted", walk,
                    f"entry {cp.head_seq}, the head of the checkpoint of {cp.at}, was deleted",
                )  # fmt: skip
            if cp.head != row["hash"] or cp.count != checked:
                return _broken(
                    checked - 1, seq, "checkpoint-mismatch", walk,
                    f"entry {seq} is not what the checkpoint of {cp.at} recorded "
                    f"({cp.count} entries up to entry {seq}; the trail now has {checked} up to it): "
                    "entries before it were deleted or replaced",
                )  # fmt: skip
        prev, prev_seq = row["hash"], seq
        row = following
    last = cps[-1] if cps else None
    if last is not None and last.head_seq > prev_seq:
        return _broken(
            checked, None, "truncated", walk,
            f"the trail ends at entry {prev_seq} ({checked} entries) but the checkpoint of {last.at} "
            f"recorded {last.count} entries up to entry {last.head_seq}: the tail was deleted",
        )  # fmt: skip
    result = VerifyResult(checked, legacy=walk.legacy)
    result.checkpoints = cps
    return result


def _broken(checked: int, seq: int | None, problem: str, walk: _Walk, reason: str) -> VerifyResult:
    return VerifyResult(checked, seq, reason, problem, walk.legacy)


# ---------------------------------------------------------------------------- reads
@dataclass
class AuditQuery:
    entity: str | None = None  # "Practitioner/123" or "Practitioner"
    agent: str | None = None
    since: str | None = None  # inclusive, an instant or date text
    until: str | None = None  # exclusive
    after_seq: int = 0
    upto_seq: int | None = None  # inclusive: a paging snapshot (rows added later are not served)
    limit: int = 50


def search(conn: Connection, q: AuditQuery) -> tuple[list[dict[str, Any]], int | None]:
    """The rows matching ``q`` in chain order, and the ``seq`` to continue after (None: no more)."""
    stmt = select(T).where(T.c.seq > q.after_seq)
    if q.upto_seq is not None:
        stmt = stmt.where(T.c.seq <= q.upto_seq)
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
    seal = seal_for(conn)
    out = [_public(r, seal) for r in rows[: q.limit]]
    return out, (out[-1]["seq"] if more and out else None)


def last_seq(store: Store) -> int:
    """The ``seq`` of the newest change entry (0: none): the upper bound of a paging snapshot."""
    with store.read() as conn:
        return int(conn.execute(select(func.max(T.c.seq))).scalar_one() or 0)


def search_trail(store: Store, q: AuditQuery) -> tuple[list[dict[str, Any]], int | None]:
    """:func:`search` on a connection of the reader pool of ``store``."""
    with store.read() as conn:
        return search(conn, q)


def count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(T)).scalar_one())


def _public(row: Any, seal: AuditSeal) -> dict[str, Any]:
    data = dict(row._mapping)
    data["diff"] = audit_mask.mask_diff(orjson.loads(data["diff"]), seal)
    return data


_ACTION_CODES = {"create": "C", "update": "U", "delete": "D"}


def _change_agent(row: dict[str, Any]) -> dict[str, Any]:
    """The AuditEvent agent of a change entry: the channel (``agent``), and who acted when known."""
    agent: dict[str, Any] = {"who": {"display": row["agent"]}, "name": row["agent"], "requestor": True}
    actor = orjson.loads(row["actor"]) if row.get("actor") else None
    if not isinstance(actor, dict):
        return agent
    if actor.get("kind") in ("system", "replay") and (actor.get("job") or actor.get("user")):
        # who: the scheduled job, or the operating-system user who replayed the message
        who = f"job:{actor['job']}" if actor.get("job") else f"user:{actor['user']}"
        agent["who"] = {"identifier": {"system": "urn:hms-ach:actor", "value": who}, "display": row["agent"]}
    if actor.get("sub"):
        # who: the authenticated caller; name stays the channel (or the API) that took the request
        agent["who"] = {
            "identifier": {"system": "urn:hms-ach:sub", "value": str(actor["sub"])},
            "display": row["agent"],
        }
    if actor.get("client_id"):
        agent["altId"] = str(actor["client_id"])
    if actor.get("roles"):
        agent["role"] = [{"text": str(r)} for r in actor["roles"]]
    address = actor.get("source_address") or actor.get("peer")
    if address:
        agent["network"] = {"address": str(address), "type": "2"}
    details = [
        {"url": f"urn:hms-ach:{k}", "valueString": str(actor[k])}
        for k in ("kind", "channel", "peer", "certificate_subject", "file", "job", "command", "user", "host")
        if actor.get(k)
    ]
    if details:
        agent.setdefault("extension", []).extend(details)
    return agent


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
        "agent": [_change_agent(row)],
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
