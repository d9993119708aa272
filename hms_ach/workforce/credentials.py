"""The credential-expiry scan: Practitioner qualifications whose ``period.end`` has passed or falls
within one of the thresholds (60, 30 and 7 days by default).

Each (practitioner, credential, expiry date, threshold) is alerted once, also across restarts: the
``credential_alert`` row is inserted with ``ON CONFLICT DO NOTHING`` and only a new row emits its
outbox event (``credential.expiring`` or ``credential.expired``) in the same transaction. A
credential expiry still the same ``escalate_after_days`` after its first alert is escalated once
(``credential.escalated``, a row with threshold ``escalated``): a ``notify`` sink sends that one to
the managers (mappings/notifications/). What its payload carries
is declared in ``mappings/events/credential_expiring.yaml`` / ``credential_expired.yaml``, over the
facts :func:`scan` hands over (see :func:`hms_ach.outbound.events.payload_from`). A renewed licence (a
new end date) is a new credential expiry and is alerted again when its time comes.

The scheduler runs the scan as the ``credential_expiry`` job (:class:`CredentialExpiryJob`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from pydantic import Field, field_validator

from hms_ach.core.types import JobSchedule
from hms_ach.outbound.events import payload_from
from hms_ach.store import credential_alerts, record_reads
from hms_ach.store.outbox import enqueue
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.workforce.credentials")

#: Days before a credential's end when it is alerted, by default (and once more when it has expired).
DEFAULT_THRESHOLDS = (60, 30, 7)


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


def threshold_reached(days_left: int, thresholds: Sequence[int]) -> str | None:
    """The tightest threshold ``days_left`` has reached: ``expired`` below 0, else ``expiring-<N>d``
    for the smallest N with days_left <= N; None when it is outside every threshold."""
    if days_left < 0:
        return "expired"
    reached = [t for t in sorted(thresholds) if days_left <= t]
    return f"expiring-{reached[0]}d" if reached else None


def scan(
    tx: Tx,
    thresholds: int | Sequence[int] = DEFAULT_THRESHOLDS,
    today: date | None = None,
    *,
    escalate_after_days: int | None = None,
) -> dict[str, int]:
    """Record new alerts and emit their events; returns counts (new expiring, new expired, already
    alerted, and escalated when ``escalate_after_days`` is given).

    ``thresholds`` are days before the end (an int: one threshold, the older ``days_ahead``). Each
    credential expiry is alerted once per threshold it reaches, the tightest one only when a scan
    finds it past several. With ``escalate_after_days``, a credential expiry first alerted that many
    days ago or more, and still the same (not renewed), is escalated once (``credential.escalated``,
    for the managers)."""
    limits = [thresholds] if isinstance(thresholds, int) else list(thresholds)
    explicit_day = today is not None
    today = today or datetime.now(UTC).date()
    at = datetime.combine(today, time(12), tzinfo=UTC) if explicit_day else datetime.now(UTC)
    counts = {"expiring": 0, "expired": 0, "already_alerted": 0}
    if escalate_after_days is not None:
        counts["escalated"] = 0
    for practitioner_id, res in record_reads.every_current(tx, "Practitioner"):
        if res.get("active") is False:  # offboarded: its alerts are closed, none is raised
            continue
        for i, q in enumerate(res.get("qualification") or []):
            end_text = str((q.get("period") or {}).get("end") or "")
            end = _end_date(end_text) if end_text else None
            threshold = threshold_reached((end - today).days, limits) if end is not None else None
            if end is None or threshold is None:
                continue
            credential = _credential(q, i)
            code = q.get("code") or {}
            practitioner = f"Practitioner/{practitioner_id}"
            facts: dict[str, Any] = {
                "practitioner": practitioner,
                "credential": credential,
                "type": code.get("text") or next((c.get("code") for c in code.get("coding") or []), None),
                "issuer": (q.get("issuer") or {}).get("display"),
                "expires": end_text,
                "days_left": (end - today).days,
                "threshold": threshold,
            }
            extra = {"days_ahead": max(limits), "today": today.isoformat(), "qualification": q}
            if credential_alerts.add(tx, practitioner_id, credential, end_text[:40], threshold, at):
                kind = "expired" if threshold == "expired" else "expiring"
                counts[kind] += 1
                _emit(tx, f"credential.{kind}", facts, extra)
            else:
                counts["already_alerted"] += 1
            if escalate_after_days is not None:
                counts["escalated"] += _escalate(tx, practitioner_id, facts, extra, escalate_after_days, at)
    log.info("credentials.scanned", extra=counts)
    return counts


def _emit(tx: Tx, event: str, facts: dict[str, Any], extra: dict[str, Any]) -> None:
    context = {"resource": facts["practitioner"], **facts, **extra}
    enqueue(tx, event, payload_from(event, context, facts))


def _escalate(
    tx: Tx, practitioner_id: str, facts: dict[str, Any], extra: dict[str, Any], after_days: int, at: datetime
) -> int:
    """1 if this credential expiry is escalated now (first alerted ``after_days`` ago or more)."""
    expires = str(facts["expires"])[:40]
    first = credential_alerts.first_raised(tx, practitioner_id, str(facts["credential"]), expires)
    if first is None or (at.date() - first.date()).days < after_days:
        return 0
    if not credential_alerts.add(
        tx, practitioner_id, str(facts["credential"]), expires, credential_alerts.ESCALATED, at
    ):
        return 0
    escalated = {**facts, "first_alerted": first.date().isoformat(), "escalate_after_days": after_days}
    _emit(tx, "credential.escalated", escalated, extra)
    return 1


class CredentialExpirySettings(JobSchedule):
    """``jobs: credential_expiry:`` in channels.yaml."""

    cron: str | None = Field("0 2 * * *", description="Crontab schedule; daily at 02:00 by default")
    thresholds_days: list[int] = Field(
        default_factory=lambda: list(DEFAULT_THRESHOLDS),
        min_length=1,
        description="Alert when a credential is this many days from its end, once per threshold (and "
        "once when it has expired)",
    )
    days_ahead: int | None = Field(
        None,
        ge=0,
        le=3650,
        description="Older form: one threshold of this many days (replaces thresholds_days when set)",
    )
    escalate_after_days: int | None = Field(
        14,
        ge=0,
        le=3650,
        description="Escalate to the managers (credential.escalated) when a credential expiry is still "
        "the same this many days after its first alert; null: never",
    )

    @field_validator("thresholds_days")
    @classmethod
    def _days(cls, value: list[int]) -> list[int]:
        if any(d < 0 or d > 3650 for d in value):
            raise ValueError("each threshold is a number of days from 0 to 3650")
        return sorted(set(value), reverse=True)

    def thresholds(self) -> list[int]:
        return [self.days_ahead] if self.days_ahead is not None else self.thresholds_days


class CredentialExpiryJob:
    """The ``credential_expiry`` job (a :class:`hms_ach.core.types.Job`): :func:`scan`."""

    Settings = CredentialExpirySettings

    def run(self, tx: Tx, settings: CredentialExpirySettings) -> str:
        counts = scan(tx, settings.thresholds(), escalate_after_days=settings.escalate_after_days)
        return ", ".join(f"{k}={v}" for k, v in counts.items())
