"""MLLP framing, message splitting and normalisation, without sockets."""

from __future__ import annotations

import pytest

from hms_ach.core.errors import RejectError
from hms_ach.hl7v2.client import normalise_message, split_messages
from hms_ach.hl7v2.mllp import (
    CR,
    FS,
    VT,
    Frame,
    FrameEvent,
    Garbage,
    MllpFramer,
    OversizeFrame,
    TruncatedFrame,
    frame,
)

MSG_A = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ADT^A01|A1|P|2.5.1\rPID|1||123\r"
MSG_B = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120001||ADT^A08|B2|P|2.5.1\rPID|1||456\r"


def feed_all(framer: MllpFramer, chunks: list[bytes]) -> list[FrameEvent]:
    events: list[FrameEvent] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    return events


def test_frame_split_at_every_possible_boundary() -> None:
    stream = frame(MSG_A) + frame(MSG_B)
    for cut in range(1, len(stream)):
        framer = MllpFramer(1024)
        events = feed_all(framer, [stream[:cut], stream[cut:]])
        assert events == [Frame(MSG_A), Frame(MSG_B)], cut
        assert not framer.in_frame


def test_one_byte_at_a_time() -> None:
    stream = frame(MSG_A) + frame(MSG_B)
    framer = MllpFramer(1024)
    events = feed_all(framer, [stream[i : i + 1] for i in range(len(stream))])
    assert events == [Frame(MSG_A), Frame(MSG_B)]


def test_several_frames_in_one_chunk() -> None:
    framer = MllpFramer(1024)
    assert framer.feed(frame(MSG_A) + frame(MSG_B) + frame(MSG_A)) == [
        Frame(MSG_A),
        Frame(MSG_B),
        Frame(MSG_A),
    ]


def test_stray_whitespace_between_frames_is_ignored() -> None:
    framer = MllpFramer(1024)
    stream = b"\r\n  \t" + frame(MSG_A) + b"\n\r\n" + frame(MSG_B) + b"\r\n"
    assert framer.feed(stream) == [Frame(MSG_A), Frame(MSG_B)]


def test_garbage_before_vt_is_discarded_and_reported() -> None:
    framer = MllpFramer(1024)
    events = framer.feed(b"hello\r\n" + frame(MSG_A) + b"xx" + frame(MSG_B))
    assert events == [Garbage(5), Frame(MSG_A), Garbage(2), Frame(MSG_B)]


def test_fs_without_cr_ends_the_frame() -> None:
    framer = MllpFramer(1024)
    assert framer.feed(VT + MSG_A + FS + VT + MSG_B + FS) == [Frame(MSG_A), Frame(MSG_B)]
    # the frame is complete as soon as FS arrives; a late CR is just a between-frames byte
    framer = MllpFramer(1024)
    assert framer.feed(VT + MSG_A + FS) == [Frame(MSG_A)]
    assert framer.feed(CR) == []
    assert framer.feed(VT + MSG_B + FS + b"junk" + VT + MSG_A + FS + CR) == [
        Frame(MSG_B),
        Garbage(4),
        Frame(MSG_A),
    ]


def test_vt_inside_a_frame_restarts_it() -> None:
    framer = MllpFramer(1024)
    assert framer.feed(VT + b"MSH|partial" + frame(MSG_A)) == [TruncatedFrame(11), Frame(MSG_A)]


def test_truncated_frame_at_eof() -> None:
    framer = MllpFramer(1024)
    assert framer.feed(frame(MSG_A) + VT + MSG_B[:20]) == [Frame(MSG_A)]
    assert framer.in_frame
    assert framer.finish() == [TruncatedFrame(20)]
    assert not framer.in_frame
    assert framer.finish() == []


def test_empty_frame_is_passed_on() -> None:
    assert MllpFramer(10).feed(VT + FS + CR) == [Frame(b"")]


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    framer = MllpFramer(len(MSG_A))
    assert framer.feed(frame(MSG_A)) == [Frame(MSG_A)]
    framer = MllpFramer(len(MSG_A) - 1)
    events = framer.feed(frame(MSG_A))
    assert events == [OversizeFrame(MSG_A[: len(MSG_A) - 1], len(MSG_A))]


def test_oversize_frame_is_discarded_with_bounded_memory() -> None:
    limit, chunk_size, total = 64 * 1024, 8 * 1024, 5 * 1024 * 1024
    body = MSG_A + b"OBX|1|TX|||" + b"x" * (total - len(MSG_A) - 12) + b"\r"
    stream = frame(body) + b"\r\n" + frame(MSG_B)
    framer = MllpFramer(limit)
    events: list[FrameEvent] = []
    for i in range(0, len(stream), chunk_size):
        events.extend(framer.feed(stream[i : i + chunk_size]))
        assert framer.buffered_bytes <= limit + chunk_size
        assert framer.buffered_bytes <= limit
    assert len(events) == 2
    oversize, after = events
    assert isinstance(oversize, OversizeFrame)
    assert oversize.size == len(body)
    assert len(oversize.prefix) == 4096
    assert oversize.prefix.startswith(MSG_A)
    assert after == Frame(MSG_B)


def test_oversize_prefix_is_capped_by_a_small_limit() -> None:
    framer = MllpFramer(10)
    assert framer.feed(frame(MSG_A)) == [OversizeFrame(MSG_A[:10], len(MSG_A))]


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        MllpFramer(0)


# -- splitting files into messages ------------------------------------------------------------


def test_normalise_message_line_ends_and_blank_lines() -> None:
    lf = MSG_A.replace(b"\r", b"\n") + b"\n\n  \n"
    crlf = MSG_A.replace(b"\r", b"\r\n") + b"\r\n"
    assert normalise_message(lf) == MSG_A
    assert normalise_message(crlf) == MSG_A
    assert normalise_message(MSG_A.rstrip(b"\r")) == MSG_A
    assert normalise_message(frame(MSG_A)) == MSG_A


def test_split_messages_on_msh() -> None:
    data = b"\xef\xbb\xbf" + MSG_A.replace(b"\r", b"\n") + b"\n" + MSG_B.replace(b"\r", b"\r\n")
    assert split_messages(data) == [MSG_A, MSG_B]


def test_split_messages_skips_batch_envelope() -> None:
    data = b"\n".join(
        [
            b"FHS|^~\\&|LAB",
            b"BHS|^~\\&|LAB",
            MSG_A.rstrip(b"\r"),
            MSG_B.rstrip(b"\r"),
            b"BTS|2",
            b"FTS|1",
            b"",
        ]
    )
    assert split_messages(data) == [MSG_A, MSG_B]


def test_split_messages_rejects_segments_before_msh() -> None:
    with pytest.raises(RejectError) as info:
        split_messages(b"PID|1||123\n" + MSG_A)
    assert info.value.location == "segment 1"


def test_split_messages_of_an_empty_file() -> None:
    assert split_messages(b"\n\r\n") == []
