"""Message retention: the inbound messages a retention period lets go.

Processed and duplicate messages received before a cutoff are deleted; error and rejected ones
stay (they hold the raw bytes a replay needs). The housekeeping job
(:mod:`hms_ach.ingest.housekeeping`) decides the cutoff.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete

from hms_ach.store import messages
from hms_ach.store.port import Tx


def purge(tx: Tx, received_before: datetime) -> int:
    """Delete the processed and duplicate messages received before ``received_before``; returns the count."""
    t = messages.T
    result = tx.execute(
        delete(t).where(t.c.status.in_(("processed", "duplicate")), t.c.received_at < received_before)
    )
    return int(result.rowcount or 0)
