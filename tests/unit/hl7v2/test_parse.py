"""The HL7 v2 reader: segments and fields split eagerly, components on access, escapes decoded at the leaf."""

from __future__ import annotations

import pytest

from hms_ach.core.errors import ContentError, RejectError
from hms_ach.hl7v2.parse import Hl7Message, parse, parse_text
from hms_ach.mapping.paths import Scope, compile_path

SEGMENTS = [
    "MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126083000-0500||ADT^A01^ADT_A01|C1|P|2.5.1",
    "PID|1||100001^^^GENHOSP^MR~123-45-6789^^^SSA^SS||O\\T\\Brien^Mary\\S\\Ann||19750314|F|||"
    "12 Oak St\\F\\Apt 4^^Columbus^OH",
    'PV1|1|I|4W^412^A^GENHOSP||||1234567893^Chen^Lisa^^^Dr^^^NPI&2.16.840.1.113883.4.6&ISO^L|||""',
    "ZPI|1|a\\E\\b|\\X41\\\\R\\|\\.br\\",
]


def _read(message: Hl7Message, path: str) -> list[str]:
    return [v.text for v in compile_path(path).resolve(Scope(message))]


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_segment_ends_cr_lf_and_crlf_read_the_same(end: str) -> None:
    message = parse((end.join(SEGMENTS) + end).encode())
    assert [s.name for s in message.segments] == ["MSH", "PID", "PV1", "ZPI"]
    assert _read(message, "PV1-3.2") == ["412"]
    assert message.text == "\r".join(SEGMENTS)


def test_blank_lines_between_segments_are_ignored() -> None:
    message = parse_text("\r\n".join(SEGMENTS[:2]) + "\r\n\r\n  \r\n" + SEGMENTS[2])
    assert [s.name for s in message.segments] == ["MSH", "PID", "PV1"]


def test_msh_numbering_counts_the_field_separator_as_msh_1() -> None:
    message = parse_text("\r".join(SEGMENTS))
    msh = message.segments[0]
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(9) == "ADT^A01^ADT_A01"
    assert msh.repetitions(2) == ["^~\\&"]  # the encoding characters are not split on ~
    assert message.header.message_type == "ADT^A01"


def test_repetitions_components_and_subcomponents() -> None:
    message = parse_text("\r".join(SEGMENTS))
    assert message.first("PID").repetitions(3) == ["100001^^^GENHOSP^MR", "123-45-6789^^^SSA^SS"]  # type: ignore[union-attr]
    assert _read(message, "PID-3[2].1") == ["123-45-6789"]
    assert _read(message, "PID-3[*].5") == ["MR", "SS"]
    assert _read(message, "PV1-7.9.2") == ["2.16.840.1.113883.4.6"]
    assert _read(message, "PV1-7.9.3") == ["ISO"]
    assert _read(message, "PV1-7.9.4") == [""]


def test_escapes_are_decoded_at_the_leaf_after_splitting() -> None:
    message = parse_text("\r".join(SEGMENTS))
    assert _read(message, "PID-5.1") == ["O&Brien"]  # \T\ is the subcomponent separator, not a split
    assert _read(message, "PID-5.2") == ["Mary^Ann"]  # \S\ is the component separator
    assert _read(message, "PID-11.1") == ["12 Oak St|Apt 4"]  # \F\ is the field separator
    assert _read(message, "ZPI-2") == ["a\\b"]  # \E\ is the escape character
    assert _read(message, "ZPI-3") == ["A~"]  # \X41\ is hex, \R\ the repetition separator
    # the raw value keeps the escapes, so a datatype mapping can still split it
    (value,) = compile_path("PID-5").resolve(Scope(message))
    assert value.raw == "O\\T\\Brien^Mary\\S\\Ann"


def test_other_encoding_characters_are_honoured() -> None:
    text = "MSH#*@!$#A#B\rPID#1##7*8@9*X$Y#"
    message = parse_text(text)
    assert _read(message, "PID-3[2].1") == ["9"]
    assert _read(message, "PID-3[2].2.2") == ["Y"]
    assert _read(message, "PID-3[1].2") == ["8"]


def test_empty_missing_and_null_fields() -> None:
    message = parse_text("\r".join(SEGMENTS))
    pid = message.first("PID")
    assert pid is not None
    assert pid.field(2) == "" and pid.repetitions(2) == []
    assert pid.field(99) == "" and pid.repetitions(99) == []
    assert _read(message, "PID-99.1") == []
    assert _read(message, "OBX-5") == []
    assert _read(message, "PV1-10") == ['""']  # the HL7 null is read as is; mappings treat it as empty
    assert _read(message, "PID-5.9") == [""]  # a component past the last one is empty, not an error


def test_bad_input_is_an_error_that_says_where() -> None:
    with pytest.raises(RejectError, match="does not start with an MSH"):
        parse(b"PID|1\r")
    with pytest.raises(ContentError, match="segment 2 has no valid segment id"):
        parse_text("MSH|^~\\&|A\rxx|1")
    with pytest.raises(ContentError, match="not valid utf-8") as info:
        parse(b"MSH|^~\\&|A|B||||||ADT^A01|1|P|2.5\rPID|1||\xff\xfe")
    assert info.value.location == "PID-3"


def test_known_separators_are_taken_only_when_the_decoded_msh_has_them() -> None:
    """parse_text reuses the separators read from the bytes when the decoded MSH starts with the
    same characters, and reads MSH again when it does not."""
    from hms_ach.core.hl7message import Separators

    text = "MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5.1\rPID|||1^^^H~2^^^H"
    same = parse_text(text, Separators())
    assert same.separators == Separators() and _read(same, "PID-3[2].1") == ["2"]
    other = parse_text(text.replace("^", "#").replace("#~", "#~", 1), Separators())
    assert other.separators.component == "#" and _read(other, "PID-3[2].1") == ["2"]
    with pytest.raises(RejectError):
        parse_text("MSH|^~", Separators())
