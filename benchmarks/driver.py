"""What the load drivers (:mod:`benchmarks.mllp_load`, :mod:`benchmarks.http_load`) and the helper
servers (:mod:`benchmarks.echo_server`, :mod:`benchmarks.sftp_server`) share.

* :class:`StartLine` and :func:`run_together`: one repetition opens every connection first, then
  starts all workers at once with a common deadline, so connecting is not part of the timed run;
* :func:`close_quietly`: closing a connection whose peer may already be gone;
* :func:`print_result`: a driver's output contract, one JSON object on stdout (``{"error": ...}``
  when the run failed), which :func:`benchmarks.procs.run_driver` parses;
* :func:`listen_until_signalled`: a helper server's ``listening PORT`` line, then a wait for SIGTERM.

Latency percentiles and summaries are in :mod:`benchmarks.stats`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

#: The failures of a run that the driver reports as ``{"error": ...}`` rather than a traceback.
RUN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


class StartLine:
    """Where the workers of one repetition wait, connected, for the common start."""

    def __init__(self) -> None:
        self.ready = 0
        self.deadline = float("inf")  # set when every worker is connected
        self.started = asyncio.Event()

    async def wait(self) -> float:
        """Called by a worker once connected: waits for the start; returns the deadline of the run."""
        self.ready += 1
        await self.started.wait()
        return self.deadline


async def run_together(
    workers: Sequence[Callable[[StartLine], Coroutine[Any, Any, int]]], seconds: float, timeout: float
) -> tuple[int, float]:
    """Run one repetition: start every worker, wait until all are connected, then let them go together.

    Each worker connects, awaits :meth:`StartLine.wait`, works until the deadline it returns
    (``seconds`` after the start) and returns how many operations it completed. A worker that fails
    before the start fails the run; the run is abandoned ``timeout`` seconds after its deadline.
    Returns the operations completed by all workers and the seconds from the start to the last one's end.
    """
    line = StartLine()
    tasks = [asyncio.create_task(worker(line)) for worker in workers]
    while line.ready < len(tasks):  # open every connection first, then start them together
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()  # type: ignore[misc]
        await asyncio.sleep(0.001)
    t0 = time.perf_counter()
    line.deadline = t0 + seconds
    line.started.set()
    async with asyncio.timeout(seconds + timeout):
        done = await asyncio.gather(*tasks)
    return sum(done), time.perf_counter() - t0


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a connection; a peer that is already gone is not an error."""
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


def print_result(
    run: Coroutine[Any, Any, dict[str, Any]], errors: tuple[type[BaseException], ...] = RUN_ERRORS
) -> None:
    """Run a driver's main coroutine and print its result (or ``{"error": ...}`` for ``errors``) as one JSON line."""
    try:
        result = asyncio.run(run)
    except errors as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


async def listen_until_signalled(port: int) -> None:
    """For a helper server (run as its own process): say ``listening PORT`` on stdout, which the
    benchmark waits for, then wait for SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {port}", flush=True)
    await stop.wait()
