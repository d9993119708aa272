"""The bulk path of transaction Bundles (hms_ach/fhir/transaction.py, hms_ach/store/bulk.py) stores
exactly what the per-entry path stores, and refuses exactly what it refuses.

Each scenario runs twice, on two empty stores of the same database: once as the engine runs it
(runs of creates and key-conditional writes through the bulk path, planned before the writer),
once with the bulk path off (every entry through the per-entry path). The two stores must then
hold the same records, versions, history, search-index rows, audit entries (in the same chain
order, the chain intact) and outbox events, with ids mapped to business keys; the answers must be
the same entry by entry. A last test counts the statements of a 200-entry transaction.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event, select, text

from hms_ach.fhir import transaction
from hms_ach.fhir.bundles import bundle_operations
from hms_ach.fhir.write import RequestOutcome, prepare_all, request_job
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import audit, audit_keys, messages
from hms_ach.store import bulk as store_bulk
from hms_ach.store.audit_keys import AuditSeal
from hms_ach.store.db import Store
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.resources import RequestLine
from hms_ach.store.writer import StoreWriter
from tests.conftest import empty_store
from tests.integration.engine_helpers import ROOT, STAFF, nurse

ROLES = "urn:test:roles"
TYPES = ("Practitioner", "PractitionerRole")


@pytest.fixture(scope="module")
def mapping() -> MappingEngine:
    return MappingEngine(load_mappings(ROOT / "mappings"))


@pytest.fixture
def twin(store: Store, tmp_path: Path) -> Iterator[Store]:
    """A second empty store on the same database as ``store``."""
    with empty_store("sqlite" if store.dialect == "sqlite" else "postgres", tmp_path, "twin") as s:
        yield s


@pytest.fixture
async def writers(store: Store, twin: Store) -> AsyncIterator[tuple[StoreWriter, StoreWriter]]:
    bulk, single = StoreWriter(store), StoreWriter(twin)
    yield bulk, single
    bulk.stop()
    single.stop()


def role(number: str, practitioner: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "identifier": [{"system": ROLES, "value": number}],
        "active": True,
        "practitioner": {"reference": practitioner},
    }


def post(
    resource: dict[str, Any], full_url: str | None = None, if_none_exist: str | None = None
) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    entry: dict[str, Any] = {"resource": resource, "request": request}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def put(resource: dict[str, Any], url: str, if_match: str | None = None) -> dict[str, Any]:
    request = {"method": "PUT", "url": url} | ({"ifMatch": if_match} if if_match else {})
    return {"resource": resource, "request": request}


def transaction_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def submit(
    writer: StoreWriter, mapping: MappingEngine, bundle: dict[str, Any], planned_for: str | None = "fhir_in"
) -> RequestOutcome:
    """As ``POST /fhir`` does it: operations, validated and mapped, planned (for the source
    ``planned_for``; the engine plans for the request's channel), one heavy writer job (apart: on
    PostgreSQL on the writer's second connection)."""
    ops, kind = bundle_operations(bundle, 1000)
    await prepare_all(ops, mapping)
    meta = messages.MessageMeta(
        channel="fhir_in",
        raw=orjson.dumps(bundle),
        content_type="fhir+json",
        control_id=str(uuid.uuid4()),
        message_type="Bundle",
    )
    transaction.plan(ops, planned_for)  # a Practitioner is merged for its source: the request's channel
    outcome: RequestOutcome = await writer.run(
        request_job(meta, ops, kind, RequestLine("POST", "")), heavy=True, apart=True
    )
    return outcome


async def both(
    writers: tuple[StoreWriter, StoreWriter],
    mapping: MappingEngine,
    monkeypatch: pytest.MonkeyPatch,
    build: Callable[[StoreWriter], dict[str, Any]],
) -> tuple[RequestOutcome, RequestOutcome]:
    """The Bundle ``build`` makes for each store, through the bulk path and through the per-entry path."""
    bulk, single = writers
    with_bulk = await submit(bulk, mapping, build(bulk))
    with monkeypatch.context() as off:
        off.setattr(transaction, "MIN_GROUP", 10**9)
        per_entry = await submit(single, mapping, build(single))
    return with_bulk, per_entry


def ids_by_key(store: Store) -> dict[str, str]:
    """Every record id of the store, as ``Type:system|value``."""
    out: dict[str, str] = {}
    with store.read() as conn:
        for rtype in TYPES:
            t = RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]
            for rid, system, value in conn.execute(select(t.c.id, t.c.key_system, t.c.key_value)):
                out[str(rid)] = f"{rtype}:{system}|{value}"
    return out


def _named(value: Any, names: dict[str, str]) -> Any:
    """``value`` with every record id (alone, or in a reference) replaced by its key."""
    if isinstance(value, dict):
        return {k: _named(v, names) for k, v in value.items() if k != "meta"}
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    if isinstance(value, str):
        if value in names:
            return names[value]
        head, _, tail = value.rpartition("/")
        if tail in names:
            return f"{head}/{names[tail]}"
    return value


def snapshot(store: Store) -> dict[str, Any]:
    """What the store holds, with ids replaced by business keys and times left out."""
    names = ids_by_key(store)
    out: dict[str, Any] = {}
    with store.read() as conn:
        for rtype in TYPES:
            t = RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]
            out[rtype] = sorted(
                (
                    names[str(r.id)],
                    r.version_id,
                    bool(r.deleted),
                    orjson.dumps(_named(orjson.loads(r.resource), names)),
                )
                for r in conn.execute(select(t.c.id, t.c.version_id, t.c.deleted, t.c.resource))
            )
        out["history"] = sorted(
            (
                r.resource_type,
                names[str(r.id)],
                r.version_id,
                bool(r.deleted),
                orjson.dumps(_named(orjson.loads(r.resource), names)),
            )
            for r in conn.execute(
                text("SELECT resource_type, id, version_id, deleted, resource FROM resource_history")
            )
        )
        for kind, model in INDEX_TABLES.items():
            t = model.__table__  # type: ignore[attr-defined]
            cols = [c for c in t.c if c.name != "id"]
            out[kind] = sorted(
                tuple(str(_named(str(v), names)) for v in row) for row in conn.execute(select(*cols))
            )
        out["audit"] = [
            (
                r.action,
                r.entity_type,
                names.get(str(r.entity_id)),
                r.version_id,
                _named(orjson.loads(r.diff), names),
            )
            for r in conn.execute(
                text("SELECT action, entity_type, entity_id, version_id, diff FROM audit_entry ORDER BY seq")
            )
        ]
        out["outbox"] = [
            (r.event, _named(orjson.loads(r.payload), names))
            for r in conn.execute(text("SELECT event, payload FROM outbox_event ORDER BY id"))
        ]
        verified = audit.verify(conn)
    assert verified.problem == "", verified.reason
    return out


def answers(outcome: RequestOutcome, store: Store) -> Any:
    names = ids_by_key(store)
    if outcome.error is not None:
        return ("error", outcome.error.status, outcome.error.code, outcome.error.expression)
    return [(r.status, r.resource_type, names.get(r.rid), r.version, r.changed) for r in outcome.results]


def seed() -> dict[str, Any]:
    return transaction_of(
        [post(nurse(f"E{i}"), f"urn:uuid:e{i}") for i in range(1, 7)] + [post(role("R0", "urn:uuid:e1"))]
    )


def record_id(writer: StoreWriter, key: str) -> str:
    return next(rid for rid, k in ids_by_key(writer.store).items() if k == f"Practitioner:{STAFF}|{key}")


async def test_a_mixed_transaction_stores_what_the_per_entry_path_stores(
    writers: tuple[StoreWriter, StoreWriter], mapping: MappingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    bulk, single = writers
    through_bulk: list[str] = []
    write_versions = store_bulk.write_versions

    def spy(tx: Any, versions: list[store_bulk.NewVersion], *args: Any) -> list[store_bulk.Stored]:
        through_bulk.extend(f"{v.resource_type}/{v.version}" for v in versions)
        return write_versions(tx, versions, *args)

    monkeypatch.setattr(store_bulk, "write_versions", spy)
    first = await both(writers, mapping, monkeypatch, lambda w: seed())
    assert len(through_bulk) == 7
    assert answers(first[0], bulk.store) == answers(first[1], single.store)
    assert [r.status for r in first[0].results] == [201] * 7

    def main(w: StoreWriter) -> dict[str, Any]:
        return transaction_of(
            [
                post(role("R1", "urn:uuid:n1")),  # refers to an entry after it: ordered after n1
                post(nurse("N1"), "urn:uuid:n1"),
                post(
                    nurse("E2", "Changed"), if_none_exist=f"identifier={STAFF}|E2"
                ),  # found: 200, nothing written
                put(nurse("E3", "Mensah"), f"Practitioner?identifier={STAFF}|E3"),  # a new version
                put(nurse("E4"), f"Practitioner?identifier={STAFF}|E4"),  # the same content: no version
                put(nurse("N2"), f"Practitioner?identifier={STAFF}|N2"),  # not there: created
                post(nurse("N3"), if_none_exist=f"identifier={STAFF}|N3"),  # not there: created
                post(role("R2", f"Practitioner/{record_id(w, 'E5')}")),  # a stored record
                {"request": {"method": "DELETE", "url": f"Practitioner/{record_id(w, 'E6')}"}},
                put(
                    nurse("E1", "Boateng") | {"id": record_id(w, "E1")}, f"Practitioner/{record_id(w, 'E1')}"
                ),
                post(nurse("N4"), "urn:uuid:n4"),
                post(role("R3", "urn:uuid:n4")),
                put(nurse("E5", "Owusu"), f"Practitioner?identifier={STAFF}|E5", if_match='W/"1"'),
            ]
        )

    through_bulk.clear()
    second = await both(writers, mapping, monkeypatch, main)
    # three runs go through the bulk path (the DELETE and the update by id split them)
    assert sorted(through_bulk) == sorted(
        ["PractitionerRole/1", "Practitioner/1", "Practitioner/2", "Practitioner/1", "Practitioner/1"]
        + ["PractitionerRole/1", "Practitioner/1", "PractitionerRole/1", "Practitioner/2"]
    ), through_bulk
    assert answers(second[0], bulk.store) == answers(second[1], single.store)
    assert [r.status for r in second[0].results] == [
        201,
        201,
        200,
        200,
        200,
        201,
        201,
        201,
        204,
        200,
        201,
        201,
        200,
    ]
    assert snapshot(bulk.store) == snapshot(single.store)


@pytest.mark.parametrize(
    "case",
    ["taken key", "no such reference", "stale If-Match", "urn of no entry", "a key twice"],
)
async def test_a_refused_transaction_is_refused_as_on_the_per_entry_path(
    writers: tuple[StoreWriter, StoreWriter],
    mapping: MappingEngine,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    bulk, single = writers
    await both(writers, mapping, monkeypatch, lambda w: seed())
    entries = [post(nurse(f"M{i}"), f"urn:uuid:m{i}") for i in range(8)]
    if case == "taken key":
        entries[5] = post(nurse("E2"))
    elif case == "no such reference":
        entries[4] = post(role("R9", "Practitioner/not-there"))
    elif case == "stale If-Match":
        entries[6] = put(nurse("E3", "Mensah"), f"Practitioner?identifier={STAFF}|E3", if_match='W/"7"')
    elif case == "urn of no entry":
        entries[3] = post(role("R9", "urn:uuid:nobody"))
    else:
        entries[7] = put(nurse("M2", "Again"), f"Practitioner?identifier={STAFF}|M2")
    before = snapshot(bulk.store)
    refused = await both(writers, mapping, monkeypatch, lambda w: transaction_of(entries))
    if case == "a key twice":  # not a refusal: the later entry updates the record the earlier made
        assert answers(refused[0], bulk.store) == answers(refused[1], single.store)
        assert snapshot(bulk.store) == snapshot(single.store)
        return
    assert refused[0].error is not None and refused[1].error is not None
    assert answers(refused[0], bulk.store) == answers(refused[1], single.store)
    assert refused[0].error.diagnostics.replace(record_id(bulk, "E2"), "?").replace(
        record_id(bulk, "E3"), "?"
    ) == refused[1].error.diagnostics.replace(record_id(single, "E2"), "?").replace(
        record_id(single, "E3"), "?"
    )
    assert snapshot(bulk.store) == before  # nothing of the refused Bundle stays
    assert snapshot(bulk.store) == snapshot(single.store)


@pytest.mark.parametrize("planned_for", ["fhir_in", "another_channel", None])
async def test_practitioners_are_merged_ahead_only_for_the_requests_own_channel(
    writers: tuple[StoreWriter, StoreWriter],
    mapping: MappingEngine,
    monkeypatch: pytest.MonkeyPatch,
    planned_for: str | None,
) -> None:
    """Practitioner survivorship merges by source: the plan merges new Practitioners for the
    request's channel, and the writer uses that only when the stored message has that channel;
    otherwise (or unplanned) it merges them itself. The store is the per-entry path's either way."""
    bulk, single = writers
    merged_in_writer: list[str] = []
    merged = transaction._merged

    def spy(*args: Any) -> dict[str, Any]:
        if threading.current_thread() is not threading.main_thread():  # the writer's, not the plan's
            merged_in_writer.append(args[3])
        return merged(*args)

    monkeypatch.setattr(transaction, "_merged", spy)
    entries = [post(nurse(f"P{i}"), f"urn:uuid:p{i}") for i in range(6)]
    with_bulk = await submit(bulk, mapping, transaction_of(entries), planned_for)
    assert merged_in_writer == ([] if planned_for == "fhir_in" else ["Practitioner"] * 6)
    with monkeypatch.context() as off:
        off.setattr(transaction, "MIN_GROUP", 10**9)
        per_entry = await submit(single, mapping, transaction_of(entries))
    assert answers(with_bulk, bulk.store) == answers(per_entry, single.store)
    assert snapshot(bulk.store) == snapshot(single.store)
    with bulk.store.read() as conn:
        stored = orjson.loads(conn.execute(text("SELECT resource FROM practitioner LIMIT 1")).scalar_one())
    assert any(
        part == {"url": "source", "valueString": "fhir_in"}
        for ext in stored["extension"]
        for part in ext.get("extension", [])
    ), stored


@pytest.mark.parametrize("sealed", ["before the plan", "after the plan"])
async def test_audit_diffs_made_in_the_plan_are_masked_with_the_stores_seal(
    writers: tuple[StoreWriter, StoreWriter],
    mapping: MappingEngine,
    monkeypatch: pytest.MonkeyPatch,
    sealed: str,
) -> None:
    """The plan makes each new record's audit diff with the seal of the process's store; the
    writer uses it only when it was made with its own store's seal (a store sealed after the plan
    has the diff made again): the audit rows are the per-entry path's, masked by the same rules."""
    bulk, single = writers
    # only this test's stores are sealed in the process (earlier tests' stores may still be alive)
    monkeypatch.setattr(audit_keys, "_seals", weakref.WeakKeyDictionary())
    seal = AuditSeal(mask_fields=frozenset({"family"}))  # no key: the chain stays verifiable here
    audit_keys.attach(single.store, seal)
    if sealed == "before the plan":
        audit_keys.attach(bulk.store, seal)
    else:
        plan = transaction.plan

        def plan_then_seal(ops: list[Any], source: str | None = None) -> None:
            plan(ops, source)
            audit_keys.attach(bulk.store, AuditSeal(mask_fields=seal.mask_fields))  # the same rules

        monkeypatch.setattr(transaction, "plan", plan_then_seal)
    made_in_writer: list[str] = []
    diff_text = audit.diff_text

    def spy(change: Any, used: AuditSeal) -> str:
        if threading.current_thread() is not threading.main_thread():
            made_in_writer.append(change.id)
        return diff_text(change, used)

    monkeypatch.setattr(audit, "diff_text", spy)
    entries = [post(nurse(f"Q{i}", "Mensah"), f"urn:uuid:q{i}") for i in range(6)]
    first = await both(writers, mapping, monkeypatch, lambda w: transaction_of(entries))
    assert answers(first[0], bulk.store) == answers(first[1], single.store)
    assert snapshot(bulk.store) == snapshot(single.store)
    with bulk.store.read() as conn:
        diffs = [r[0] for r in conn.execute(text("SELECT diff FROM audit_entry"))]
    assert len(diffs) == 6 and not any("Mensah" in d for d in diffs), diffs
    # the per-entry path makes its 6 in the writer; the bulk path only those made under another seal
    assert len(made_in_writer) == (6 if sealed == "before the plan" else 12)


async def test_a_transaction_of_200_creates_takes_a_few_statements(
    writers: tuple[StoreWriter, StoreWriter], mapping: MappingEngine
) -> None:
    bulk, _single = writers
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(bulk.store.writer, "before_cursor_execute", count)
    try:
        outcome = await submit(
            bulk, mapping, transaction_of([post(nurse(f"S{i}"), f"urn:uuid:s{i}") for i in range(200)])
        )
    finally:
        event.remove(bulk.store.writer, "before_cursor_execute", count)
    assert [r.status for r in outcome.results] == [201] * 200
    assert len(seen) < 40, seen  # entry by entry: about ten a record
    with bulk.store.read() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM practitioner")).scalar_one() == 200
        assert conn.execute(text("SELECT COUNT(*) FROM audit_entry")).scalar_one() == 200
        assert conn.execute(text("SELECT COUNT(*) FROM outbox_event")).scalar_one() == 200
