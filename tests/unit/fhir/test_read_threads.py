"""Searches (and reads on PostgreSQL) run on the read threads with the caller's context, and a cancelled caller waits."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

from hms_ach.fhir.routes import _in_read_thread

WHO = contextvars.ContextVar("who", default="nobody")


def test_the_call_sees_the_callers_context_and_runs_on_another_thread() -> None:
    async def main() -> tuple[str, bool]:
        WHO.set("caller")
        here = threading.get_ident()
        seen: tuple[str, bool] = await _in_read_thread(lambda: (WHO.get(), threading.get_ident() != here))
        return seen

    assert asyncio.run(main()) == ("caller", True)


def test_a_cancelled_caller_returns_only_once_the_thread_is_done() -> None:
    """The slot a search holds is given back only when its thread is free again (a thread cannot be
    stopped), as with FastAPI's thread pool."""
    finished: list[float] = []

    def slow() -> None:
        time.sleep(0.3)
        finished.append(time.monotonic())

    async def main() -> float:
        task = asyncio.create_task(_in_read_thread(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return time.monotonic()
        raise AssertionError("not cancelled")

    returned = asyncio.run(main())
    assert finished and finished[0] <= returned
