"""The HL7 v2 limits (hms_ach/hl7v2/limits.py) and the escape decoder they rely on."""

from __future__ import annotations

import time

import pytest

from hms_ach.core.errors import ContentError, RejectError
from hms_ach.hl7v2.limits import (
    Hl7Limits,
    Hl7LimitSettings,
    LimitedPolicy,
    check_header,
    check_message,
    check_structure,
    limits_of,
)
from hms_ach.hl7v2.parse import parse_text, read_header
from hms_ach.hl7v2.policy import Hl7Policy

MSH = "MSH|^~\\&|APP|FAC|HMSACH|FAC|20261126083000||ADT^A01|C1|P|2.5.1"


def _msg(*segments: str, msh: str = MSH) -> str:
    return "\r".join([msh, *segments]) + "\r"


def test_the_settings_give_the_channel_policy_its_limits() -> None:
    settings = Hl7LimitSettings(max_repetitions_per_field=5, on_reused_control_id="process")
    policy = settings.hl7_policy("adt_in")
    assert isinstance(policy, LimitedPolicy) and policy.on_reused_control_id == "process"
    assert limits_of(policy) == Hl7Limits(max_repetitions_per_field=5)
    assert limits_of(Hl7Policy("other")) == Hl7Limits()
    with pytest.raises(ValueError, match="max_segments_per_message"):
        Hl7LimitSettings(max_segments_per_message=0)


@pytest.mark.parametrize(
    ("msh", "location", "code"),
    [
        (MSH.replace("|C1|", "|" + "9" * 200 + "|"), "MSH-10", "104"),
        (MSH.replace("|APP|", "|" + "A" * 228 + "|"), "MSH-3", "104"),
        (MSH.replace("|FAC|HMSACH", "|F\x00C|HMSACH"), "MSH-4", "102"),
    ],
)
def test_key_fields_that_cannot_be_stored_are_rejected(msh: str, location: str, code: str) -> None:
    with pytest.raises(RejectError) as info:
        check_header(read_header(msh.encode("latin-1")))
    assert (info.value.location, info.value.code) == (location, code)
    assert "9999" not in str(info.value)  # the value itself is never echoed


def test_structure_caps_name_the_field_and_the_cap() -> None:
    limits = Hl7Limits(max_segments_per_message=4, max_repetitions_per_field=3)
    header = read_header(MSH.encode())
    check_structure(_msg("PID|1||a~b~c"), header, limits)
    with pytest.raises(RejectError, match="max_repetitions_per_field") as info:
        check_structure(_msg("PID|1||a~b~c~d"), header, limits)
    assert (info.value.location, info.value.code) == ("PID-3", "104")
    with pytest.raises(RejectError) as info:
        check_structure(_msg("NTE|1|a~b", "NTE|2|a~b~c~d"), header, limits)
    assert info.value.location == "NTE[2]-2"
    with pytest.raises(RejectError, match="max_segments_per_message"):
        check_structure(_msg("NTE|1", "NTE|2", "NTE|3", "NTE|4"), header, limits)


@pytest.mark.serial
def test_the_caps_are_linear_on_200000_repetitions() -> None:
    text = _msg("PID|1||" + "~".join(f"{i:09d}^^^H^MR" for i in range(200_000)))
    start = time.perf_counter()
    with pytest.raises(RejectError):
        check_structure(text, read_header(MSH.encode()), Hl7Limits())
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("segment", "location"),
    [
        ("PID|1||1^^^H||Ri\x00vera^Maria", "PID-5.1"),
        ("PID|1||1^^^H||Rivera^Ma\\X00\\ria", "PID-5.2"),
        ("PID|1||1^^^H~2^^^H\\X4100\\", "PID-3[2].4"),
        ("PID|1||1^^^H&x\\X00\\y", "PID-3.4.2"),
        ("NTE|1|a\x00", "NTE-2"),
    ],
)
def test_a_nul_is_refused_naming_the_component(segment: str, location: str) -> None:
    with pytest.raises(ContentError) as info:
        check_message(parse_text(_msg(segment)))
    assert (info.value.location, info.value.code) == (location, "102")


def test_escapes_that_decode_to_no_nul_pass() -> None:
    check_message(parse_text(_msg("PID|1||1^^^H||O\\T\\Brien\\X41\\^\\Xzz\\\\.br\\")))


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "a|b^c&d~e\\f"),
        ("\\X4142\\", "AB"),
        ("x\\Xzz\\y\\X0\\z\\X\\", "xyz"),  # malformed hex is dropped
        ("\\H\\bold\\N\\ \\Z12\\\\C2842\\\\M244241\\.", "bold ."),
        ("a\\.br\\b\\.sp2\\c\\.sp99999999\\", "a\rb\r\rc" + "\r" * 100),  # repeats are bounded
        ("a\\.spx\\b\\unterminated", "ab"),
    ],
)
def test_the_escape_decoder_never_raises_and_bounds_repeats(value: str, decoded: str) -> None:
    message = parse_text(_msg("NTE|1|" + value))
    (nte,) = message.all("NTE")
    assert nte.unescape(nte.field(2)) == decoded


def test_the_escape_decoder_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    (nte,) = parse_text(_msg("NTE|1|secret\\Xzz\\\\Q1\\")).all("NTE")
    nte.unescape(nte.field(2))
    assert not caplog.records


def test_a_control_character_is_no_separator() -> None:
    with pytest.raises(RejectError) as info:
        read_header(b"MSH\x00^~\\&\x00APP")
    assert info.value.location == "MSH-1"
    with pytest.raises(RejectError) as info:
        read_header(b"MSH|^~\x00&|APP")
    assert info.value.location == "MSH-2"
