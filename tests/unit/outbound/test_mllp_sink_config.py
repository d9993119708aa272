"""The mllp sink's settings: which events it wants, route filters, refused settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hms_ach.mapping.hl7_transform import Er7
from hms_ach.outbound.hl7_routing import parse_filter
from hms_ach.outbound.mllp_sink import MllpSink, answer_text
from hms_ach.outbound.webhook import WebhookSink

ROOT = Path(__file__).resolve().parents[3]


def _config(**extra: object) -> MllpSink.Config:
    return MllpSink.Config.model_validate(
        {"name": "down", "type": "mllp", "host": "127.0.0.1", "port": 2575, **extra}
    )


def test_routes_match_channel_and_type_and_nothing_else_is_wanted() -> None:
    cfg = _config(routes=[{"channel": "adt*", "message_types": ["ADT^A0*"]}])
    assert cfg.wants("hl7.received.adt_in.ADT^A01")
    assert cfg.wants("hl7.received.adt.main.ADT^A08")  # a channel name with a dot
    assert not cfg.wants("hl7.received.lab_in.ADT^A01")
    assert not cfg.wants("hl7.received.adt_in.ORU^R01")
    assert not cfg.wants("encounter.admitted")  # no events: nothing generated


def test_generated_events_must_be_ones_a_generate_file_builds_and_filters_must_parse() -> None:
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings
    from hms_ach.outbound import events, hl7_generate
    from hms_ach.outbound.mllp_sink import unknown_transforms

    mset = load_mappings(ROOT / "mappings")
    generated = set(hl7_generate.generators(mset))
    assert {"encounter.admitted", "encounter.discharged", "practitioner.onboarded"} <= generated
    previous = events.current_engine()
    events.use_engine(MappingEngine(mset))
    try:
        assert _config(events=["practitioner.*"]).wants("practitioner.updated")
        assert not _config(events=["*"]).wants("claim.created")  # no generate file builds it
    finally:
        events.use_engine(previous)
    cfg = _config(events=["practitioner.*", "claim.created"])
    assert unknown_transforms([cfg], set(mset.transforms), "c.yaml", generated) == [
        "c.yaml: sink down: events ['claim.created']: no HL7 v2 message is generated from them "
        f"(expected some of: {', '.join(sorted(generated))}; a kind: hl7 file's generate:)"
    ]
    for bad in ("PV1-2 ===", "PV1 = I", "PV1-2 like I"):
        with pytest.raises(ValidationError, match="expected"):
            _config(routes=[{"filter": bad}])


def test_a_star_sink_does_not_get_routed_messages() -> None:
    hook = WebhookSink.Config.model_validate(
        {"name": "w", "type": "webhook", "url": "http://127.0.0.1/x", "secret": "s" * 20}
    )
    assert hook.wants("encounter.admitted") and not hook.wants("hl7.received.adt_in.ADT^A01")


def test_filters() -> None:
    msg = Er7(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5.1\rPV1|1|I\r")
    assert parse_filter("PV1-2 = I").holds(msg)
    assert not parse_filter("PV1-2 != I").holds(msg)
    assert parse_filter("PV1-2 in E, I").holds(msg)
    assert not parse_filter("PV1-3").holds(msg)


def test_the_kept_answer_puts_the_ack_first() -> None:
    text = answer_text(b"MSH|x\rPID|1\r", b"MSH|y\rMSA|AA|1\r")
    assert text == "ack:\nMSH|y\nMSA|AA|1\nsent:\nMSH|x\nPID|1"
    assert answer_text(b"MSH|x\r", None).startswith("ack:\n(none)\n")


def test_check_names_a_transform_that_is_not_loaded() -> None:
    from hms_ach.outbound.mllp_sink import unknown_transforms

    cfg = _config(routes=[{"transform": "adt_to_downstream"}, {"transform": "nope"}], generate_transform="x")
    assert unknown_transforms([cfg], {"adt_to_downstream"}, "c.yaml") == [
        "c.yaml: sink down: routes[1].transform: no kind: hl7 mapping is named 'nope' "
        "(expected one of: adt_to_downstream)",
        "c.yaml: sink down: generate_transform: no kind: hl7 mapping is named 'x' "
        "(expected one of: adt_to_downstream)",
    ]


def test_one_attempt_has_time_for_the_connect_and_the_ack() -> None:
    assert _config(connect_timeout_seconds=5, ack_timeout_seconds=30).timeout_seconds == 35
    assert _config(timeout_seconds=60, ack_timeout_seconds=3).timeout_seconds == 60


def test_event_names_fit_the_outbox_column_whatever_the_channel_and_msh_9() -> None:
    from hms_ach.hl7v2.parse import read_header
    from hms_ach.outbound.hl7_routing import Route, event_name

    header = read_header(b"MSH|^~\\&|A|B|C|D|1||ADT.X^A01_VERY_LONG_EVENT|1|P|2.5.1\r")
    channel = "a_channel_with_a_very_long_name_indeed_over_32"
    name = event_name(channel, header)
    assert len(name) <= 64 and name.endswith(".ADT_X^A01_VERY")
    assert Route(channel=channel, message_types=["ADT_X^*"]).takes(name)
    assert not Route(channel="other", message_types=["*"]).takes(name)


def test_a_fhirpath_filter_is_compiled_at_load_and_a_broken_one_names_sink_route_and_expression() -> None:
    from hms_ach.outbound.hl7_routing import record_filter

    encounter = {"resourceType": "Encounter", "class": {"code": "IMP"}}
    patient = {"resourceType": "Patient", "address": [{"state": "OH"}, {"state": "PA"}]}
    assert record_filter("Encounter.class.code = 'IMP'").holds([patient, encounter])
    # FHIRPath's `=` compares whole collections: with two addresses, test one of them with where()
    assert not record_filter("Patient.address.state = 'PA'").holds([patient, encounter])
    assert record_filter("Patient.address.where(state = 'PA').exists()").holds([patient, encounter])
    assert record_filter("Patient.address.state = 'OH'").holds([{**patient, "address": [{"state": "OH"}]}])
    assert not record_filter("Patient.address.state = 'NY'").holds([patient, encounter])
    assert not record_filter("Encounter.class.code = 'IMP'").holds([patient])  # no record of the type
    assert record_filter("Encounter.class.code = 'IMP'") is record_filter("Encounter.class.code = 'IMP'")
    for bad, why in (
        ("Encounter.class.code == 'IMP'", "column 23"),
        ("Encounter.class.code = ", "column 24"),
        ("Encounter.class.code = 'IMP')", "unexpected ')'"),
        ("Encounter.nosuch()", "Not implemented: nosuch"),
        ("Gizmo.code = 'x'", "does not start with a record type"),
    ):
        with pytest.raises(ValidationError) as caught:
            _config(routes=[{}, {"fhirpath": bad}])
        text = str(caught.value)
        assert f"sink down: routes[1].fhirpath: fhirpath {bad!r}" in text and why in text, text


def test_fhirpath_outcomes_are_evaluated_once_per_expression_for_the_routes_that_take_the_event() -> None:
    from hms_ach.core.records import MappingResult, RecordWrite
    from hms_ach.outbound import hl7_routing

    inpatient = "Encounter.class.code = 'IMP'"
    a = _config(routes=[{"message_types": ["ADT^A01"], "fhirpath": inpatient}]).routes
    b = _config(routes=[{"fhirpath": inpatient}, {"channel": "lab", "fhirpath": "Patient.active"}]).routes
    result = MappingResult(records=[RecordWrite("e", "Encounter", "s", "1", {"class": {"code": "IMP"}})])
    hl7_routing.subscribe(a)
    hl7_routing.subscribe(b)
    try:
        assert hl7_routing.fhirpath_outcomes("hl7.received.adt.ADT^A01", result) == {inpatient: True}
        assert hl7_routing.fhirpath_outcomes("hl7.received.lab.ORU^R01", None) == {
            inpatient: False,
            "Patient.active": False,
        }
    finally:
        hl7_routing.unsubscribe(a)
        hl7_routing.unsubscribe(b)
    assert hl7_routing.fhirpath_outcomes("hl7.received.adt.ADT^A01", result) == {}
    msg = Er7(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5.1\rPV1|1|I\r")
    assert a[0].admits(msg, {"fhirpath": {inpatient: True}})
    assert not a[0].admits(msg, {"fhirpath": {inpatient: False}})
    assert not a[0].admits(msg, {})  # stored before the route existed: not evaluated, not routed
