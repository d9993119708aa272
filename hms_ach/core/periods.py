"""FHIR ``Period`` checks shared by the layers: is an instant inside a period, and a FHIR date or
dateTime read as an aware instant.

A ``date`` (``2026-12-06``) is a whole UTC day: as a start it is the day's first instant, as an end its
last one, so a role that ends "2026-12-06" still holds all of that day. A dateTime without an offset is
read as UTC. An end or start that is absent, or not a date, leaves that side of the period open.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any


def instant(text: Any, end_of_day: bool = False) -> datetime | None:
    """A FHIR date (its first instant, or with ``end_of_day`` its last) or dateTime as an aware
    datetime; None when absent or not a date."""
    if not isinstance(text, str) or not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.combine(date.fromisoformat(text), time.min, UTC)
            return day + timedelta(days=1) - timedelta(microseconds=1) if end_of_day else day
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def covers(period: Any, now: datetime) -> bool:
    """Whether ``now`` is inside the FHIR ``period`` (a dict with optional ``start``/``end``); no
    period at all covers every instant."""
    if not isinstance(period, dict):
        return True
    start, end = instant(period.get("start")), instant(period.get("end"), end_of_day=True)
    return (start is None or start <= now) and (end is None or now <= end)
