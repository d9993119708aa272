"""The reads of the web console (hms_ach/console/): channel and sink figures for the dashboard, the
message search (patient identifier included), and the audit trails' chain check.

Nothing here writes. The patient identifier search uses the indexes the store already keeps: the
``identifier`` token rows of ``Patient`` (``ix_search_token_lookup``) give the patient ids, and the
history rows of those patients (their primary key) give the messages that wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, desc, func, select

from hms_ach.store import access_log, audit
from hms_ach.store.audit_checkpoints import CheckpointError, read_checkpoints
from hms_ach.store.audit_keys import seal_for
from hms_ach.store.models import InboundMessage, OutboxRow, ResourceHistory, SearchToken

M = InboundMessage.__table__  # type: ignore[attr-defined]
O = OutboxRow.__table__  # type: ignore[attr-defined]  # noqa: E741
H = ResourceHistory.__table__  # type: ignore[attr-defined]
TOK = SearchToken.__table__  # type: ignore[attr-defined]

#: The most rows of one day a channel's latency percentiles are computed from (the newest).
LATENCY_SAMPLE = 5000


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive (they were stored in UTC)."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


@dataclass
class ChannelFigures:
    """One channel's day: messages by status, error rate, commit latency p50/p99 (ms), last message."""

    channel: str
    by_status: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    last_received: datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def error_rate(self) -> float:
        bad = self.by_status.get("error", 0) + self.by_status.get("rejected", 0)
        return bad / self.total if self.total else 0.0


def channel_figures(conn: Connection, since: datetime) -> dict[str, ChannelFigures]:
    """Per channel, the messages received since ``since`` (the start of today, UTC)."""
    out: dict[str, ChannelFigures] = {}
    rows = conn.execute(
        select(M.c.channel, M.c.status, func.count(), func.max(M.c.received_at))
        .where(M.c.received_at >= since)
        .group_by(M.c.channel, M.c.status)
    ).all()
    for channel, status, count, last in rows:
        fig = out.setdefault(channel, ChannelFigures(channel))
        fig.by_status[str(status)] = int(count)
        last = _aware(last)
        if last is not None and (fig.last_received is None or last > fig.last_received):
            fig.last_received = last
    for channel, fig in out.items():
        times = conn.execute(
            select(M.c.received_at, M.c.processed_at)
            .where(and_(M.c.channel == channel, M.c.received_at >= since, M.c.processed_at.is_not(None)))
            .order_by(desc(M.c.id))
            .limit(LATENCY_SAMPLE)
        ).all()
        latencies = [
            (p - r).total_seconds() * 1000 for r, p in ((_aware(a), _aware(b)) for a, b in times) if r and p
        ]
        fig.p50_ms = _percentile(latencies, 0.50)
        fig.p99_ms = _percentile(latencies, 0.99)
    return out


def last_received(conn: Connection) -> dict[str, datetime]:
    """The newest message's time per channel, whatever the day."""
    rows = conn.execute(select(M.c.channel, func.max(M.c.received_at)).group_by(M.c.channel)).all()
    return {str(c): t for c, last in rows if (t := _aware(last)) is not None}


@dataclass
class SinkFigures:
    """One sink: rows waiting, dead rows, and the age of the oldest waiting row (the delivery lag)."""

    sink: str
    pending: int = 0
    dead: int = 0
    lag_seconds: float | None = None


def sink_figures(conn: Connection, now: datetime) -> dict[str, SinkFigures]:
    out: dict[str, SinkFigures] = {}
    rows = conn.execute(
        select(O.c.destination, O.c.status, func.count(), func.min(O.c.created_at))
        .where(O.c.status.in_(("pending", "dead")))
        .group_by(O.c.destination, O.c.status)
    ).all()
    for sink, status, count, oldest in rows:
        fig = out.setdefault(str(sink), SinkFigures(str(sink)))
        if status == "pending":
            fig.pending = int(count)
            first = _aware(oldest)
            fig.lag_seconds = (now - first).total_seconds() if first else None
        else:
            fig.dead = int(count)
    return out


@dataclass(frozen=True)
class MessageFilter:
    """The message browser's search; every field optional. ``message_type``: ``ADT^A01`` or a prefix
    (``ADT``); ``patient``: an identifier value, or ``system|value``."""

    channel: str = ""
    message_type: str = ""
    status: str = ""
    control_id: str = ""
    since: datetime | None = None
    until: datetime | None = None
    patient: str = ""
    limit: int = 100


def patient_ids(conn: Connection, identifier: str) -> list[str]:
    """The ids of the Patients with this identifier (``value`` or ``system|value``)."""
    system, bar, value = identifier.partition("|")
    if not bar:
        system, value = "", identifier
    q = select(TOK.c.resource_id).where(
        and_(TOK.c.resource_type == "Patient", TOK.c.param == "identifier", TOK.c.value == value.strip())
    )
    if system:
        q = q.where(TOK.c.system == system.strip())
    return sorted({str(r) for r in conn.execute(q.limit(1000)).scalars()})


def search_messages(conn: Connection, f: MessageFilter) -> list[dict[str, Any]]:
    """The messages matching ``f``, newest first (at most ``f.limit``)."""
    q = select(
        M.c.id,
        M.c.channel,
        M.c.control_id,
        M.c.message_type,
        M.c.status,
        M.c.ack_code,
        M.c.error,
        M.c.received_at,
        M.c.replay_count,
    )
    if f.channel:
        q = q.where(M.c.channel == f.channel)
    if f.message_type:
        q = q.where(
            M.c.message_type.like(f.message_type.replace("%", "").replace("_", r"\_") + "%", escape="\\")
        )
    if f.status:
        q = q.where(M.c.status == f.status)
    if f.control_id:
        q = q.where(M.c.control_id == f.control_id)
    if f.since:
        q = q.where(M.c.received_at >= f.since)
    if f.until:
        q = q.where(M.c.received_at < f.until)
    if f.patient:
        ids = patient_ids(conn, f.patient)
        if not ids:
            return []
        wrote = select(H.c.message_id).where(and_(H.c.resource_type == "Patient", H.c.id.in_(ids)))
        q = q.where(M.c.id.in_(wrote))
    rows = conn.execute(q.order_by(desc(M.c.id)).limit(f.limit)).all()
    return [dict(r._mapping) | {"received_at": _aware(r.received_at)} for r in rows]


@dataclass(frozen=True)
class ChainCheck:
    """The result of checking both chains (changes and access records): ``ok`` and one line;
    when broken, ``problem`` names what was found and ``at`` the change entry where (when known)."""

    ok: bool
    summary: str
    problem: str = ""
    at: int | None = None


def verify_trails(conn: Connection) -> ChainCheck:
    """Check the change trail and the access records against the audit key and the signed
    checkpoints, as ``hms-ach audit verify`` does (docs/audit.md)."""
    seal = seal_for(conn)
    try:
        checkpoints = read_checkpoints(seal.checkpoint_path, seal) if seal.checkpoint_path else []
    except CheckpointError as exc:
        return ChainCheck(False, f"checkpoints: {exc.kind}: {exc}", exc.kind)
    result = audit.verify(conn, seal, checkpoints)
    if not result.ok:
        summary = f"change trail NOT intact: {result.problem}: {result.reason}"
        return ChainCheck(False, summary, result.problem, result.bad_seq)
    line = f"change trail intact: {result.checked} entries"
    if seal.key is not None:
        access = access_log.verify_chain(conn, checkpoints)
        if not access.ok:
            summary = f"access records NOT intact: {access.problem}: {access.reason}"
            return ChainCheck(False, summary, access.problem)
        line += f"; {access.checked} access records chained"
    else:
        line += "; no audit key: only the unkeyed chain was checked"
    return ChainCheck(True, line)
