"""Event payload mappings (``kind: event``, mappings/events/): loading, the engine, the golden runner,
and the outbound events module that uses them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from ruamel.yaml import YAML
from sqlalchemy import select

from hms_ach.billing.x12_837 import X12ClaimSink
from hms_ach.core.errors import ConfigErrors
from hms_ach.hl7v2.parse import parse
from hms_ach.mapping import goldens
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import MappingSet, load_mappings
from hms_ach.mapping.paths import CsvRecord
from hms_ach.outbound import events
from hms_ach.outbound.sinks import Delivery
from hms_ach.store.changes import Change
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, OutboxEvent
from hms_ach.store.repository import Repository
from hms_ach.workforce.credentials import scan

Practitioner = RECORD_TABLES["Practitioner"]

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


def test_every_event_has_a_mapping_and_golden_tests(mset: MappingSet) -> None:
    assert {f.model.event for f in mset.events.values()} == set(events.EVENT_NAMES)
    missing = [
        f.path.name for f in mset.events.values() if not f.path.with_name(f.path.stem + "_test.yaml").exists()
    ]
    assert not missing, f"event mappings without a *_test.yaml beside them: {missing}"


def test_payloads_come_from_the_mappings_in_rule_order_with_nulls(installed: MappingEngine) -> None:
    change = Change(
        "Encounter",
        "12",
        1,
        "create",
        None,
        {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {"code": "IMP"},
            "subject": {"reference": "Patient/7", "display": "Maria Rivera"},
        },
        None,
    )
    assert orjson.dumps(events.derive(change)) == orjson.dumps(
        [
            (
                "encounter.admitted",
                {
                    "resource": "Encounter/12",
                    "versionId": 1,
                    "patient": "Patient/7",
                    "status": "in-progress",
                    "class": "IMP",
                    "location": None,
                },
            )
        ]
    )
    assert b"Rivera" not in orjson.dumps(events.derive(change))


def test_a_claim_total_stays_a_number(installed: MappingEngine) -> None:
    change = Change("Claim", "3", 1, "create", None, {"total": {"value": 475.0}}, None)
    assert events.derive(change)[0][1]["total"] == 475.0


def test_an_object_value_keeps_its_decimals_as_json_numbers(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    path = root / "events" / "claim_created.yaml"
    path.write_text(
        path.read_text(encoding="utf-8") + "  - target: money\n    source: after.total\n", encoding="utf-8"
    )
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
    path.write_text(
        path.read_text(encoding="utf-8") + "  - target: hours\n    source: after.`hours`\n", encoding="utf-8"
    )
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        change = Change(
            "Timecard",
            "21",
            1,
            "create",
            None,
            {"practitioner": {"reference": "Practitioner/3"}, "hours": 11.5},
            None,
        )
        assert events.derive(change) == [
            (
                "timecard.recorded",
                {"resource": "Timecard/21", "versionId": 1, "practitioner": "Practitioner/3", "hours": 11.5},
            )
        ]
    finally:
        events.use_engine(None)


def test_a_payload_rule_that_fails_keeps_the_change_with_the_base_payload(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    path = root / "events" / "shift_updated.yaml"
    path.write_text(
        path.read_text(encoding="utf-8") + "  - target: start\n    source: after.start\n    required: true\n",
        encoding="utf-8",
    )
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


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param(
            "again.yaml",
            "kind: event\nevent: shift.updated\nrules: []\n",
            ["event shift.updated is already mapped by"],
            id="two mappings for one event are refused",
        ),
        pytest.param(
            "bad.yaml",
            "kind: event\nevent: x.y\nrules:\n  - target: patient\n    record: patient\n",
            ["bad.yaml:5:5: `record:` makes or reads records; an event payload cannot"],
            id="an event mapping cannot make records",
        ),
        pytest.param(
            "bad.yaml",
            "kind: event\nevent: x.y\nrules:\n  - target: patient\n    source: after.where(\n",
            ["bad.yaml:5:", "not a FHIRPath expression"],
            id="a bad FHIRPath names file and line",
        ),
    ],
)
def test_a_bad_event_mapping_is_refused_saying_why(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    root = _tree_with(tmp_path, name, text)
    with pytest.raises(ConfigErrors) as err:
        load_mappings(root)
    for part in expected:
        assert part in str(err.value)


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
    (result,) = goldens.run_golden_file(path, mset, ROOT, parse)
    return result


def test_an_event_golden_passes_on_the_exact_payload(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(
        tmp_path, mset, "{resource: Shift/8, versionId: 1, practitioner: Practitioner/3, status: open}"
    )
    assert result.passed, result.report()


def test_an_event_golden_shows_a_diff(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(tmp_path, mset, "{resource: Shift/8, versionId: 1, practitioner: null, status: open}")
    assert not result.passed and "payload differs" in result.message
    assert '-  "practitioner": null' in result.diff and '+  "practitioner": "Practitioner/3"' in result.diff


def test_an_event_golden_checks_the_order(tmp_path: Path, mset: MappingSet) -> None:
    result = _golden(
        tmp_path, mset, "{versionId: 1, resource: Shift/8, practitioner: Practitioner/3, status: open}"
    )
    assert not result.passed and "another order" in result.message


def test_an_event_case_needs_a_payload_expectation(tmp_path: Path, mset: MappingSet) -> None:
    path = tmp_path / "x_test.yaml"
    path.write_text(
        _EVENT_CASE.replace("payload: {payload}", "records: [{{resourceType: Shift}}]").format(),
        encoding="utf-8",
    )
    (result,) = goldens.run_golden_file(path, mset, ROOT, parse)
    assert not result.passed and "`event:` goes with `expect: payload:`" in result.message


# ------------------------------------------------------------------ events a job or a sink emits (payload_from)

X12_FILE = ROOT / "tests" / "integration" / "data" / "claim_837p.x12"


def _with_rule(tmp_path: Path, name: str, rule: str) -> Path:
    """A copy of mappings/ where events/NAME has one more rule at its end."""
    root = tmp_path / "mappings"
    if not root.exists():
        shutil.copytree(MAPPINGS, root)
    path = root / "events" / name
    path.write_text(path.read_text(encoding="utf-8") + rule, encoding="utf-8")
    return root


def test_payload_from_uses_the_mapping_and_falls_back_to_the_base(tmp_path: Path) -> None:
    facts = {"claim": "Claim/3", "reason": "no coverage"}
    events.use_engine(None)
    assert events.payload_from("claim.error", {"resource": "Claim/3", **facts}, facts) is facts
    root = _with_rule(tmp_path, "claim_error.yaml", "  - target: about\n    source: resource\n")
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        assert events.payload_from("claim.error", {"resource": "Claim/3", **facts}, facts) == {
            "claim": "Claim/3",
            "reason": "no coverage",
            "about": "Claim/3",
        }
        assert events.payload_from("no.such.event", {"resource": "Claim/3"}, facts) is facts
    finally:
        events.use_engine(None)


def test_payload_from_a_failing_mapping_is_logged_and_the_base_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _with_rule(
        tmp_path, "claim_error.yaml", "  - target: file\n    source: file\n    required: true\n"
    )
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        facts = {"claim": "Claim/3", "reason": "no coverage"}
        assert events.payload_from("claim.error", {"resource": "Claim/3", **facts}, facts) is facts
    finally:
        events.use_engine(None)
    assert [r.getMessage() for r in caplog.records if r.name == "hms_ach.outbound.events"] == [
        "events.payload_failed"
    ]


def _practitioner_expiring(store: Store, expires: str) -> None:
    engine = MappingEngine(load_mappings(MAPPINGS))
    row = {
        "employee_id": "E2",
        "npi": "",
        "family_name": "Test",
        "given_name": "E2",
        "license_number": "LIC-E2",
        "license_type": "SL",
        "license_state": "OH",
        "license_expires": expires,
        "active": "Y",
    }
    result = engine.map_input("csv", "staff_roster", CsvRecord(row, 2, "t.csv", list(row)))
    with store.writer.begin() as conn:
        Repository(conn).apply(result, None)


def _credential_events(store: Store) -> list[tuple[str, dict[str, Any]]]:
    t = OutboxEvent.__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        rows = conn.execute(select(t).where(t.c.event.like("credential.%")).order_by(t.c.id))
        return [(r.event, orjson.loads(r.payload)) for r in rows]


def test_a_credential_payload_comes_from_its_mapping(tmp_path: Path, store: Store) -> None:
    today = date(2026, 11, 26)
    _practitioner_expiring(store, "2026-12-06")
    with store.reader.connect() as conn:
        practitioner = conn.execute(select(Practitioner.__table__.c.id)).scalar_one()  # type: ignore[attr-defined]
    # the shipped mapping gives exactly the payload the job built in code (and still builds without one)
    events.use_engine(MappingEngine(load_mappings(MAPPINGS)))
    try:
        with store.writer.begin() as conn:
            assert scan(conn, 30, today)["expiring"] == 1
    finally:
        events.use_engine(None)
    expected = {
        "version": 1,
        "practitioner": f"Practitioner/{practitioner}",
        "credential": "LIC-E2",
        "type": "SL",
        "issuer": "OH",
        "expires": "2026-12-06",
        "days_left": 10,
        "threshold": "expiring-30d",
    }
    assert _credential_events(store) == [("credential.expiring", expected)]
    assert list(_credential_events(store)[0][1]) == list(expected)
    # an analyst adds an element: the job's next alert (a new threshold) carries it
    root = _with_rule(
        tmp_path, "credential_expiring.yaml", "  - target: horizonDays\n    source: days_ahead\n"
    )
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        with store.writer.begin() as conn:
            assert scan(conn, 60, today)["expiring"] == 1
    finally:
        events.use_engine(None)
    later = _credential_events(store)[1][1]
    assert later["horizonDays"] == 60 and later["threshold"] == "expiring-60d"
    # without an engine: the facts as the job knows them, as before mappings
    with store.writer.begin() as conn:
        assert scan(conn, 90, today)["expiring"] == 1
    assert _credential_events(store)[2][1] == {**expected, "threshold": "expiring-90d"}


def _sink(directory: Path, store: Any = None) -> X12ClaimSink:
    settings = X12ClaimSink.Config.model_validate(
        {
            "name": "claims_837",
            "type": "x12_837",
            "directory": str(directory),
            "sender_id": "GENHOSP",
            "receiver_id": "CLEARHOUSE",
            "submitter_name": "General Hospital",
            "submitter_phone": "6145550100",
            "receiver_name": "Ohio Clearing House",
            "billing_provider": {
                "name": "General Hospital Physicians",
                "npi": "1245319599",
                "tax_id": "311234567",
                "address": "100 Main St",
                "city": "Columbus",
                "state": "OH",
                "zip": "432151234",
            },
        }
    )
    return X12ClaimSink(settings, store)


def _claim_created(event_id: int, claim: str) -> Delivery:
    return Delivery(
        1,
        event_id,
        "claim.created",
        {"version": 1, "resource": claim, "versionId": 1},
        "2026-11-26T19:05:00Z",
        0,
    )


async def test_a_claim_file_written_payload_comes_from_its_mapping(tmp_path: Path) -> None:
    out = tmp_path / "x12"
    out.mkdir()
    # a file written by an earlier attempt: the redelivery emits claim.file_written for it
    shutil.copy(X12_FILE, out / "837P-e42-000000001.x12")
    sink = _sink(out)
    before_mappings = {
        "claim": "Claim/30",
        "file": "837P-e42-000000001.x12",
        "interchangeControlNumber": "000000001",
        "transactionSetControlNumber": "0001",
        "total": 475.0,
    }
    assert (await sink.deliver(_claim_created(42, "Claim/30"))).followups == [
        ("claim.file_written", before_mappings)
    ]
    events.use_engine(MappingEngine(load_mappings(MAPPINGS)))
    try:  # the shipped mapping: the same, and sftp null without an upload
        assert (await sink.deliver(_claim_created(42, "Claim/30"))).followups == [
            ("claim.file_written", {**before_mappings, "sftp": None})
        ]
    finally:
        events.use_engine(None)
    root = _with_rule(
        tmp_path,
        "claim_file_written.yaml",
        "  - target: isaControl\n"
        "    source: interchangeControlNumber\n  - target: about\n    source: resource\n",
    )
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        ((event, body),) = (await sink.deliver(_claim_created(42, "Claim/30"))).followups
    finally:
        events.use_engine(None)
    assert event == "claim.file_written"
    assert body["isaControl"] == "000000001" and body["about"] == "Claim/30" and body["total"] == 475.0


async def test_a_claim_error_payload_comes_from_its_mapping(tmp_path: Path, store: Store) -> None:
    sink = _sink(tmp_path / "x12", store)
    root = _with_rule(tmp_path, "claim_error.yaml", "  - target: about\n    source: resource\n")
    events.use_engine(MappingEngine(load_mappings(root)))
    try:
        result = await sink.deliver(_claim_created(7, "Claim/99"))
    finally:
        events.use_engine(None)
    assert result.followups == [
        ("claim.error", {"claim": "Claim/99", "reason": "Claim/99 does not exist", "about": "Claim/99"})
    ]


def _variants(change: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``change`` and the same with its scalars turned into other shapes FHIR data takes: numbers,
    booleans, empty text, lists, nulls, a primitive's extension."""
    yield change
    for swap in (7, 2.5, True, False, "", None, ["x", "y"], [], {"code": "Z"}):

        def swapped(value: Any, depth: int = 0, swap: Any = swap) -> Any:
            if isinstance(value, dict):
                return {k: swapped(v, depth + 1) for k, v in value.items()}
            if isinstance(value, list):
                return [swapped(v, depth + 1) for v in value]
            return (
                swap if depth > 0 and isinstance(value, str) and value.endswith(("12", "41", "7")) else value
            )

        yield swapped(change)
    after = change.get("after")
    if isinstance(after, dict) and "status" in after:
        yield {**change, "after": {**after, "_status": {"extension": []}}}
        yield {**change, "after": {**after, "status": ["one", "two"]}}


def test_event_payload_walks_give_what_the_fhirpath_rules_give(mset: MappingSet) -> None:
    """Event mappings whose rules only copy member paths are run as dict walks; on every shipped event
    mapping's test cases, and on variants of them, the payloads equal the general rules' payloads."""
    engine = MappingEngine(mset, "UTC")
    walked = 0
    for f in mset.events.values():
        fast, general = engine._compile_event(f, walk=True), engine._compile_event(f, walk=False)
        walked += fast.__name__ == "walked"
        tests = f.path.with_name(f.path.stem + "_test.yaml")
        cases = YAML(typ="safe").load(tests.read_text(encoding="utf-8"))["cases"] if tests.exists() else []
        for case in cases:
            change = {k: v for k, v in case["event"].items() if k != "event"}
            for variant in _variants(change):
                assert fast(variant) == general(variant), (f.name, case.get("name"), variant)
    assert walked >= 13  # the encounter events at least
