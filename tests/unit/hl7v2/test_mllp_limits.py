"""The MLLP listener's limits without sockets: the frame clocks, the buffer budget, admission."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from hms_ach.hl7v2.mllp import MllpConfig, MllpFramer, frame
from hms_ach.hl7v2.mllp_limits import (
    FRAME_TIMEOUT,
    FRAME_TOO_SLOW,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    PER_SOURCE_LIMIT,
    BufferBudget,
    FrameClock,
    SourceStrikes,
    admit,
)


def clock(now: float = 0.0, min_rate: float = 100.0) -> FrameClock:
    return FrameClock(
        idle_timeout_seconds=30,
        frame_timeout_seconds=10,
        min_bytes_per_second=min_rate,
        rate_window_seconds=2,
        now=now,
    )


# FrameClock -----------------------------------------------------------------------------------


def test_idle_clock_is_not_reset_by_bytes_between_frames() -> None:
    c = clock()
    assert c.deadline() == 30
    for t in range(1, 30):  # one CR a second, outside any frame
        c.received(float(t), 1, in_frame=False, completed=False)
        assert c.expired(float(t)) is None
    assert c.deadline() == 30
    assert c.expired(30.0) == IDLE_TIMEOUT


def test_idle_clock_restarts_when_a_frame_is_answered() -> None:
    c = clock()
    c.received(5.0, 300, in_frame=False, completed=True)
    c.answered(5.5)
    assert c.deadline() == 35.5
    assert c.expired(35.0) is None and c.expired(35.5) == IDLE_TIMEOUT


def test_frame_must_end_within_the_frame_timeout_however_steadily_it_arrives() -> None:
    c = clock(min_rate=0)
    c.received(1.0, 10, in_frame=True, completed=False)  # VT arrives at t=1
    assert c.deadline() == 11.0
    for t in range(2, 11):
        c.received(float(t), 1_000_000, in_frame=True, completed=False)
        assert c.expired(float(t)) is None
    assert c.expired(11.0) == FRAME_TIMEOUT


def test_a_vt_inside_a_frame_does_not_restart_the_frame_clock() -> None:
    c = clock(min_rate=0)
    c.received(1.0, 10, in_frame=True, completed=False)
    c.received(5.0, 10, in_frame=True, completed=False)  # VT + bytes: a truncated frame restarted
    assert c.deadline() == 11.0


def test_a_frame_completed_and_a_new_one_started_in_one_chunk_restarts_the_frame_clock() -> None:
    c = clock(min_rate=0)
    c.received(1.0, 10, in_frame=True, completed=False)
    c.received(4.0, 10, in_frame=True, completed=True)
    assert c.deadline() == 14.0


def test_slow_frame_is_closed_at_the_end_of_a_window() -> None:
    c = clock(min_rate=100)
    c.received(0.0, 1, in_frame=True, completed=False)
    assert c.deadline() == 2.0
    c.received(1.0, 150, in_frame=True, completed=False)
    assert c.expired(2.0) == FRAME_TOO_SLOW  # 150 bytes in 2 s < 100 B/s


def test_fast_enough_window_rolls_over_to_the_next() -> None:
    c = clock(min_rate=100)
    c.received(0.0, 1, in_frame=True, completed=False)
    c.received(1.0, 250, in_frame=True, completed=False)
    assert c.expired(2.0) is None
    assert c.deadline() == 4.0  # the next window
    assert c.expired(4.0) == FRAME_TOO_SLOW  # nothing in it


def test_answering_restarts_the_rate_window_of_a_pipelined_frame() -> None:
    c = clock(min_rate=100)
    c.received(0.0, 500, in_frame=True, completed=True)  # frame 1 done, frame 2 begun
    c.answered(3.0)  # the handler took 3 s, frame 2 was not read meanwhile
    assert c.expired(3.0) is None
    assert c.deadline() == 5.0


def test_a_frame_held_back_for_buffer_room_is_not_judged_slow() -> None:
    c = clock(min_rate=100)
    c.received(0.0, 1, in_frame=True, completed=False)
    c.resumed(5.0)  # the listener did not read it from 0 to 5 s
    assert c.expired(5.0) is None and c.deadline() == 7.0
    assert c.expired(10.0) == FRAME_TIMEOUT  # the frame clock kept running


def test_rate_check_off() -> None:
    c = clock(min_rate=0)
    c.received(0.0, 1, in_frame=True, completed=False)
    assert c.deadline() == 10.0
    assert c.expired(9.9) is None


# BufferBudget ---------------------------------------------------------------------------------


def test_budget_claims_fit_without_eviction() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    assert budget.claim("a", 400) == []
    assert budget.claim("b", 600) == []
    assert budget.used_bytes == 1000


def test_budget_evicts_the_largest_unfinished_frame_first() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    budget.claim("big", 700)
    budget.claim("small", 200)
    assert budget.claim("new", 300) == ["big"]
    assert budget.used_bytes == 500 and budget.held_by("big") == 0


def test_budget_names_the_claimant_when_it_holds_the_most() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    budget.claim("other", 300)
    assert budget.claim("greedy", 800) == ["greedy"]
    assert budget.used_bytes == 300


def test_pinned_bytes_are_never_evicted_but_count() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    budget.claim("busy", 900)
    budget.hold("busy", 0, 900)  # its frame is complete and being handled
    assert budget.claim("new", 200) == ["new"]  # nothing evictable frees enough
    budget.release("busy")
    assert budget.used_bytes == 0
    assert budget.claim("new", 200) == []


def test_budget_largest_and_drop() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    assert budget.largest() is None
    budget.claim("a", 300)
    budget.claim("b", 500)
    budget.hold("c", 0, 100)  # pinned only: not a candidate
    assert budget.largest() == "b"
    budget.drop("b")
    assert budget.used_bytes == 400 and budget.largest() == "a"


async def test_wait_for_room_returns_when_enough_is_released() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    budget.claim("a", 900)
    waiting = asyncio.ensure_future(budget.wait_for_room(300))
    await asyncio.sleep(0)
    budget.hold("a", 800, 0)  # 100 freed: not enough, the waiter sleeps on
    await asyncio.sleep(0)
    assert not waiting.done()
    budget.release("a")
    await asyncio.wait_for(waiting, 1)


def test_budget_limit_is_the_smallest_registered() -> None:
    budget: BufferBudget[str] = BufferBudget(1000)
    a, b = object(), object()
    budget.register(a, 500)
    budget.register(b, 800)
    assert budget.limit_bytes == 500
    budget.unregister(a)
    assert budget.limit_bytes == 800
    budget.unregister(b)
    assert budget.limit_bytes == 1000


def test_framer_claim_bound_and_abandon() -> None:
    framer = MllpFramer(1000)
    assert framer.buffered_after(64) == 64  # outside a frame: a chunk may open one
    framer.feed(b"\x0bMSH|" + b"x" * 95)
    assert framer.buffered_bytes == 99 and framer.buffered_after(64) == 163
    framer.abandon()
    assert framer.buffered_bytes == 0 and framer.buffered_after(64) == 0
    assert framer.feed(frame(b"MSH|late")) == [] and framer.finish() == []


# admit ----------------------------------------------------------------------------------------


@dataclass
class FakeSlot:
    source: str
    idle_since: float
    evictable: bool = True
    frames_seen: int = 1
    open_frame_since: float | None = None


def test_admitted_under_both_caps() -> None:
    decision = admit([FakeSlot("a", 0)], "b", max_connections=3, max_connections_per_source=2, now=10.0)
    assert decision.admitted and decision.evict is None


def test_per_source_cap_evicts_that_sources_longest_idle() -> None:
    slots = [FakeSlot("a", 5), FakeSlot("a", 1), FakeSlot("b", 0)]
    decision = admit(slots, "a", max_connections=10, max_connections_per_source=2, now=10.0)
    assert decision.admitted and decision.evict is slots[1] and decision.limit == PER_SOURCE_LIMIT


def test_per_source_cap_refuses_when_none_of_its_connections_is_idle() -> None:
    slots = [FakeSlot("a", 5, evictable=False), FakeSlot("a", 1, evictable=False), FakeSlot("b", 0)]
    decision = admit(slots, "a", max_connections=10, max_connections_per_source=2, now=10.0)
    assert not decision.admitted and decision.evict is None and decision.limit == PER_SOURCE_LIMIT


def test_total_cap_prefers_connections_that_never_sent_a_frame() -> None:
    slots = [FakeSlot("legit", 0, frames_seen=3), FakeSlot("x", 8, frames_seen=0)]
    decision = admit(slots, "new", max_connections=2, max_connections_per_source=5, now=10.0)
    assert decision.admitted and decision.evict is slots[1] and decision.limit == MAX_CONNECTIONS


def test_total_cap_then_prefers_the_most_crowded_source_then_the_longest_idle() -> None:
    slots = [FakeSlot("legit", 0), FakeSlot("crowd", 5), FakeSlot("crowd", 3), FakeSlot("other", 1)]
    decision = admit(slots, "new", max_connections=4, max_connections_per_source=5, now=10.0)
    assert decision.evict is slots[2]


def test_total_cap_refuses_when_every_connection_is_busy_or_inside_a_frame() -> None:
    slots = [FakeSlot("a", 0, evictable=False), FakeSlot("b", 0, evictable=False)]
    decision = admit(slots, "c", max_connections=2, max_connections_per_source=5, now=10.0)
    assert not decision.admitted and decision.limit == MAX_CONNECTIONS


# MllpConfig -----------------------------------------------------------------------------------


def test_config_refuses_a_budget_smaller_than_one_message() -> None:
    with pytest.raises(ValueError, match="process_buffer_budget_bytes"):
        MllpConfig(max_message_bytes=2048, process_buffer_budget_bytes=2048)
    MllpConfig(max_message_bytes=1536, process_buffer_budget_bytes=2048)  # three quarters is enough


def test_every_limit_setting_is_described() -> None:
    for name in (
        "frame_timeout_seconds",
        "min_bytes_per_second",
        "rate_window_seconds",
        "ack_send_timeout_seconds",
        "max_connections_per_source",
        "process_buffer_budget_bytes",
    ):
        field = MllpConfig.model_fields[name]
        assert field.description and field.default is not None, name


def test_total_cap_with_none_idle_evicts_the_oldest_stale_frame() -> None:
    slots = [
        FakeSlot("legit", 0, evictable=False, open_frame_since=9.9),  # a message arriving now
        FakeSlot("slow", 0, evictable=False, open_frame_since=4.0),
        FakeSlot("slower", 0, evictable=False, open_frame_since=2.0),
        FakeSlot("busy", 0, evictable=False),  # being answered
    ]
    decision = admit(slots, "new", max_connections=4, max_connections_per_source=5, now=10.0)
    assert decision.admitted and decision.evict is slots[2]


def test_young_frames_are_never_evicted() -> None:
    slots = [FakeSlot("a", 0, evictable=False, open_frame_since=9.5)]
    assert not admit(slots, "b", max_connections=1, max_connections_per_source=5, now=10.0).admitted
    assert not admit(slots, "a", max_connections=5, max_connections_per_source=1, now=10.0).admitted


def test_per_source_cap_with_none_idle_evicts_that_sources_stale_frame() -> None:
    slots = [FakeSlot("a", 0, evictable=False, open_frame_since=1.0), FakeSlot("b", 0, open_frame_since=0.0)]
    decision = admit(slots, "a", max_connections=10, max_connections_per_source=1, now=10.0)
    assert decision.evict is slots[0]


def test_total_cap_evicts_struck_sources_before_a_new_legitimate_connection() -> None:
    strikes = SourceStrikes(memory_seconds=60)
    for t in (1.0, 2.0):
        strikes.strike("flood", t)
    strikes.strike("flood2", 3.0)
    slots = [FakeSlot("legit", 1.0, frames_seen=0), FakeSlot("flood", 9.0, frames_seen=0)]
    slots.append(FakeSlot("flood2", 8.0, frames_seen=0))
    decision = admit(slots, "new", max_connections=3, max_connections_per_source=5, now=10.0, strikes=strikes)
    assert decision.evict is slots[1]  # most strikes first, though the newest


def test_strikes_are_forgotten_and_bounded() -> None:
    strikes = SourceStrikes(memory_seconds=10, max_sources=4)
    strikes.strike("a", 0.0)
    strikes.strike("a", 5.0)
    assert strikes.count("a", 14.0) == 2 and strikes.count("a", 15.0) == 0
    for i in range(5):
        strikes.strike(f"s{i}", 6.0)
    assert strikes.count("s4", 6.0) == 1 and strikes.count("a", 6.0) == 0  # the oldest were dropped


def test_a_struck_source_never_evicts() -> None:
    strikes = SourceStrikes()
    strikes.strike("flood", 5.0)
    slots = [FakeSlot("legit", 1.0), FakeSlot("flood", 1.0)]
    for cap, per_source in ((2, 5), (5, 1)):
        decision = admit(
            slots,
            "flood",
            max_connections=cap,
            max_connections_per_source=per_source,
            now=10.0,
            strikes=strikes,
        )
        assert not decision.admitted and decision.evict is None
    assert admit(
        slots, "flood", max_connections=3, max_connections_per_source=5, now=10.0, strikes=strikes
    ).admitted
