"""The client side of ``hms-ach send``: splitting files into messages, and which ACKs a message asks for."""

from __future__ import annotations

import pytest

from hms_ach.core.errors import RejectError
from hms_ach.hl7v2.client import _still_expected, ack_types, expects_ack, normalise_message, split_messages


def _message(accept: str = "", application: str = "", control: str = "C1") -> bytes:
    return f"MSH|^~\\&|S|F|R|F|20260101||ADT^A01|{control}|P|2.5.1|||{accept}|{application}\rPID|1\r".encode()


def _ack(code: str) -> bytes:
    return f"MSH|^~\\&|R|F|S|F|20260101||ACK^A01^ACK|K1|P|2.5.1\rMSA|{code}|C1\r".encode()


def test_split_messages_at_each_msh_dropping_batch_lines() -> None:
    data = (
        b"FHS|^~\\&\r\nBHS|^~\\&\r\n"
        + _message(control="A")
        + b"\n"
        + _message(control="B")
        + b"BTS|2\rFTS|1\r"
    )
    assert [m.split(b"|")[9] for m in split_messages(data)] == [b"A", b"B"]
    assert normalise_message(b"\x0bMSH|^~\\&\nPID|1\r\n\r\n\x1c\r") == b"MSH|^~\\&\rPID|1\r"
    with pytest.raises(RejectError, match="before the first MSH"):
        split_messages(b"PID|1\r" + _message())


def test_ack_types_reads_msh_15_and_16() -> None:
    assert ack_types(_message()) is None  # original mode
    assert ack_types(_message("al", " ER ")) == ("AL", "ER")
    assert ack_types(_message("NE")) == ("NE", "")
    assert ack_types(b"not hl7") is None
    assert not expects_ack(_message("NE", "AL")) and expects_ack(_message()) and expects_ack(_message("SU"))


REQUIRED, POSSIBLE, DONE = "required", "possible", "done"


@pytest.mark.parametrize(
    ("types", "first"),
    [
        (("AL", "NE"), REQUIRED),  # the commit ACK always comes
        (("AL", "AL"), REQUIRED),
        (("NE", "NE"), DONE),  # nothing is waited for
        (("NE", "AL"), REQUIRED),  # the application ACK always comes
        (("NE", "ER"), POSSIBLE),  # only on error
        (("ER", "AL"), REQUIRED),  # CR, or else the application ACK
        (("ER", "NE"), POSSIBLE),
        (("SU", "SU"), POSSIBLE),
        (("", "AL"), REQUIRED),  # an empty MSH-15 counts as AL
    ],
)
def test_what_is_waited_for_before_any_ack(types: tuple[str, str], first: str) -> None:
    assert _still_expected(types, None, None) == first


def test_what_is_waited_for_after_the_commit_ack() -> None:
    assert _still_expected(("AL", "AL"), _ack("CA"), None) == REQUIRED
    assert _still_expected(("AL", "ER"), _ack("CA"), None) == POSSIBLE  # AE comes only on error
    assert _still_expected(("AL", "NE"), _ack("CA"), None) == DONE
    assert _still_expected(("AL", "AL"), _ack("CR"), None) == DONE  # refused: no application ACK
    assert _still_expected(("AL", "AL"), _ack("CE"), None) == DONE  # not stored: send it again
    assert _still_expected(("ER", "SU"), None, _ack("AA")) == DONE
    assert _still_expected(("AL", "AL"), _ack("CA"), _ack("AE")) == DONE
