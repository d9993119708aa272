"""Nightly claim creation: a Claim for every discharged encounter whose charges are complete.

A discharge makes its Claim at once when the charges are already there (see
:mod:`hms_ach.billing.claims`). Charges often post later (a DFT^P03 after the A03); this job
catches those: an encounter that is ``finished``, has billable charges, has no Claim yet, and whose
charges have not changed for ``settle_hours`` (complete) gets its Claim, and with it the
``claim.created`` event that the x12_837 sink turns into a file. Each encounter is its own
SAVEPOINT: one that fails is counted and logged, and the others still get their claims.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import Connection, and_, func, select

from hms_ach.billing.claims import CLAIM_SYSTEM, claim_for_encounter
from hms_ach.store.models import RECORD_TABLES, SearchReference

Charge = RECORD_TABLES["Charge"]
Claim = RECORD_TABLES["Claim"]
Encounter = RECORD_TABLES["Encounter"]


log = logging.getLogger("hms_ach.billing.claim_job")


def unclaimed_encounters(
    conn: Connection, settle_hours: float, now: datetime | None = None, limit: int = 1000
) -> list[str]:
    """Ids of finished encounters with charges, no Claim, and no charge changed within ``settle_hours``."""
    ref = SearchReference.__table__  # type: ignore[attr-defined]
    charge = Charge.__table__  # type: ignore[attr-defined]
    claim = Claim.__table__  # type: ignore[attr-defined]
    enc = Encounter.__table__  # type: ignore[attr-defined]
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=settle_hours)
    latest = func.max(charge.c.last_updated)
    charged = (
        select(ref.c.target_id.label("encounter_id"), latest.label("latest"))
        .join(charge, charge.c.id == ref.c.resource_id)
        .where(
            and_(
                ref.c.resource_type == "Charge",
                ref.c.param == "encounter",
                ref.c.target_type == "Encounter",
                charge.c.deleted.is_(False),
            )
        )
        .group_by(ref.c.target_id)
        .subquery()
    )
    claimed = select(claim.c.key_value).where(claim.c.key_system == CLAIM_SYSTEM)
    rows = conn.execute(
        select(enc.c.id, enc.c.resource, charged.c.latest)
        .join(charged, charged.c.encounter_id == enc.c.id)
        .where(and_(enc.c.deleted.is_(False), enc.c.id.not_in(claimed)))
        .order_by(enc.c.id)
        .limit(limit)
    ).all()
    out = []
    for row in rows:
        latest_change = row.latest if row.latest.tzinfo else row.latest.replace(tzinfo=UTC)
        if latest_change > cutoff:
            continue  # a charge changed recently: more may come
        if orjson.loads(row.resource).get("status") == "finished":
            out.append(str(row.id))
    return out


def create_claims(conn: Connection, settle_hours: float, limit: int = 1000) -> dict[str, int]:
    """Make the missing claims; returns counts (created, skipped: no billable charge, failed)."""
    counts = {"created": 0, "skipped": 0, "failed": 0}
    for encounter_id in unclaimed_encounters(conn, settle_hours, limit=limit):
        savepoint = conn.begin_nested()
        try:
            made = claim_for_encounter(conn, encounter_id, None)
            savepoint.commit()
        except Exception as exc:  # noqa: BLE001 - one bad encounter must not stop the others
            savepoint.rollback()
            counts["failed"] += 1
            log.error(
                "claims.creation_failed",
                extra={"encounter": encounter_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            continue
        counts["created" if made else "skipped"] += 1
    log.info("claims.created", extra=counts)
    return counts
