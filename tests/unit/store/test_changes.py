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


def test_many_changes_are_announced_in_order_to_each_listener_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify_many (a transaction Bundle's bulk path): the audit rows of all changes, chained in
    their order, then each listener: its ``many`` variant once, or the listener once per change."""
    monkeypatch.setattr(changes, "_listeners", [])
    monkeypatch.setattr(changes, "_many", {})
    heard: list[tuple[str, list[str]]] = []
    audit = AuditEntry.__table__  # type: ignore[attr-defined]

    def one(tx: Tx, change: changes.Change) -> None:
        heard.append(("one", [change.id]))

    def bulk(tx: Tx, change: changes.Change) -> None:
        raise AssertionError("the many variant is called instead")

    def bulk_many(tx: Tx, many: list[changes.Change]) -> None:
        audited = tx.execute(select(func.count()).select_from(audit)).scalar_one()
        heard.append((f"many after {audited} audit rows", [c.id for c in many]))

    changes.subscribe(bulk, bulk_many)
    changes.subscribe(one)
    made = [changes.Change("Patient", f"p{i}", 1, "create", None, {"id": f"p{i}"}, None) for i in range(3)]
    with store.writer.begin() as tx:
        changes.notify_many(tx, made)
    assert heard == [
        ("many after 3 audit rows", ["p0", "p1", "p2"]),
        ("one", ["p0"]),
        ("one", ["p1"]),
        ("one", ["p2"]),
    ]
    with store.reader.connect() as conn:
        rows = conn.execute(
            select(audit.c.entity_id, audit.c.prev_hash, audit.c.hash).order_by(audit.c.seq)
        ).all()
    assert [r.entity_id for r in rows] == ["p0", "p1", "p2"]
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]  # one chain, in order


def test_a_prepared_listener_writes_the_rows_made_ahead_and_makes_the_others(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify_many: a listener in two halves (changes.Prepared) writes the rows prepare() made
    before the writer for the changes that have them, makes the others' now, in the changes' order,
    with one write for all."""
    monkeypatch.setattr(changes, "_listeners", [])
    monkeypatch.setattr(changes, "_prepared", {})
    written: list[list[tuple[str, str]]] = []

    def listener(tx: Tx, change: changes.Change) -> None:
        raise AssertionError("the prepared halves run instead")

    def make(change: changes.Change) -> list[tuple[str, str]]:
        return [("made", change.id)]

    changes.subscribe(listener, prepared=changes.Prepared(make, lambda tx, rows: written.append(rows)))
    first, second = (changes.Change("Patient", rid, 1, "create", None, {}, None) for rid in ("p1", "p2"))
    ahead = changes.prepare(first)
    assert ahead == {listener: [("made", "p1")]}
    ahead = {listener: [("ahead", "p1")]}  # what a plan made (e.g. with the write time stamped in)
    with store.writer.begin() as tx:
        changes.notify_many(tx, [first, second], [ahead, None])
    assert written == [[("ahead", "p1"), ("made", "p2")]]
    assert _count(store, AuditEntry.__table__) == 2  # type: ignore[attr-defined]  # the audit trail
