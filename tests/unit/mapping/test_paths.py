"""HL7 path grammar (1-based, as in the standard) and resolution against a parsed message."""

from __future__ import annotations

import pytest

from hms_ach.hl7v2.parse import Hl7Message, parse_text
from hms_ach.mapping.paths import (
    MessagePath,
    PathSyntaxError,
    Scope,
    TypePath,
    compile_path,
    primitive_source,
)

MESSAGE = "\r".join(
    [
        "MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126083000-0500||ADT^A01^ADT_A01|C1|P|2.5.1",
        "PID|1||100001^^^GENHOSP^MR~123-45-6789^^^SSA^SS||Rivera^Maria^Elena||19750314|F",
        "NK1|1|Rivera^Daniel|SPO",
        "NK1|2|Rivera^Ana|DAU",
        "PV1|1|I|4W^412^A^GENHOSP||||1234567893^Chen^Lisa^^^Dr^^^NPI&2.16.840.1.113883.4.6&ISO^L",
        "ZPI|1|VIP\\T\\Gold",
        "MFE|MAD|1",
        "STF|S1",
        "MFE|MUP|2",
        "STF|S2",
    ]
)


@pytest.fixture(scope="module")
def message() -> Hl7Message:
    return parse_text(MESSAGE)


def _texts(path: str, message: Hl7Message, scope: Scope | None = None) -> list[str]:
    return [v.text for v in compile_path(path).resolve(scope or Scope(message))]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("PID-5", ["Rivera^Maria^Elena"]),
        ("PID-5.1", ["Rivera"]),
        ("PID-5.2", ["Maria"]),
        ("PID-3[2].1", ["123-45-6789"]),
        ("PID-3[*].1", ["100001", "123-45-6789"]),
        ("PID-3[CX.5=SS].1", ["123-45-6789"]),
        ("PID-3[CX.5=XX].1", []),
        ("PID-3.1", ["100001"]),
        ("PV1-7.9.1", ["NPI"]),
        ("PV1-7.9.2", ["2.16.840.1.113883.4.6"]),
        ("NK1[2]-2.2", ["Ana"]),
        ("NK1[*]-3", ["SPO", "DAU"]),
        ("NK1-3", ["SPO"]),
        ("ZPI-2", ["VIP&Gold"]),
        ("PID-99", []),
        ("OBX-5", []),
    ],
)
def test_message_paths_resolve(message: Hl7Message, path: str, expected: list[str]) -> None:
    assert _texts(path, message) == expected


def test_locations_name_the_repetition(message: Hl7Message) -> None:
    values = compile_path("PID-3[CX.5=SS].1").resolve(Scope(message))
    assert [v.location for v in values] == ["PID-3[2].1"]
    values = compile_path("NK1[2]-2").resolve(Scope(message))
    assert [v.location for v in values] == ["NK1[2]-2"]


def test_escapes_are_decoded_but_raw_is_kept(message: Hl7Message) -> None:
    (value,) = compile_path("ZPI-2").resolve(Scope(message))
    assert value.text == "VIP&Gold"
    assert value.raw == "VIP\\T\\Gold"


def test_datatype_paths_read_the_current_value(message: Hl7Message) -> None:
    (xcn,) = compile_path("PV1-7").resolve(Scope(message))
    scope = Scope(message).with_value(xcn)
    path = compile_path("XCN.2", "XCN")
    assert isinstance(path, TypePath)
    assert [v.text for v in path.resolve(scope)] == ["Chen"]
    assert [v.location for v in path.resolve(scope)] == ["PV1-7.2"]
    assert [v.text for v in compile_path("XCN.9.1", "XCN").resolve(scope)] == ["NPI"]


def test_segment_loop_reads_other_segments_from_its_group(message: Hl7Message) -> None:
    mfe = compile_path("MFE[*]").resolve(Scope(message))
    assert [v.location for v in mfe] == ["MFE", "MFE[2]"]
    second = Scope(message).with_segment(mfe[1].segment, mfe[1].location)  # type: ignore[arg-type]
    assert _texts("MFE-1", message, second) == ["MUP"]
    assert _texts("STF-1", message, second) == ["S2"]
    assert _texts("PID-3.1", message, second) == ["100001"]  # outside any group: the message


def test_segment_paths() -> None:
    path = compile_path("NK1")
    assert isinstance(path, MessagePath) and path.is_segment
    assert not compile_path("NK1-2").is_segment  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "message_part"),
    [
        ("PID.5.1", "did you mean 'PID-5.1'?"),
        ("PID-0", "positions start at 1"),
        ("PID-5.0", "positions start at 1"),
        ("PID-3[0].1", "repetitions start at 1"),
        ("NK1[0]-2", "segment repetitions start at 1"),
        ("pid-5", "is not an HL7 path"),
        ("PID-5..1", "is not an HL7 path"),
        ("", "is not an HL7 path"),
        ("XCN.1", "has no datatype context"),
    ],
)
def test_bad_paths_say_what_was_expected(path: str, message_part: str) -> None:
    with pytest.raises(PathSyntaxError) as info:
        compile_path(path)
    assert message_part in str(info.value)


def test_datatype_path_in_another_datatype_context() -> None:
    with pytest.raises(PathSyntaxError) as info:
        compile_path("XPN.1", "XCN")
    assert "this mapping's context is XCN" in str(info.value)


def test_any_datatype_name_inside_nested_rules() -> None:
    assert isinstance(compile_path("PLN.4", "*"), TypePath)
    assert isinstance(compile_path("ST", "*"), TypePath)


@pytest.mark.parametrize(
    ("text", "comp", "sub"),
    [
        ("PID-7", 1, None),  # TS -> TS.1 (DTM)
        ("FT1-11", 1, 1),  # CP -> CP.1 (MO) -> MO.1 (NM)
        ("FT1-11.1", 1, 1),  # MO -> MO.1
        ("FT1-4", 1, 1),  # DR -> DR.1 (TS) -> TS.1
        ("PV1-19.1", 1, None),  # already a primitive (ST)
        ("PV1-2", None, None),  # IS: a primitive field
        ("ZPI-1", None, None),  # a Z-segment: datatype unknown, read as written
        ("MFE-4", None, None),  # varies: read as written
    ],
)
def test_primitive_source_reads_the_datatypes_first_component(
    text: str, comp: int | None, sub: int | None
) -> None:
    path = primitive_source(compile_path(text, "*"))
    assert isinstance(path, MessagePath)
    assert (path.comp, path.sub) == (comp, sub)


def test_primitive_source_of_a_datatype_path_and_its_location() -> None:
    path = primitive_source(compile_path("CX.4", "*"))
    assert isinstance(path, TypePath) and (path.comp, path.sub) == (4, 1)
    msg = parse_text("MSH|^~\\&|A|B|C|D|20260101||ADT^A04|1|P|2.3\rPID|1||1^^^H^MR||Doe^J||19750314^D")
    (value,) = primitive_source(compile_path("PID-7", "*")).resolve(Scope(msg))
    assert (value.text, value.location) == ("19750314", "PID-7")
