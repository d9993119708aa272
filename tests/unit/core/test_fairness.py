"""The writer goes first: a preparing thread's pause waits while a writer runs a job (bounded)."""

from __future__ import annotations

import threading
import time

import pytest

from hms_ach.core import fairness


def test_a_pause_waits_for_the_running_writer_and_no_longer() -> None:
    done = threading.Event()

    def writer() -> None:
        with fairness.writer_running():
            time.sleep(0.03)
        done.set()

    t = threading.Thread(target=writer)
    with fairness.writer_running():  # held until the writer thread also runs: two writers, one gate
        t.start()
        time.sleep(0.005)
    assert not fairness.writer_idle()
    started = time.monotonic()
    fairness.pause(0)
    waited = time.monotonic() - started
    t.join()
    assert done.is_set() and fairness.writer_idle()
    assert 0.01 <= waited < 0.03 + fairness.MAX_DEFER_SECONDS


@pytest.mark.serial
def test_a_pause_is_bounded_when_the_writer_never_stops() -> None:
    with fairness.writer_running():
        started = time.monotonic()
        fairness.pause(0)
        waited = time.monotonic() - started
    assert fairness.MAX_DEFER_SECONDS * 0.9 <= waited < fairness.MAX_DEFER_SECONDS + 0.05
    assert fairness.writer_idle()


@pytest.mark.serial
def test_an_idle_writer_costs_a_pause_nothing_more() -> None:
    started = time.monotonic()
    fairness.pause(0.001)
    assert time.monotonic() - started < 0.02
