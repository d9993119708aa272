"""The credential alerts already raised (table ``credential_alert``), so each is raised once.

One row per (practitioner, credential, expiry date, threshold); :func:`add` inserts it with
``ON CONFLICT DO NOTHING`` and says whether it was new; :func:`first_raised` is when the first alert
of one credential expiry was raised (the start of the escalation clock). The scan that decides what to alert is
:mod:`hms_ach.workforce.credentials`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.store.models import CredentialAlert
from hms_ach.store.port import Tx

ALERTS = CredentialAlert.__table__  # type: ignore[attr-defined]
#: The threshold of the row that records an escalation to the managers.
ESCALATED = "escalated"


def add(
    tx: Tx, practitioner_id: str, credential: str, expires: str, threshold: str, at: datetime | None = None
) -> bool:
    """Record one alert in the caller's transaction (raised ``at``, default now); False when it was
    raised before."""
    insert = pg_insert if tx.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(ALERTS).values(
        practitioner_id=practitioner_id,
        credential=credential,
        expires=expires,
        threshold=threshold,
        created_at=at or datetime.now(UTC),
    )
    new = tx.execute(
        stmt.on_conflict_do_nothing(
            index_elements=["practitioner_id", "credential", "expires", "threshold"]
        ).returning(ALERTS.c.id)
    ).first()
    return new is not None


@dataclass(frozen=True)
class RaisedAlert:
    """One alert row: the credential and expiry it was raised for."""

    credential: str
    expires: str
    threshold: str


def of_practitioner(tx: Tx, practitioner_id: str) -> list[RaisedAlert]:
    """The alerts raised for one practitioner, in the order they were raised."""
    rows = tx.execute(
        select(ALERTS.c.credential, ALERTS.c.expires, ALERTS.c.threshold)
        .where(ALERTS.c.practitioner_id == practitioner_id)
        .order_by(ALERTS.c.id)
    ).all()
    return [RaisedAlert(r.credential, r.expires, r.threshold) for r in rows]


def first_raised(tx: Tx, practitioner_id: str, credential: str, expires: str) -> datetime | None:
    """When the first alert of this credential expiry was raised (UTC-aware), None if none was."""
    value = tx.execute(
        select(func.min(ALERTS.c.created_at)).where(
            ALERTS.c.practitioner_id == practitioner_id,
            ALERTS.c.credential == credential,
            ALERTS.c.expires == expires,
            ALERTS.c.threshold != ESCALATED,
        )
    ).scalar()
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
