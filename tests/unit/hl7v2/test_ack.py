"""ACK messages: original mode, and the commit and application ACKs of enhanced mode."""

from __future__ import annotations

import pytest

from hms_ach.core.errors import ContentError, Err0357, RejectError
from hms_ach.hl7v2.ack import MasterFile, acknowledge, build_ack, master_file, msa_code, split_acks
from hms_ach.hl7v2.parse import MshHeader, parse_text, read_header

ERROR = ContentError(
    "PID-8 value Q is not in table administrative_sex", "PID[1]-8", Err0357.TABLE_VALUE_NOT_FOUND
)
REFUSAL = RejectError("version 9.9 is not accepted", "MSH-12", Err0357.UNSUPPORTED_VERSION)


def _header(accept: str = "", application: str = "") -> MshHeader:
    tail = f"|||{accept}|{application}" if accept or application else ""
    raw = f"MSH|^~\\&|LAB|HOSP|HMSACH|HOSP|20260101||ADT^A03^ADT_A03|MSG-7|P|2.5.1{tail}\r"
    return read_header(raw.encode())


def _segments(ack: str) -> dict[str, list[str]]:
    return {s[:3]: s.split("|") for s in ack.split("\r") if s}


def test_original_mode_one_ack_with_the_outcome_and_the_err() -> None:
    for code, error in (("AA", None), ("AE", ERROR), ("AR", REFUSAL)):
        acks = acknowledge(_header(), code, error)
        assert (acks.ack_code, acks.send, acks.app_ack, acks.app_send) == (code, True, None, False)
        segs = _segments(acks.ack)
        assert segs["MSA"][1:3] == [code, "MSG-7"]
        assert ("ERR" in segs) is (error is not None)
        assert acks.result_code == code and acks.text == acks.ack


def test_enhanced_mode_success_ca_then_aa() -> None:
    acks = acknowledge(_header("AL", "AL"), "AA")
    commit, app = _segments(acks.ack), _segments(acks.app_ack or "")
    assert commit["MSA"][1:3] == ["CA", "MSG-7"] and "ERR" not in commit
    assert app["MSA"][1:3] == ["AA", "MSG-7"] and "ERR" not in app
    # the application ACK is a message of its own, which asks for no ACK back
    assert app["MSH"][8] == "ACK^A03^ACK" and app["MSH"][9] != commit["MSH"][9]
    assert app["MSH"][14:16] == ["NE", "NE"]
    assert app["MSH"][2:6] == ["HMSACH", "HOSP", "LAB", "HOSP"]  # from the receiver to the sender
    assert (acks.send, acks.app_send, acks.result_code) == (True, True, "AA")


def test_enhanced_mode_content_error_is_committed_ca_and_reported_ae_with_err() -> None:
    acks = acknowledge(_header("AL", "AL"), "AE", ERROR)
    commit, app = _segments(acks.ack), _segments(acks.app_ack or "")
    assert commit["MSA"][1] == "CA" and "ERR" not in commit
    assert app["MSA"][1:3] == ["AE", "MSG-7"]
    assert app["ERR"][2] == "PID^1^8^1" and app["ERR"][3].startswith("103^")
    assert acks.result_code == "AE"


def test_enhanced_mode_refusal_is_cr_with_err_and_no_application_ack() -> None:
    acks = acknowledge(_header("AL", "AL"), "AR", REFUSAL)
    commit = _segments(acks.ack)
    assert commit["MSA"][1:3] == ["CR", "MSG-7"] and commit["ERR"][3].startswith("203^")
    assert (acks.app_ack, acks.app_code, acks.app_send, acks.result_code) == (None, None, False, "CR")


@pytest.mark.parametrize(("accept", "application"), [("NE", "NE"), ("ER", "ER"), ("SU", "SU"), ("NE", "AL")])
def test_both_acks_are_built_whatever_is_sent(accept: str, application: str) -> None:
    """A resend is answered from what was stored, so both ACKs are stored even when not sent."""
    acks = acknowledge(_header(accept, application), "AA")
    assert acks.app_ack is not None and split_acks(acks.text) == [acks.ack, acks.app_ack]
    assert acks.send is (accept == "SU") and acks.app_send is (application in ("SU", "AL"))


def test_split_acks_and_msa_code() -> None:
    acks = acknowledge(_header("AL", "ER"), "AE", ERROR)
    assert [msa_code(a) for a in split_acks(acks.text)] == ["CA", "AE"]
    assert split_acks("") == [] and msa_code("MSH|^~\\&\r") == ""
    one = build_ack(_header(), "AA")
    assert split_acks(one) == [one]


def test_build_ack_in_enhanced_mode_is_the_commit_code() -> None:
    # AE -> CE: the answer of a store that could not commit (send again); no application ACK follows
    assert msa_code(build_ack(_header("AL", "AL"), "AE", ERROR)) == "CE"
    assert msa_code(build_ack(_header("AL", "AL"), "AA")) == "CA"


MFN = "\r".join(
    [
        "MSH|^~\\&|HR|HOSP|HMSACH|HOSP|20260101||MFN^M02^MFN_M02|MFN-9|P|2.5.1{tail}",
        "MFI|PRA^Practitioner master file^HL70175||UPD|||{level}",
        "MFE|MAD|MFN-0001|20260101|1356702989^^NPI|CE",
        "STF|1356702989^^NPI",
        "MFE|MUP|MFN-0002|20260101|1234567893^^NPI|CE",
        "STF|1234567893^^NPI",
    ]
)


def _mfn(level: str, tail: str = "") -> tuple[MshHeader, MasterFile | None]:
    message = parse_text(MFN.format(level=level, tail=tail))
    return message.header, master_file(message)


def test_mfn_with_mfi6_al_is_answered_mfk_with_one_mfa_per_mfe() -> None:
    header, request = _mfn("AL")
    assert request is not None
    acks = acknowledge(header, "AA", None, request)
    lines = [s.split("|") for s in acks.ack.split("\r") if s]
    assert [f[0] for f in lines] == ["MSH", "MSA", "MFI", "MFA", "MFA"]
    assert lines[0][8] == "MFK^M02^MFK_M01"
    assert lines[1][1:3] == ["AA", "MFN-9"]
    assert lines[2][1] == "PRA^Practitioner master file^HL70175" and lines[2][6] == "AL"
    first, second = lines[3], lines[4]
    assert (first[1], first[2], first[4].split("^")[0], first[5], first[6]) == (
        "MAD",
        "MFN-0001",
        "S",
        "1356702989^^NPI",
        "CE",
    )
    assert first[3]  # MFA-3 completion time
    assert (second[2], second[4].split("^")[0]) == ("MFN-0002", "S")
    # hl7apy reads it as a valid MFK_M01 (structure and required fields)
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    parsed = parse_message(acks.ack, validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.name == "MFK_M01" or parsed.msh.msh_9.to_er7() == "MFK^M02^MFK_M01"


def test_a_refused_mfn_says_u_for_every_entry_and_carries_the_err() -> None:
    header, request = _mfn("AL")
    assert request is not None
    acks = acknowledge(header, "AE", ERROR, request)
    segments = [s.split("|") for s in acks.ack.split("\r") if s]
    assert [f[0] for f in segments] == ["MSH", "MSA", "ERR", "MFI", "MFA", "MFA"]
    assert {f[4].split("^")[0] for f in segments if f[0] == "MFA"} == {"U"}
    assert all(f[3] == "" for f in segments if f[0] == "MFA")


def test_mfi6_er_lists_only_the_entries_not_posted() -> None:
    header, request = _mfn("ER")
    assert request is not None
    ok = acknowledge(header, "AA", None, request)
    assert [s[:3] for s in ok.ack.split("\r") if s] == ["MSH", "MSA", "MFI"]
    failed = acknowledge(header, "AE", ERROR, request)
    assert [s[:3] for s in failed.ack.split("\r") if s].count("MFA") == 2


def test_mfi6_ne_or_an_adt_gets_the_plain_ack() -> None:
    assert _mfn("NE")[1] is None
    assert master_file(parse_text("MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5.1\rMFI|X||UPD|||AL")) is None


def test_enhanced_mode_mfn_gets_ca_then_the_mfk_as_application_ack() -> None:
    header, request = _mfn("AL", "|||AL|AL")
    acks = acknowledge(header, "AA", None, request)
    assert acks.ack_code == "CA" and "MFA" not in acks.ack
    assert acks.app_ack is not None and acks.app_code == "AA"
    assert acks.app_ack.split("\r")[0].split("|")[8] == "MFK^M02^MFK_M01"
    assert acks.app_ack.count("\rMFA|") == 2


def test_warnings_are_err_segments_of_severity_w_on_an_aa() -> None:
    warning = ContentError("PV1-19 visit number is empty", "PV1-19", Err0357.REQUIRED_FIELD_MISSING)
    acks = acknowledge(_header(), "AA", None, None, [warning])
    segments = _segments(acks.ack)
    assert acks.ack_code == "AA" and segments["ERR"][4] == "W" and segments["ERR"][2] == "PV1^1^19^1"
    enhanced = acknowledge(_header("AL", "AL"), "AA", None, None, [warning])
    assert "ERR" not in enhanced.ack and enhanced.app_ack is not None and "|W|" in enhanced.app_ack
