"""Housekeeping: message retention. Processed and duplicate messages older than the retention are
deleted; error and rejected messages stay until they are replayed or handled (they hold the raw
bytes a replay needs)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete

from hms_ach.store import messages

log = logging.getLogger("hms_ach.ingest.housekeeping")


def purge_messages(conn: Connection, retention_days: int, now: datetime | None = None) -> int:
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    t = messages.T
    result = conn.execute(
        delete(t).where(t.c.status.in_(("processed", "duplicate")), t.c.received_at < cutoff)
    )
    count = int(result.rowcount or 0)
    log.info("housekeeping.messages_purged", extra={"count": count, "retention_days": retention_days})
    return count
