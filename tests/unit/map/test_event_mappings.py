"""Event payload mappings (``kind: event``, mappings/events/): loading, the engine, the golden runner,
and the outbound events module that uses them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hms_ach.errors import ConfigErrors
from hms_ach.map import goldens
from hms_ach.map.engine import MappingEngine
from hms_ach.map.loader import MappingSet, load_mappings
from hms_ach.outbound import events
from hms_ach.store.changes import Change

ROOT = Path(__file__).resolve().parents[3]
MAPPINGS = ROOT / "mappings"


@pytest.fixture(scope="module")
def mset() -> MappingSet:
    return load_mappings(MAPPINGS)


@pytest.fixture
def installed(mset: MappingSet) -> Iterator[MappingEngine]:
    engine = MappingEngine(mset)
    events.use_engine(engine)
    yield engine
    events.use_engine(None)


def test_every_event_derive_fires_has_a_mapping_and_golden_tests(mset: MappingSet) -> None:
    derived = {"encounter.admitted", "encounter.transferred", "encounter.discharged", "encounter.cancelled",
               "bed.status_changed", "practitioner.onboarded", "practitioner.updated", "shift.updated",
               "timecard.recorded", "claim.created", "record.changed"}
    assert derived <= set(events.EVENT_NAMES)
    assert {f.model.event for f in mset.events.values()} == derived
    missing = [f.path.name for f in mset.events.values()
               if not f.path.with_name(f.path.stem + "_test.yaml").exists()]
    assert not missing, f"event mappings without a *_test.yaml beside them: {missing}"


def test_payloads_come_from_the_mappings_in_rule_order_with_nulls(installed: MappingEngine) -> None:
    change = Change("Encounter", "12", 1, "create", None,
                    {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"},
                     "subject": {"reference": "Patient/7", "display": "Maria Rivera"}}, None)
    assert orjson.dumps(events.derive(change)) == orjson.dumps([("encounter.admitted", {
        "resource": "Encounter/12", "versionId": 1, "patient": "Patient/7", "status": "in-progress",
        "class": "IMP", "location": None})])
    assert b"Rivera" not in orjson.dumps(events.derive(change))


def test_a_claim_total_stays_a_number(installed: MappingEngine) -> None:
    change = Change("Claim", "3", 1, "create", None, {"total": {"value": 475.0}}, None)
    assert events.derive(change)[0][1]["total"] == 475.0


def test_an_object_value_keeps_its_decimals_as_json_numbers(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    path = root / "events" / "claim_created.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "  - target: money\n    source: after.total\n",
                    encoding="utf-8")
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        change = Change("Claim", "3", 1, "create", None, {"total": {"value": 475.5, "currency": "USD"}}, None)
        body = events.derive(change)[0][1]
        assert orjson.dumps(body["money"]) == b'{"value":475.5,"currency":"USD"}'
    finally:
        events.use_engine(None)


def test_without_an_engine_or_a_mapping_the_payload_is_the_base_one(tmp_path: Path) -> None:
    change = Change("Shift", "8", 2, "update", None, {"practitioner": {"reference": "Practitioner/3"}}, None)
    events.use_engine(None)
    assert events.derive(change) == [("shift.updated", {"resource": "Shift/8", "versionId": 2})]
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    (root / "events" / "shift_updated.yaml").unlink()
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        assert events.derive(change) == [("shift.updated", {"resource": "Shift/8", "versionId": 2})]
    finally:
        events.use_engine(None)


def test_an_analyst_changes_a_payload_by_editing_yaml(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    path = root / "events" / "timecard_recorded.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "  - target: hours\n    source: after.`hours`\n",
                    encoding="utf-8")
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        change = Change("Timecard", "21", 1, "create", None,
                        {"practitioner": {"reference": "Practitioner/3"}, "hours": 11.5}, None)
        assert events.derive(change) == [("timecard.recorded", {
            "resource": "Timecard/21", "versionId": 1, "practitioner": "Practitioner/3", "hours": 11.5})]
    finally:
        events.use_engine(None)


def test_a_payload_rule_that_fails_keeps_the_change_with_the_base_payload(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    path = root / "events" / "shift_updated.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "  - target: start\n    source: after.start\n"
                    "    required: true\n", encoding="utf-8")
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        change = Change("Shift", "8", 1, "create", None, {"status": "open"}, None)
        assert events.derive(change) == [("shift.updated", {"resource": "Shift/8", "versionId": 1})]
    finally:
        events.use_engine(None)


def _tree_with(tmp_path: Path, name: str, text: str) -> Path:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    (root / "events" / name).write_text(text, encoding="utf-8")
    return root


def test_two_mappings_for_one_event_are_refused(tmp_path: Path) -> None:
    root = _tree_with(tmp_path, "again.yaml", "kind: event\nevent: shift.updated\nrules: []\n")
    with pytest.raises(ConfigErrors) as err:
        load_mappings(root)
    assert "event shift.updated is already mapped by" in str(err.value)


def test_an_event_mapping_cannot_make_records(tmp_path: Path) -> None:
    root = _tree_with(tmp_path, "bad.yaml", "kind: event\nevent: x.y\nrules:\n"
                      "  - target: patient\n    record: patient\n")
    with pytest.raises(ConfigErrors) as err:
        load_mappings(root)
    assert "bad.yaml:5:5: `record:` makes or reads records; an event payload cannot" in str(err.value)


def test_a_bad_fhirpath_names_file_and_line(tmp_path: Path) -> None:
    root = _tree_with(tmp_path, "bad.yaml", "kind: event\nevent: x.y\nrules:\n"
                      "  - target: patient\n    source: after.where(\n")
    with pytest.raises(ConfigErrors) as err:
        load_mappings(root)
    assert "bad.yaml:5:" in str(err.value) and "not a FHIRPath expression" in str(err.value)


# ------------------------------------------------------------------ the golden runner on events

_EVENT_CASE = """cases:
  - name: c
    event:
      event: shift.updated
      resource: Shift/8
      after: {{status: open, practitioner: {{reference: Practitioner/3}}}}
    expect:
      payload: {payload}
"""


def _golden(tmp_path: Path, mset: MappingSet, payload: str) -> goldens.CaseResult:
    path = tmp_path / "x_test.yaml"
    path.write_text(_EVENT_CASE.format(payload=payload), encoding="utf-8")
    (result,) = goldens.run_golden_file(path, mset, ROOT)
    return result


def test_an_event_golden_passes_on_the_exact_payload(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(tmp_path, mset, "{resource: Shift/8, versionId: 1, practitioner: Practitioner/3, status: open}")
    assert result.passed, result.report()


def test_an_event_golden_shows_a_diff(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(tmp_path, mset, "{resource: Shift/8, versionId: 1, practitioner: null, status: open}")
    assert not result.passed and "payload differs" in result.message
    assert '-  "practitioner": null' in result.diff and '+  "practitioner": "Practitioner/3"' in result.diff


def test_an_event_golden_checks_the_order(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(tmp_path, mset, "{versionId: 1, resource: Shift/8, practitioner: Practitioner/3, status: open}")
    assert not result.passed and "another order" in result.message


def test_an_event_case_needs_a_payload_expectation(tmp_path: Path, mset: MappingSet) -> None:
    path = tmp_path / "x_test.yaml"
    path.write_text(_EVENT_CASE.replace("payload: {payload}", "records: [{{resourceType: Shift}}]")
                    .format(), encoding="utf-8")
    (result,) = goldens.run_golden_file(path, mset, ROOT)
    assert not result.passed and "`event:` goes with `expect: payload:`" in result.message
