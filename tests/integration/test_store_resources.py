"""The store port's FHIR interactions without HTTP: reads, writes and their domain errors.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.core.records import RecordWrite
from hms_ach.store import messages, resources
from hms_ach.store.db import Store
from hms_ach.store.errors import AlreadyExists, MultipleMatches, NotFound, RuleViolation, VersionConflict
from hms_ach.store.savepoint import savepoint

STAFF = "urn:hms-ach:id:staff"
BADGE = "urn:example:badge"


def _write(
    number: str, family: str, expected: int | None = None, badge: str = "", **check: Any
) -> resources.ResourceWrite:
    identifiers = [{"system": STAFF, "value": number}] + (
        [{"system": BADGE, "value": badge}] if badge else []
    )
    content = {"identifier": identifiers, "name": [{"family": family}]}
    rec = RecordWrite("p", "Practitioner", STAFF, number, content)
    return resources.ResourceWrite(rec, content, expected_version=lambda: expected, **check)


def _message(store: Store) -> int:
    with store.writer.begin() as tx:
        return messages.insert_message(
            tx, messages.MessageMeta(channel="t", raw=b"{}", content_type="fhir+json"), keyed=False
        )


def test_create_update_delete_and_reads(store: Store) -> None:
    mid = _message(store)
    with store.writer.begin() as tx:
        made = resources.create(tx, _write("E1", "Osei"), mid)
    assert (made.created, made.changed, made.version) == (True, True, 1)
    with store.writer.begin() as tx:
        same = resources.update(tx, made.id, _write("E1", "Osei"), mid)
        assert (same.created, same.changed, same.version) == (False, False, 1)
        changed = resources.update(tx, made.id, _write("E1", "Mensah", expected=1), mid)
        assert (changed.changed, changed.version) == (True, 2)
        gone = resources.delete(tx, "Practitioner", made.id, mid, lambda: 2)
        assert (gone.changed, gone.version, gone.text) == (True, 3, None)
        again = resources.delete(tx, "Practitioner", made.id, mid)
        assert (again.changed, again.version) == (False, 3)
    now = resources.read(store, "Practitioner", made.id)
    assert now is not None and now.deleted and now.version == 3
    first = resources.vread(store, "Practitioner", made.id, 1)
    assert first is not None and '"Osei"' in first.text
    assert resources.vread(store, "Practitioner", made.id, 9) is None
    page = resources.history(store, "Practitioner", made.id, 2, None)
    assert page is not None and page.newest == 3 and page.more
    assert [v.version for v in page.versions] == [3, 2]
    assert resources.read(store, "Practitioner", "nope") is None
    assert resources.history(store, "Practitioner", "nope", 2, None) is None


def test_refusals_are_domain_errors(store: Store) -> None:
    mid = _message(store)
    with store.writer.begin() as tx:
        made = resources.create(tx, _write("E2", "Osei"), mid)
    with store.writer.begin() as tx:
        with pytest.raises(AlreadyExists) as taken, savepoint(tx):
            resources.create(tx, _write("E2", "Other"), mid)
        assert taken.value.reference == f"Practitioner/{made.id}"
        with pytest.raises(VersionConflict) as stale, savepoint(tx):
            resources.update(tx, made.id, _write("E2", "Other", expected=7), mid)
        assert (stale.value.expected, stale.value.current) == (7, 1)
        with pytest.raises(NotFound), savepoint(tx):
            resources.update(tx, "nope", _write("E2", "Other"), mid)
        with pytest.raises(NotFound), savepoint(tx):
            resources.delete(tx, "Practitioner", "nope", mid)

        def refuse(rid: str, content: dict[str, Any]) -> None:
            raise RuleViolation(f"{rid} refused", code="business-rule")

        with pytest.raises(RuleViolation), savepoint(tx):
            resources.update(tx, made.id, _write("E2", "Other", check=refuse), mid)
    current = resources.read(store, "Practitioner", made.id)
    assert current is not None and current.version == 1 and '"Osei"' in current.text


def test_conditional_create_and_update(store: Store) -> None:
    mid = _message(store)
    with store.writer.begin() as tx:
        made = resources.create_unless_exists(tx, _write("E3", "Osei"), STAFF, "E3", mid)
        found = resources.create_unless_exists(tx, _write("E3", "Other"), STAFF, "E3", mid)
        assert made.created and not found.created and found.id == made.id and found.version == 1
        updated = resources.update_by_identifier(tx, STAFF, "E3", _write("E3", "Mensah"), mid)
        assert (updated.id, updated.version, updated.created) == (made.id, 2, False)
        other = resources.update_by_identifier(tx, STAFF, "E4", _write("E4", "Nowak"), mid)
        assert other.created and other.id != made.id
        # two records carry one badge number: the criterion is ambiguous
        resources.create(tx, _write("E5", "Silva", badge="B1"), mid)
        resources.create(tx, _write("E6", "Silva", badge="B1"), mid)
        with pytest.raises(MultipleMatches) as many, savepoint(tx):
            resources.update_by_identifier(tx, BADGE, "B1", _write("E7", "Silva"), mid)
        assert (many.value.resource_type, many.value.count) == ("Practitioner", 2)
        with pytest.raises(MultipleMatches), savepoint(tx):
            resources.create_unless_exists(tx, _write("E7", "Silva"), None, "B1", mid)


def test_request_lines_are_kept_for_replay(store: Store) -> None:
    mid = _message(store)
    line = resources.RequestLine("PUT", "Practitioner?identifier=s|v", 'W/"1"', None)
    with store.writer.begin() as tx:
        resources.store_request_line(tx, mid, line)
        assert resources.stored_request_line(tx, mid) == line
        assert resources.stored_request_line(tx, mid + 1) is None
