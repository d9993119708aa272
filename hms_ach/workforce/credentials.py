"""The credential-expiry scan: Practitioner qualifications whose ``period.end`` has passed or falls
within N days.

Each (practitioner, credential, expiry date, threshold) is alerted once: the ``credential_alert``
row is inserted with ``ON CONFLICT DO NOTHING`` and only a new row emits its outbox event
(``credential.expiring`` or ``credential.expired``) in the same transaction. What its payload carries
is declared in ``mappings/events/credential_expiring.yaml`` / ``credential_expired.yaml``, over the
facts :func:`scan` hands over (see :func:`hms_ach.outbound.events.payload_from`). A renewed licence (a
new end date) is a new credential expiry and is alerted again when its time comes.

The scheduler runs the scan as the ``credential_expiry`` job (:class:`CredentialExpiryJob`).
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import Field

from hms_ach.core.types import JobSchedule
from hms_ach.outbound.events import payload_from
from hms_ach.store import credential_alerts, record_reads
from hms_ach.store.outbox import enqueue
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.workforce.credentials")


def _end_date(text: str) -> date | None:
    """The last day a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime) covers."""
    try:
        if len(text) >= 10:
            return date.fromisoformat(text[:10])
        if len(text) == 7:
            first_next = date(int(text[:4]) + int(text[5:7]) // 12, int(text[5:7]) % 12 + 1, 1)
            return first_next - timedelta(days=1)
        if len(text) == 4:
            return date(int(text), 12, 31)
    except ValueError:
        return None
    return None


def _credential(q: dict[str, Any], index: int) -> str:
    for ident in q.get("identifier") or []:
        if ident.get("value"):
            return str(ident["value"])[:255]
    code = q.get("code") or {}
    text = code.get("text") or next((c.get("code") for c in code.get("coding") or [] if c.get("code")), None)
    return f"{text or 'qualification'}#{index}"[:255]


def current_expiries(practitioner: dict[str, Any]) -> set[tuple[str, str]]:
    """(credential, expires) of the practitioner's qualifications now: an alert matching none of them
    is closed (the licence was renewed with a new end date, or removed)."""
    return {
        (_credential(q, i), str((q.get("period") or {}).get("end") or "")[:40])
        for i, q in enumerate(practitioner.get("qualification") or [])
    }


def scan(tx: Tx, days_ahead: int = 30, today: date | None = None) -> dict[str, int]:
    """Record new alerts and emit their events; returns counts (new expiring, new expired, already alerted)."""
    today = today or datetime.now(UTC).date()
    horizon = today + timedelta(days=days_ahead)
    counts = {"expiring": 0, "expired": 0, "already_alerted": 0}
    for practitioner_id, res in record_reads.every_current(tx, "Practitioner"):
        if res.get("active") is False:  # offboarded: its alerts are closed, none is raised
            continue
        for i, q in enumerate(res.get("qualification") or []):
            end_text = str((q.get("period") or {}).get("end") or "")
            end = _end_date(end_text) if end_text else None
            if end is None or end > horizon:
                continue
            expired = end < today
            threshold = "expired" if expired else f"expiring-{days_ahead}d"
            credential = _credential(q, i)
            if not credential_alerts.add(tx, practitioner_id, credential, end_text[:40], threshold):
                counts["already_alerted"] += 1
                continue
            kind = "expired" if expired else "expiring"
            counts[kind] += 1
            code = q.get("code") or {}
            practitioner = f"Practitioner/{practitioner_id}"
            facts = {
                "practitioner": practitioner,
                "credential": credential,
                "type": code.get("text") or next((c.get("code") for c in code.get("coding") or []), None),
                "issuer": (q.get("issuer") or {}).get("display"),
                "expires": end_text,
                "days_left": (end - today).days,
                "threshold": threshold,
            }
            event = f"credential.{kind}"
            context = {
                "resource": practitioner,
                **facts,
                "days_ahead": days_ahead,
                "today": today.isoformat(),
                "qualification": q,
            }
            enqueue(tx, event, payload_from(event, context, facts))
    log.info("credentials.scanned", extra=counts)
    return counts


class CredentialExpirySettings(JobSchedule):
    """``jobs: credential_expiry:`` in channels.yaml."""

    cron: str | None = Field("0 2 * * *", description="Crontab schedule; daily at 02:00 by default")
    days_ahead: int = Field(
        30, ge=0, le=3650, description="Alert on credentials expiring within this many days"
    )


class CredentialExpiryJob:
    """The ``credential_expiry`` job (a :class:`hms_ach.core.types.Job`): :func:`scan`."""

    Settings = CredentialExpirySettings

    def run(self, tx: Tx, settings: CredentialExpirySettings) -> str:
        counts = scan(tx, settings.days_ahead)
        return ", ".join(f"{k}={v}" for k, v in counts.items())
