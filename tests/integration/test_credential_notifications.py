"""The credential-expiry job at several thresholds (60/30/7 days and expired), each sent once per
credential, and the escalation once a first alert is `escalate_after_days` old, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter
from hms_ach.workforce.credentials import CredentialExpirySettings, scan, threshold_reached
from tests.integration.test_scheduler import _events, _staff

ROOT = Path(__file__).resolve().parents[2]
D = date(2026, 11, 1)


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def _licence(p: Pipeline, expires: date) -> None:
    _staff(p, "E7", expires)


def _scan(p: Pipeline, day: date) -> dict[str, int]:
    return p.writer.run_sync(lambda c: scan(c, (60, 30, 7), day, escalate_after_days=14))


def test_each_threshold_once_then_expired_and_one_escalation(pipeline: Pipeline) -> None:
    _licence(pipeline, D + timedelta(days=45))
    assert _scan(pipeline, D)["expiring"] == 1  # 45 days left: the 60-day threshold
    assert _scan(pipeline, D + timedelta(days=1)) == {
        "expiring": 0,
        "expired": 0,
        "already_alerted": 1,
        "escalated": 0,
    }
    assert _scan(pipeline, D + timedelta(days=14))["escalated"] == 1  # 14 days on, still the same
    at_30 = _scan(pipeline, D + timedelta(days=15))  # 30 left: the 30-day threshold; escalated once only
    assert at_30["expiring"] == 1 and at_30["escalated"] == 0
    assert _scan(pipeline, D + timedelta(days=20))["already_alerted"] == 1
    assert _scan(pipeline, D + timedelta(days=40))["expiring"] == 1  # 5 left: 7 days
    assert _scan(pipeline, D + timedelta(days=46))["expired"] == 1
    assert _scan(pipeline, D + timedelta(days=47)) == {
        "expiring": 0,
        "expired": 0,
        "already_alerted": 1,
        "escalated": 0,
    }
    events = _events(pipeline)
    assert [(e, p["threshold"]) for e, p in events] == [
        ("credential.expiring", "expiring-60d"),
        ("credential.escalated", "expiring-60d"),
        ("credential.expiring", "expiring-30d"),
        ("credential.expiring", "expiring-7d"),
        ("credential.expired", "expired"),
    ]
    escalated = events[1][1]
    assert escalated["first_alerted"] == D.isoformat() and escalated["escalate_after_days"] == 14


def test_a_renewed_licence_is_not_escalated(pipeline: Pipeline) -> None:
    _licence(pipeline, D + timedelta(days=20))
    assert _scan(pipeline, D)["expiring"] == 1
    _licence(pipeline, D + timedelta(days=400))  # renewed: a new end date beyond every threshold
    assert _scan(pipeline, D + timedelta(days=30)) == {
        "expiring": 0,
        "expired": 0,
        "already_alerted": 0,
        "escalated": 0,
    }


def test_thresholds_and_settings() -> None:
    assert [threshold_reached(n, (60, 30, 7)) for n in (61, 60, 31, 30, 8, 7, 0, -1)] == [
        None,
        "expiring-60d",
        "expiring-60d",
        "expiring-30d",
        "expiring-30d",
        "expiring-7d",
        "expiring-7d",
        "expired",
    ]
    assert CredentialExpirySettings().thresholds() == [60, 30, 7]
    assert CredentialExpirySettings(days_ahead=30).thresholds() == [30]  # the older setting
    assert CredentialExpirySettings(thresholds_days=[7, 90, 7]).thresholds() == [90, 7]
