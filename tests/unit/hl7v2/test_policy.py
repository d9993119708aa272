"""When an ACK is sent: HL7 table 0155 (AL, NE, ER, SU) for MSH-15 (the commit ACK) and MSH-16 (the
application ACK), and which codes of table 0008 a message gets in each mode."""

from __future__ import annotations

import pytest

from hms_ach.hl7v2.parse import MshHeader, read_header
from hms_ach.hl7v2.policy import (
    ack_condition_met,
    application_code,
    commit_code,
    should_send_application,
    should_send_commit,
)


def _header(accept: str = "", application: str = "") -> MshHeader:
    raw = f"MSH|^~\\&|S|F|R|F|20260101||ADT^A01^ADT_A01|C1|P|2.5.1|||{accept}|{application}\r"
    return read_header(raw.encode())


@pytest.mark.parametrize(
    ("condition", "on_success", "on_error"),
    [("AL", True, True), ("NE", False, False), ("ER", False, True), ("SU", True, False), ("", True, True)],
)
def test_table_0155_conditions(condition: str, on_success: bool, on_error: bool) -> None:
    assert ack_condition_met(condition, success=True) is on_success
    assert ack_condition_met(condition, success=False) is on_error
    assert ack_condition_met(f" {condition.lower()} ", success=True) is on_success  # as senders write it


def test_original_mode_one_ack_that_is_the_application_ack() -> None:
    header = read_header(b"MSH|^~\\&|S|F|R|F|20260101||ADT^A01|C1|P|2.5.1\r")
    for code in ("AA", "AE", "AR"):
        assert commit_code(header, code) == code
        assert application_code(header, code) is None
        assert should_send_commit(header, code)
        assert not should_send_application(header, code)
    assert commit_code(None, "AR") == "AR" and should_send_commit(None, "AR")  # unreadable MSH: an AR


def test_enhanced_mode_codes_commit_then_application() -> None:
    header = read_header(b"MSH|^~\\&|S|F|R|F|20260101||ADT^A01|C1|P|2.5.1|||AL|AL\r")
    # stored (processed, or with a content error found while processing): CA, then AA or AE
    assert (commit_code(header, "AA"), application_code(header, "AA")) == ("CA", "AA")
    assert (commit_code(header, "AE"), application_code(header, "AE")) == ("CA", "AE")
    # refused before processing: CR, and no application ACK
    assert (commit_code(header, "AR"), application_code(header, "AR")) == ("CR", None)


@pytest.mark.parametrize("accept", ["AL", "NE", "ER", "SU"])
@pytest.mark.parametrize("application", ["AL", "NE", "ER", "SU"])
def test_msh_15_decides_the_commit_ack_and_msh_16_the_application_ack(accept: str, application: str) -> None:
    header = _header(accept, application)
    assert should_send_commit(header, "CA") is (accept in ("AL", "SU"))
    assert should_send_commit(header, "CR") is (accept in ("AL", "ER"))
    assert should_send_commit(header, "CE") is (accept in ("AL", "ER"))
    assert should_send_application(header, "AA") is (application in ("AL", "SU"))
    assert should_send_application(header, "AE") is (application in ("AL", "ER"))
    assert not should_send_application(header, None)  # refused at commit: there is none


def test_one_field_empty_in_enhanced_mode() -> None:
    # MSH-15 empty: the commit ACK is sent (every MLLP sender waits for one)
    assert should_send_commit(_header("", "AL"), "CA") and should_send_commit(_header("", "AL"), "CR")
    # MSH-16 empty: no application ACK (nobody waits for it; it would pass for the next message's)
    assert not should_send_application(_header("AL", ""), "AA")
    assert not should_send_application(_header("AL", ""), "AE")
