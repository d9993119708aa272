"""The claim job's query: discharged-looking encounters that have charges and no Claim yet.

The rule that decides which of them get a Claim now (status, charges settled) is the job's
(:mod:`hms_ach.billing.claim_job`); this module only finds the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, func, select

from hms_ach.store.models import RECORD_TABLES, SearchReference
from hms_ach.store.port import Tx

REFERENCES = SearchReference.__table__  # type: ignore[attr-defined]
CHARGES = RECORD_TABLES["Charge"].__table__  # type: ignore[attr-defined]
CLAIMS = RECORD_TABLES["Claim"].__table__  # type: ignore[attr-defined]
ENCOUNTERS = RECORD_TABLES["Encounter"].__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Unclaimed:
    """An encounter with charges and no Claim: its id, content and last charge change (UTC-aware)."""

    encounter_id: str
    content: dict[str, Any]
    charges_changed_at: datetime


def unclaimed_encounters(tx: Tx, claim_system: str, limit: int = 1000) -> list[Unclaimed]:
    """Encounters (not deleted) that some charge (not deleted) refers to, and whose id is the key of
    no Claim under ``claim_system``; in id order, at most ``limit``."""
    latest = func.max(CHARGES.c.last_updated)
    charged = (
        select(REFERENCES.c.target_id.label("encounter_id"), latest.label("latest"))
        .join(CHARGES, CHARGES.c.id == REFERENCES.c.resource_id)
        .where(
            and_(
                REFERENCES.c.resource_type == "Charge",
                REFERENCES.c.param == "encounter",
                REFERENCES.c.target_type == "Encounter",
                CHARGES.c.deleted.is_(False),
            )
        )
        .group_by(REFERENCES.c.target_id)
        .subquery()
    )
    claimed = select(CLAIMS.c.key_value).where(CLAIMS.c.key_system == claim_system)
    rows = tx.execute(
        select(ENCOUNTERS.c.id, ENCOUNTERS.c.resource, charged.c.latest)
        .join(charged, charged.c.encounter_id == ENCOUNTERS.c.id)
        .where(and_(ENCOUNTERS.c.deleted.is_(False), ENCOUNTERS.c.id.not_in(claimed)))
        .order_by(ENCOUNTERS.c.id)
        .limit(limit)
    ).all()
    return [
        Unclaimed(
            str(row.id),
            orjson.loads(row.resource),
            row.latest if row.latest.tzinfo else row.latest.replace(tzinfo=UTC),
        )
        for row in rows
    ]
