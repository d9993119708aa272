"""The writer goes first: work that only prepares a large request yields the interpreter to it.

Every channel's ACK waits for the store writer (one thread, one write lock on SQLite). A large FHIR
Bundle is validated, mapped and planned on worker threads before its writer job; done while the
writer runs, that work takes about half of the interpreter lock from it, and a feed's commit, queued
behind the writer's current job, waits up to twice as long (issue 13, "Fairness between channels").

So the writer marks the time it runs jobs (:func:`writer_running`), and the preparing threads, at
the pause they already make every few entries (:func:`pause`), wait until the writer is idle again,
for at most :data:`MAX_DEFER_SECONDS` per pause. The bound keeps a large request moving when the
writer is never idle (a saturated feed): it then takes longer, by at most that much per pause.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The longest one pause waits for the writer to become idle.
MAX_DEFER_SECONDS = 0.05

_lock = threading.Lock()
_running = 0  # writers running a job now (one per store; tests may run several engines)
_idle = threading.Event()
_idle.set()


@contextmanager
def writer_running() -> Iterator[None]:
    """The writer runs a job (and commits it) in this block."""
    global _running
    with _lock:
        _running += 1
        _idle.clear()
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                _idle.set()


def pause(seconds: float) -> None:
    """A preparing thread's pause: ``seconds`` for the event loop's turn, then, while a writer runs
    a job, until it is done (at most :data:`MAX_DEFER_SECONDS`)."""
    time.sleep(seconds)
    if not _idle.is_set():
        _idle.wait(MAX_DEFER_SECONDS)


def writer_idle() -> bool:
    return _idle.is_set()
