"""What the alert rules measure (hms_ach/outbound/alerts.py), and each rule's stored state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from hms_ach.store.models import AlertState, InboundMessage, JobRun
from hms_ach.store.outbox import open_counts
from hms_ach.store.port import Tx

M = InboundMessage.__table__  # type: ignore[attr-defined]
S = AlertState.__table__  # type: ignore[attr-defined]
J = JobRun.__table__  # type: ignore[attr-defined]

#: Message statuses that count as errors for an error-rate rule.
BAD_STATUSES = ("error", "rejected")


def message_counts(tx: Tx, channel: str | None, since: datetime) -> tuple[int, int]:
    """(messages received since ``since``, of which errors or rejections) on ``channel`` (any: None);
    duplicates are not counted. Uses the (status, received_at) index."""
    q = select(M.c.status, func.count()).where(M.c.received_at >= since, M.c.status != "duplicate")
    if channel is not None:
        q = q.where(M.c.channel == channel)
    counts: dict[str, int] = {str(s): int(n) for s, n in tx.execute(q.group_by(M.c.status)).all()}
    return sum(counts.values()), sum(counts.get(s, 0) for s in BAD_STATUSES)


def last_received(tx: Tx, channel: str) -> datetime | None:
    """When ``channel`` last received a message (None: never, or every row purged)."""
    value = tx.execute(select(func.max(M.c.received_at)).where(M.c.channel == channel)).scalar()
    return value if isinstance(value, datetime) else None


def outbox_rows(tx: Tx, sink: str | None, status: str) -> int:
    """Outbox rows of ``sink`` (any: None) with ``status`` (pending or dead)."""
    return sum(n for dest, st, n in open_counts(tx) if st == status and (sink is None or dest == sink))


def job_status(tx: Tx, job: str | None) -> list[tuple[str, str]]:
    """(job, last status) of ``job`` (every job: None)."""
    q = select(J.c.name, J.c.status)
    if job is not None:
        q = q.where(J.c.name == job)
    return [(str(n), str(s or "")) for n, s in tx.execute(q).all()]


@dataclass
class StoredAlert:
    firing: bool
    since: datetime | None
    value: str


def state(tx: Tx, name: str) -> StoredAlert | None:
    row = tx.execute(select(S.c.firing, S.c.since, S.c.value).where(S.c.name == name)).first()
    return None if row is None else StoredAlert(bool(row.firing), row.since, str(row.value or ""))


def save_state(tx: Tx, name: str, firing: bool, since: datetime | None, value: str, now: datetime) -> None:
    values = {"firing": firing, "since": since, "value": value[:400], "checked_at": now}
    if tx.execute(S.update().where(S.c.name == name).values(**values)).rowcount == 0:
        tx.execute(S.insert().values(name=name, **values))
