"""Change listeners: the audit trail always, then the subscribed listeners in order, in the change's
own transaction; a listener that raises rolls the change back."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from hms_ach.core.records import RecordWrite
from hms_ach.store import changes
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, AuditEntry
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository


def _patient(tx: Tx, key: str) -> None:
    rec = RecordWrite("patient", "Patient", "urn:test", key, {"gender": "female"})
    Repository(tx).upsert(rec, rec.content, None)


def _count(store: Store, table: object) -> int:
    with store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_listeners_run_after_the_audit_trail_in_the_order_subscribed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changes, "_listeners", [])
    heard: list[tuple[str, str, int]] = []
    audit = AuditEntry.__table__  # type: ignore[attr-defined]

    def first(tx: Tx, change: changes.Change) -> None:
        audited = tx.execute(select(func.count()).select_from(audit)).scalar_one()
        heard.append(("first", change.reference, audited))

    def second(tx: Tx, change: changes.Change) -> None:
        heard.append(("second", change.reference, 0))

    changes.subscribe(first)
    changes.subscribe(second)
    changes.subscribe(first)  # already subscribed: no second call
    with store.writer.begin() as tx:
        _patient(tx, "1")
    assert [(who, ref.split("/")[0]) for who, ref, _ in heard] == [
        ("first", "Patient"),
        ("second", "Patient"),
    ]
    assert heard[0][2] == 1  # the audit row was written before the first listener ran


def test_a_listener_that_raises_rolls_the_change_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes, "_listeners", [])

    def refuse(tx: Tx, change: changes.Change) -> None:
        raise RuntimeError("no")

    changes.subscribe(refuse)
    with pytest.raises(RuntimeError), store.writer.begin() as tx:
        _patient(tx, "2")
    assert _count(store, RECORD_TABLES["Patient"].__table__) == 0  # type: ignore[attr-defined]
    assert _count(store, AuditEntry.__table__) == 0  # type: ignore[attr-defined]
