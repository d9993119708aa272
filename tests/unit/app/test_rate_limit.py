"""The token buckets of the per-client rate limit: the rate, the burst, and bounded memory."""

from __future__ import annotations

from hms_ach.app.rate_limit import TokenBuckets, client_key
from hms_ach.auth.caller import Caller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(requests_per_second=2.0, burst=3, max_clients=10, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == 0.5  # seconds until the next token
    assert buckets.take("b") == 0.0  # another client: its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    clock.now += 60  # refills up to the burst only
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_memory_is_bounded() -> None:
    clock = Clock()
    buckets = TokenBuckets(requests_per_second=1.0, burst=10, max_clients=100, clock=clock)
    for i in range(10_000):
        buckets.take(f"client-{i}")
    assert len(buckets) == 100  # the least recently seen were dropped
    clock.now += 10  # every bucket is full again: the next new client drops them all
    buckets.take("late")
    assert len(buckets) == 1


def test_idle_buckets_are_dropped_but_not_busy_ones() -> None:
    clock = Clock()
    buckets = TokenBuckets(requests_per_second=1.0, burst=5, max_clients=100, clock=clock)
    buckets.take("idle")
    clock.now += 3
    buckets.take("busy")
    clock.now += 3  # idle: 6 s since its last request (full); busy: 3 s (not full)
    buckets.take("new")
    assert len(buckets) == 2


def test_the_client_is_the_caller_else_the_address() -> None:
    caller = Caller(sub="svc-lab")
    scope = {"state": {"caller": caller}, "client": ("10.0.0.9", 5000)}
    assert client_key(scope) == "sub:svc-lab"
    assert client_key({"state": {"caller": None}, "client": ("10.0.0.9", 5000)}) == "address:10.0.0.9"
    anonymous = Caller(sub="anonymous", authenticated=False)
    assert client_key({"state": {"caller": anonymous}, "client": ("::1", 1)}) == "address:::1"
