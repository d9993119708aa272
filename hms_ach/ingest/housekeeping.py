"""Housekeeping: message retention. Processed and duplicate messages older than the retention are
deleted; error and rejected messages stay until they are replayed or handled (they hold the raw
bytes a replay needs). The scheduler runs it as the ``housekeeping`` job (:class:`HousekeepingJob`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from pydantic import Field

from hms_ach.core.types import JobSchedule
from hms_ach.store import message_retention
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.ingest.housekeeping")


def purge_messages(tx: Tx, retention_days: int, now: datetime | None = None) -> int:
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    count = message_retention.purge(tx, cutoff)
    log.info("housekeeping.messages_purged", extra={"count": count, "retention_days": retention_days})
    return count


class HousekeepingSettings(JobSchedule):
    """``jobs: housekeeping:`` in channels.yaml."""

    cron: str | None = Field("30 3 * * *", description="Crontab schedule; daily at 03:30 by default")
    message_retention_days: int = Field(
        90, ge=1, description="Processed and duplicate messages older than this are deleted (errors are kept)"
    )


class HousekeepingJob:
    """The ``housekeeping`` job (a :class:`hms_ach.core.types.Job`): :func:`purge_messages`."""

    Settings = HousekeepingSettings

    def run(self, tx: Tx, settings: HousekeepingSettings) -> str:
        return f"{purge_messages(tx, settings.message_retention_days)} messages deleted"
