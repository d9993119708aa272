"""Repository.apply: the records of one message, their history, index rows and audit entries.

What users rely on: two records that refer to each other (a visit and its diagnosis) are each
stored once, as one version, pointing at each other; a resend changes nothing; the search-index
rows of every record are those of its stored content, however many times one message wrote it;
and each version has one history row and one audit entry. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from hms_ach.core import records
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import search_params
from hms_ach.store.db import Store
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES, AuditEntry, ResourceHistory
from hms_ach.store.repository import Repository, WriteOutcome

VISITS = "urn:test:visit"
PROBLEMS = "urn:test:problem"
MRN = "urn:test:mrn"


def _visit_and_diagnosis(status: str = "in-progress", code: str = "J18.9") -> MappingResult:
    """An A01's shape: a patient, a visit whose diagnosis is a condition about that visit."""
    patient = RecordWrite("patient", "Patient", MRN, "P1", {"gender": "female"})
    visit = RecordWrite(
        "visit",
        "Encounter",
        VISITS,
        "V1",
        {
            "status": status,
            "subject": {"reference": "@patient"},
            "diagnosis": [{"condition": {"reference": "@problem"}}],
        },
    )
    problem = RecordWrite(
        "problem",
        "Condition",
        PROBLEMS,
        "V1-1",
        {
            "subject": {"reference": "@patient"},
            "encounter": {"reference": "@visit"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": code}]},
        },
    )
    return MappingResult("test", [patient, problem, visit])


def _apply(store: Store, result: MappingResult) -> list[WriteOutcome]:
    with store.transaction() as tx:
        return Repository(tx).apply(result)


def _stored(store: Store, resource_type: str) -> list[dict[str, Any]]:
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    with store.read() as conn:
        return [orjson.loads(r) for r in conn.execute(select(table.c.resource)).scalars()]


def _count(store: Store, table: Any, **where: Any) -> int:
    q = select(func.count()).select_from(table)
    for column, value in where.items():
        q = q.where(table.c[column] == value)
    with store.read() as conn:
        return int(conn.execute(q).scalar_one())


def _index(store: Store, resource_type: str, rid: str) -> dict[str, list[dict[str, Any]]]:
    """The stored index rows of one record, by kind, as index_rows makes them (order aside)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with store.read() as conn:
        for kind, model in INDEX_TABLES.items():
            t = model.__table__  # type: ignore[attr-defined]
            cols = [c for c in t.c if c.name not in ("row_id", "resource_type", "resource_id")]
            rows = conn.execute(
                select(*cols).where(t.c.resource_type == resource_type, t.c.resource_id == rid)
            ).all()
            if rows:
                out[kind] = [dict(r._mapping) for r in rows]
    return out


def _same_index(stored: dict[str, list[dict[str, Any]]], expected: dict[str, list[dict[str, Any]]]) -> bool:
    def norm(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
        def key(row: dict[str, Any]) -> str:
            return repr(
                sorted(
                    (k, v.replace(tzinfo=None).isoformat() if hasattr(v, "isoformat") else v)
                    for k, v in row.items()
                )
            )

        return {kind: sorted(key(r) for r in rs) for kind, rs in rows.items() if rs}

    return norm(stored) == norm(expected)


def test_a_visit_and_its_diagnosis_are_each_stored_once_pointing_at_each_other(store: Store) -> None:
    outcomes = _apply(store, _visit_and_diagnosis())

    [visit], [problem] = _stored(store, "Encounter"), _stored(store, "Condition")
    assert visit["diagnosis"][0]["condition"]["reference"] == f"Condition/{problem['id']}"
    assert problem["encounter"]["reference"] == f"Encounter/{visit['id']}"
    assert (visit["meta"]["versionId"], problem["meta"]["versionId"]) == ("1", "1")
    assert sorted((o.resource_type, o.version_id, o.created) for o in outcomes) == [
        ("Condition", 1, True),
        ("Encounter", 1, True),
        ("Patient", 1, True),
    ]
    history = ResourceHistory.__table__  # type: ignore[attr-defined]
    audit = AuditEntry.__table__  # type: ignore[attr-defined]
    assert _count(store, history) == 3
    assert _count(store, audit) == 3
    # the condition is found by its visit, the visit by its patient
    assert _index(store, "Condition", problem["id"])["reference"]
    found = search_params.index_rows("Condition", problem)
    assert {"param": "encounter", "target_type": "Encounter", "target_id": visit["id"]} in found["reference"]


def test_a_resent_message_changes_nothing(store: Store) -> None:
    _apply(store, _visit_and_diagnosis())
    again = _apply(store, _visit_and_diagnosis())

    assert all(not o.changed for o in again)
    history = ResourceHistory.__table__  # type: ignore[attr-defined]
    assert _count(store, history) == 3


def test_a_stored_diagnosis_keeps_its_id_and_gets_a_new_version(store: Store) -> None:
    _apply(store, _visit_and_diagnosis())
    [before] = _stored(store, "Condition")

    _apply(store, _visit_and_diagnosis(status="finished", code="J18.0"))

    [visit], [problem] = _stored(store, "Encounter"), _stored(store, "Condition")
    assert problem["id"] == before["id"]
    assert problem["meta"]["versionId"] == "2"
    assert problem["code"]["coding"][0]["code"] == "J18.0"
    assert visit["diagnosis"][0]["condition"]["reference"] == f"Condition/{problem['id']}"
    assert visit["status"] == "finished"


def test_index_rows_are_those_of_the_stored_content_after_every_message(store: Store) -> None:
    _apply(store, _visit_and_diagnosis())
    # the same record twice in one message: its index rows come from its last version
    twice = _visit_and_diagnosis(status="finished", code="J18.0")
    twice.records.append(
        RecordWrite(
            "problem2",
            "Condition",
            PROBLEMS,
            "V1-1",
            {"code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "J15.9"}]}},
        )
    )
    _apply(store, twice)

    for rtype in ("Patient", "Encounter", "Condition"):
        for record in _stored(store, rtype):
            expected = search_params.index_rows(rtype, record)
            assert _same_index(_index(store, rtype, record["id"]), expected), rtype
    [problem] = _stored(store, "Condition")
    assert problem["meta"]["versionId"] == "3"  # written by both records of the message
    tokens = _index(store, "Condition", problem["id"])["token"]
    assert {r["value"] for r in tokens if r["param"] == "code"} == {problem["code"]["coding"][0]["code"]}
    history = ResourceHistory.__table__  # type: ignore[attr-defined]
    audit = AuditEntry.__table__  # type: ignore[attr-defined]
    versions = _count(store, history)
    assert versions == _count(store, audit)  # one audit entry per version
    assert _count(store, history, resource_type="Condition") == int(problem["meta"]["versionId"])


def test_a_diagnosis_that_would_not_be_created_is_left_out_of_the_visit(store: Store) -> None:
    result = _visit_and_diagnosis()
    result.records[1].create = False  # the condition is update-only and not stored

    _apply(store, result)

    [visit] = _stored(store, "Encounter")
    assert _stored(store, "Condition") == []
    assert b"Condition/" not in orjson.dumps(visit)  # no reference to a record that is not there


def test_a_diagnosis_created_by_another_writer_meanwhile_is_the_one_referred_to(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the id reserved for the cycle's record and its write, another writer creates it
    (two instances on PostgreSQL): the visit ends up referring to the record that exists."""
    reserve = Repository.reserve_id

    def reserve_then_lose(self: Repository, rec: RecordWrite, content: dict[str, Any]) -> str | None:
        rid = reserve(self, rec, content)
        other = RecordWrite(
            rec.alias, rec.resource_type, rec.key_system, rec.key_value, {"clinicalStatus": {}}
        )
        Repository(self.conn).upsert(other, other.content, None)  # "the other writer"
        return rid

    monkeypatch.setattr(Repository, "reserve_id", reserve_then_lose)
    _apply(store, _visit_and_diagnosis())

    [visit], [problem] = _stored(store, "Encounter"), _stored(store, "Condition")
    assert visit["diagnosis"][0]["condition"]["reference"] == f"Condition/{problem['id']}"
    assert problem["encounter"]["reference"] == f"Encounter/{visit['id']}"
    expected = search_params.index_rows("Encounter", visit)
    assert _same_index(_index(store, "Encounter", visit["id"]), expected)


NPI = "http://hl7.org/fhir/sid/us-npi"
STAFF = "urn:test:staff"


def _doctor(alias: str, key: str, npis: list[str]) -> RecordWrite:
    identifiers = [{"system": STAFF, "value": key}] + [{"system": NPI, "value": n} for n in npis]
    return RecordWrite(alias, "Practitioner", STAFF, key, {"identifier": identifiers})


@pytest.fixture
def match_by_npi(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match policy for Practitioner: the same NPI is the same person (as survivorship's)."""

    def npis(content: dict[str, Any]) -> list[tuple[str, str]]:
        return [(NPI, str(i["value"])) for i in content.get("identifier", []) if i.get("system") == NPI]

    monkeypatch.setitem(records.RECORD_MATCHERS, "Practitioner", npis)
    # merged by mode (lists replace), not by source, so that a message can drop an identifier
    monkeypatch.delitem(records.RECORD_MERGERS, "Practitioner", raising=False)


@pytest.mark.usefixtures("match_by_npi")
def test_the_match_policy_finds_a_record_written_earlier_in_the_same_message(store: Store) -> None:
    _apply(
        store, MappingResult("test", [_doctor("a", "S1", ["1234567893"]), _doctor("b", "S2", ["1234567893"])])
    )

    assert len(_stored(store, "Practitioner")) == 1


@pytest.mark.usefixtures("match_by_npi")
def test_the_match_policy_does_not_find_an_identifier_the_same_message_removed(store: Store) -> None:
    _apply(store, MappingResult("test", [_doctor("a", "S1", ["1234567893"])]))

    # S1 loses the NPI, then S2 comes with it: S2 is somebody else
    _apply(store, MappingResult("test", [_doctor("a", "S1", []), _doctor("b", "S2", ["1234567893"])]))

    stored = {r["identifier"][0]["value"]: r for r in _stored(store, "Practitioner")}
    assert sorted(stored) == ["S1", "S2"]
    assert [i["system"] for i in stored["S1"]["identifier"]] == [STAFF]


def test_a_write_remembered_as_unchanged_is_merged_again_under_another_rule_or_version(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory of writes that changed nothing: the same write over the same stored version under
    the same merge rule and settings is not merged again; a new version, a new rule or new settings
    of the rule are, so that no change is ever skipped."""
    merged: list[str] = []
    settings: list[object] = [object()]

    def by_mode_counted(inp: records.MergeInput) -> dict[str, Any]:
        merged.append(inp.source)
        return records.merge_by_mode(inp.mode, inp.old, inp.new)

    monkeypatch.setitem(records.RECORD_MERGERS, "Practitioner", by_mode_counted)
    monkeypatch.setitem(records.MERGE_SETTINGS, "Practitioner", lambda: settings[0])
    doctor = _doctor("a", "S9", [])
    _apply(store, MappingResult("test", [doctor]))
    first = _apply(store, MappingResult("test", [doctor]))
    runs = len(merged)
    again = _apply(store, MappingResult("test", [doctor]))

    assert [(o.changed, o.version_id) for o in first + again] == [(False, 1), (False, 1)]
    assert len(merged) == runs  # answered from memory

    settings[0] = object()  # the rule's settings were replaced (a reload)
    _apply(store, MappingResult("test", [doctor]))
    assert len(merged) == runs + 1

    # a new stored version (another write changed the record) is merged, and its change kept
    _apply(store, MappingResult("test", [_doctor("a", "S9", ["1234567893"])]))
    [after] = _apply(store, MappingResult("test", [doctor]))
    assert (after.changed, after.version_id) == (True, 3)  # the identifiers are the write's again
    assert len(merged) == runs + 3
    [same] = _apply(store, MappingResult("test", [doctor]))
    assert not same.changed  # remembered over version 3 now

    def marking(inp: records.MergeInput) -> dict[str, Any]:
        return {**records.merge_by_mode(inp.mode, inp.old, inp.new), "active": True}

    monkeypatch.setitem(records.RECORD_MERGERS, "Practitioner", marking)  # another rule
    [last] = _apply(store, MappingResult("test", [doctor]))
    assert (last.changed, last.version_id) == (True, 4)
    assert _stored(store, "Practitioner")[0]["active"] is True
