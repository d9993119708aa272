"""Nightly claim creation: a Claim for every discharged encounter whose charges are complete.

A discharge makes its Claim at once when the charges are already there (see
:mod:`hms_ach.billing.claims`). Charges often post later (a DFT^P03 after the A03); this job
catches those: an encounter that is ``finished``, has billable charges, has no Claim yet, and whose
charges have not changed for ``settle_hours`` (complete) gets its Claim, and with it the
``claim.created`` event that the x12_837 sink turns into a file. Each encounter is its own
SAVEPOINT: one that fails is counted and logged, and the others still get their claims.

The scheduler runs it as the ``claim_creation`` job (:class:`ClaimCreationJob`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from pydantic import Field

from hms_ach.billing.claims import CLAIM_SYSTEM, claim_for_encounter
from hms_ach.core.redact import error_kind
from hms_ach.core.types import JobSchedule
from hms_ach.store import claim_queries
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint

log = logging.getLogger("hms_ach.billing.claim_job")


def unclaimed_encounters(
    tx: Tx, settle_hours: float, now: datetime | None = None, limit: int = 1000
) -> list[str]:
    """Ids of finished encounters with charges, no Claim, and no charge changed within ``settle_hours``."""
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=settle_hours)
    out = []
    for candidate in claim_queries.unclaimed_encounters(tx, CLAIM_SYSTEM, limit):
        if candidate.charges_changed_at > cutoff:
            continue  # a charge changed recently: more may come
        if candidate.content.get("status") == "finished":
            out.append(candidate.encounter_id)
    return out


def create_claims(tx: Tx, settle_hours: float, limit: int = 1000) -> dict[str, int]:
    """Make the missing claims; returns counts (created, skipped: no billable charge, failed)."""
    counts = {"created": 0, "skipped": 0, "failed": 0}
    for encounter_id in unclaimed_encounters(tx, settle_hours, limit=limit):
        try:
            with savepoint(tx):
                made = claim_for_encounter(tx, encounter_id, None)
        except Exception as exc:  # noqa: BLE001 - one bad encounter must not stop the others
            counts["failed"] += 1
            log.error(
                "claims.creation_failed",
                extra={"encounter": encounter_id, "error": error_kind(exc)},
            )
            continue
        counts["created" if made else "skipped"] += 1
    # prefixed: "created" is a LogRecord attribute, and logging refuses an extra that would replace it
    log.info("claims.created", extra={f"claims_{k}": v for k, v in counts.items()})
    return counts


class ClaimCreationSettings(JobSchedule):
    """``jobs: claim_creation:`` in channels.yaml."""

    cron: str | None = Field("0 1 * * *", description="Crontab schedule; daily at 01:00 by default")
    settle_hours: float = Field(
        12.0,
        ge=0,
        description="Charges of a discharged encounter are complete when none "
        "has changed for this many hours",
    )
    max_claims_per_run: int = Field(
        1000, ge=1, description="At most this many claims per run (the rest next run)"
    )


class ClaimCreationJob:
    """The ``claim_creation`` job (a :class:`hms_ach.core.types.Job`): :func:`create_claims`."""

    Settings = ClaimCreationSettings

    def run(self, tx: Tx, settings: ClaimCreationSettings) -> str:
        counts = create_claims(tx, settings.settle_hours, settings.max_claims_per_run)
        return ", ".join(f"{k}={v}" for k, v in counts.items())
