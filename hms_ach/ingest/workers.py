"""Parse and map HL7 v2 messages in worker processes (``engine.map_workers``).

With ``engine.map_workers: N`` (N > 0) the engine starts N worker processes (the ``spawn`` start
method: a fresh interpreter each, never a fork of a process that has threads). Each one holds the
engine's :class:`~hms_ach.mapping.loader.MappingSet`, compiled, and runs the pure part of the
pipeline, :func:`hms_ach.ingest.pipeline.evaluate` (MSH checks, decode, parse, map, record checks),
for one message at a time. It sends back the :class:`~hms_ach.ingest.pipeline.Evaluation` without
the raw bytes (the engine has them): the header, the records, the error and the ACK facts. The
engine process only commits and answers, so the GIL-bound parse and map of several connections
run on several cores.

The promises hold as in-process:

- **Order per connection.** A connection's handler awaits its message's evaluation, then its
  commit, then sends its ACK, before it reads the next frame; the pool does not change that.
- **Every wait has a deadline.** Getting an idle worker, a worker's answer and a worker's start are
  each bounded (``timeout_seconds``, :data:`START_SECONDS`).
- **A worker that dies (or does not answer in time) is replaced**, and its message is evaluated
  once more by another worker. If that fails too, the message is not lost: it is evaluated as an
  internal error (AE, ERR-3 207) and stored with its raw bytes, for ``hms-ach replay``.
- **When no worker can be had in time** (all of them being replaced) the message is evaluated in
  the engine process, and ``map_workers.fallback`` is logged: slower, never stopped.
- **A reload reaches every worker**: :meth:`MapWorkers.use` bumps the mapping generation, and a
  worker is sent the new MappingSet before its next message. No message evaluated after ``use``
  returned runs on the old mappings.
- **Stop**: each worker is told to exit and joined within the grace; a worker that does not exit
  is killed. Workers ignore SIGINT and SIGTERM (a signal to the whole process group must not cut a
  message in flight) and exit on their own when the engine's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from hms_ach.core.errors import Err0357, MessageError
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Evaluation, evaluate, evaluate_header
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import MappingSet

log = logging.getLogger("hms_ach.ingest.workers")

#: Longest wait for a new worker to import the engine, compile the mappings and say it is ready.
START_SECONDS = 60.0
#: Pause before starting a worker again after a start failed.
RESTART_PAUSE_SECONDS = 1.0
#: How many times one message is given to a worker (a first try, and once more after a worker died).
ATTEMPTS = 2

#: The text of the error a message gets when its workers died or did not answer twice.
LOST_TEXT = "internal error: the worker process mapping the message stopped; it is stored for replay"


class WorkerLost(Exception):
    """A worker process died, closed its pipe or sent something unreadable."""


def compiled_engine(mset: MappingSet, timezone: str) -> MappingEngine:
    """A mapping engine for ``mset`` with its message mappings compiled now."""
    engine = MappingEngine(mset, timezone)
    engine.compile_all()
    return engine


# ---------------------------------------------------------------------- the worker process
def serve(conn: Connection, mset: MappingSet, timezone: str) -> None:
    """The body of one worker process: answer requests on ``conn`` until told to stop or EOF.

    Requests: ``("map", raw, policy)`` -> ``("done", evaluation without raw)``;
    ``("use", mset)`` -> ``("ready", pid)``; ``None``: exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The engine logs for its workers (its log format and level are set up in its own process):
    # a worker writes nothing, not even Python's last-resort lines on stderr.
    logging.getLogger().addHandler(logging.NullHandler())
    engine = compiled_engine(mset, timezone)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the engine is gone
        if request is None:
            return
        if request[0] == "use":
            engine = compiled_engine(request[1], timezone)
            conn.send(("ready", os.getpid()))
            continue
        _, raw, policy = request
        ev = evaluate(raw, policy, engine)
        conn.send(("done", compact(ev)))


def portable(mset: MappingSet) -> MappingSet:
    """``mset`` as sent to a worker: its declared fields only, without the compiled code cached on
    it in this process (functions made by ``exec`` cannot be pickled; the worker compiles its own)."""
    return replace(mset)


def compact(ev: Evaluation) -> Evaluation:
    """``ev`` without its raw bytes (the engine has them): what a worker sends back."""
    return replace(ev, raw=b"", meta=replace(ev.meta, raw=b""))


def restore(ev: Evaluation, raw: bytes) -> Evaluation:
    """A worker's compact ``ev`` with the message's ``raw`` bytes put back."""
    ev.raw = raw
    ev.meta.raw = raw
    return ev


def lost(raw: bytes, policy: Hl7Policy) -> Evaluation:
    """The evaluation of a message whose workers failed: its header as read in the engine (for the
    ACK and the key), an internal error (AE, ERR-3 207) and no records; stored for replay."""
    ev = evaluate_header(raw, policy)
    if ev.error is None:
        ev.crashed = True
        ev.crash = "map worker lost"
        ev.error = MessageError(LOST_TEXT, "", Err0357.INTERNAL_ERROR)
    return ev


# ---------------------------------------------------------------------- the engine's side
class Worker:
    """One worker process and the engine's end of its pipe."""

    def __init__(self, mset: MappingSet, timezone: str, generation: int):
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=serve, args=(theirs, portable(mset), timezone), name="hms-ach-map-worker", daemon=True
        )
        self.process.start()
        theirs.close()
        self.conn = mine
        self.generation = generation

    async def receive(self, timeout: float) -> Any:
        """The next object the worker sends, within ``timeout`` seconds; WorkerLost if it dies."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        fd = self.conn.fileno()

        def readable() -> None:
            loop.remove_reader(fd)
            if done.done():
                return
            try:
                done.set_result(self.conn.recv())
            except Exception as exc:  # noqa: BLE001 - EOF, a reset pipe or an unreadable pickle
                done.set_exception(WorkerLost(type(exc).__name__))

        loop.add_reader(fd, readable)
        try:
            return await asyncio.wait_for(done, timeout)
        finally:
            loop.remove_reader(fd)

    async def call(self, request: tuple[Any, ...], timeout: float) -> Any:
        try:
            self.conn.send(request)
        except (OSError, ValueError) as exc:
            raise WorkerLost(type(exc).__name__) from None
        return await self.receive(timeout)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class MapWorkers:
    """A pool of ``count`` worker processes evaluating HL7 v2 messages (see the module doc)."""

    def __init__(self, count: int, mset: MappingSet, timezone: str, timeout_seconds: float):
        if count < 1:
            raise ValueError("a map worker pool needs at least one worker")
        self.count = count
        self.mset = mset
        self.timezone = timezone
        self.timeout_seconds = timeout_seconds
        self.generation = 0
        self._local: MappingEngine | None = None  # the fallback engine, built when first needed
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._workers: set[Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        #: workers replaced since start (died, or did not answer in time)
        self.replaced = 0

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        return [w.process.pid for w in self._workers if w.process.pid is not None and w.process.is_alive()]

    async def start(self) -> None:
        """Start every worker and wait until each is ready (at most :data:`START_SECONDS`)."""
        started = time.monotonic()
        workers = [self._spawn() for _ in range(self.count)]
        try:
            for worker in workers:
                await self._ready(worker)
        except BaseException:
            for worker in workers:
                self._drop(worker)
            raise
        for worker in workers:
            self._idle.put_nowait(worker)
        log.info(
            "map_workers.started",
            extra={"workers": self.count, "seconds": round(time.monotonic() - started, 3)},
        )

    def use(self, mset: MappingSet) -> None:
        """Run ``mset`` from the next message on: each worker loads it before its next message."""
        self.mset = mset
        self.generation += 1
        self._local = None

    async def evaluate(self, raw: bytes, policy: Hl7Policy, fallback: MappingEngine) -> Evaluation:
        """:func:`~hms_ach.ingest.pipeline.evaluate` of ``raw`` in a worker; never raises for a
        worker's failure (see the module doc). ``fallback``: the engine's own mapping engine, used
        when no worker is to be had in time."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                worker = await asyncio.wait_for(self._idle.get(), self.timeout_seconds)
            except TimeoutError:
                log.error("map_workers.fallback", extra={"channel": policy.channel, "workers": self.count})
                return evaluate(raw, policy, fallback)
            try:
                if worker.generation != self.generation:
                    generation = self.generation
                    reply = await worker.call(("use", portable(self.mset)), START_SECONDS)
                    if reply[0] != "ready":
                        raise WorkerLost(f"unexpected answer {reply[0]!r} to a reload")
                    worker.generation = generation
                reply = await worker.call(("map", raw, policy), self.timeout_seconds)
                if reply[0] != "done" or not isinstance(reply[1], Evaluation):
                    raise WorkerLost("unexpected answer to a message")
            except (WorkerLost, TimeoutError) as exc:
                self._replace(worker, exc, policy.channel, attempt)
                continue
            except BaseException:
                self._replace(worker, WorkerLost("cancelled"), policy.channel, attempt)
                raise
            self._release(worker)
            ev = restore(reply[1], raw)
            if ev.crashed:  # what pipeline.evaluate logs in process, said here for the worker
                log.error("pipeline.unexpected_error", extra={"channel": policy.channel, "where": ev.crash})
            return ev
        log.error("map_workers.message_failed", extra={"channel": policy.channel, "attempts": ATTEMPTS})
        return lost(raw, policy)

    async def stop(self, grace_seconds: float) -> None:
        """Tell every worker to exit and wait for them (at most ``grace_seconds``); kill the rest."""
        self._closed = True
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace_seconds
        for worker in list(self._workers):
            left = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(worker.process.join, left)
            self._drop(worker)
        log.info("map_workers.stopped", extra={"workers": self.count})

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> Worker:
        worker = Worker(self.mset, self.timezone, self.generation)
        self._workers.add(worker)
        return worker

    async def _ready(self, worker: Worker) -> None:
        reply = await worker.receive(START_SECONDS)
        if reply[0] != "ready":
            raise WorkerLost(f"unexpected first answer {reply[0]!r}")

    def _release(self, worker: Worker) -> None:
        if self._closed:
            self._drop(worker)
        else:
            self._idle.put_nowait(worker)

    def _drop(self, worker: Worker) -> None:
        worker.kill()
        if worker.process.pid is not None:
            worker.process.join(0)
        self._workers.discard(worker)

    def _replace(self, worker: Worker, why: BaseException, channel: str, attempt: int) -> None:
        """Kill ``worker`` and start another one in the background."""
        code = worker.process.exitcode
        self._drop(worker)
        self.replaced += 1
        log.warning(
            "map_workers.worker_lost",
            extra={
                "channel": channel,
                "attempt": attempt,
                "reason": type(why).__name__ if not isinstance(why, WorkerLost) else str(why),
                "exit_code": code,
            },
        )
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        """Start one worker, again after a pause until one is ready (or the pool stops)."""
        while not self._closed:
            worker = self._spawn()
            try:
                await self._ready(worker)
            except (WorkerLost, TimeoutError) as exc:
                self._drop(worker)
                log.error("map_workers.start_failed", extra={"reason": type(exc).__name__})
                await asyncio.sleep(RESTART_PAUSE_SECONDS)
                continue
            except BaseException:
                self._drop(worker)
                raise
            log.info("map_workers.replaced", extra={"pid": worker.process.pid})
            self._release(worker)
            return
