"""Parse and map HL7 v2 messages in worker processes (``engine.map_workers``).

With ``engine.map_workers: N`` (N > 0) the engine starts N worker processes (the ``spawn`` start
method: a fresh interpreter each, never a fork of a process that has threads). Each one holds the
engine's :class:`~hms_ach.mapping.loader.MappingSet`, compiled, and runs the pure part of the
pipeline, :func:`hms_ach.ingest.pipeline.evaluate` (MSH checks, decode, parse, map, record checks),
one message at a time; a second small message may wait in its pipe meanwhile
(:data:`PIPELINE_DEPTH`), and replies come back in the order sent. It sends back the :class:`~hms_ach.ingest.pipeline.Evaluation` without
the raw bytes (the engine has them): the header, the records, the error and the ACK facts. The
engine process only commits and answers, so the GIL-bound parse and map of several connections
run on several cores.

The promises hold as in-process:

- **Order per connection.** A connection's handler awaits its message's evaluation, then its
  commit, then sends its ACK, before it reads the next frame; the pool does not change that.
- **Every wait has a deadline.** Getting a worker with room, a worker's answer and a worker's start are
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
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable
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
#: Messages a worker may owe at once: the next one waits in its pipe while it maps one, so that a
#: worker never waits for the engine to wake up between two messages.
PIPELINE_DEPTH = 2
#: A message larger than this goes only to an idle worker (nothing big waits in a pipe: a blocked
#: write in each direction at once would stop both sides).
PIPELINE_MAX_BYTES = 64 * 1024

#: The text of the error a message gets when its workers died or did not answer twice.
LOST_TEXT = "internal error: the message could not be mapped in a worker process; it is stored for replay"


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
        try:
            conn.send(("done", compact(ev)))
        except (pickle.PicklingError, TypeError, AttributeError):  # a value that cannot travel
            conn.send(("done", compact(lost(raw, policy))))


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
def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a reply's exception as seen (a reply nobody waits for any more must not warn)."""
    if not future.cancelled():
        future.exception()


class Worker:
    """One worker process and the engine's end of its pipe.

    Requests are answered in the order sent (the worker does one at a time), so each reply resolves
    the oldest of :attr:`pending`; ``on_reply`` is called after each. When the worker is lost, every
    pending future fails with :class:`WorkerLost` and ``on_lost`` is called, once."""

    def __init__(
        self,
        mset: MappingSet,
        timezone: str,
        generation: int,
        on_reply: Callable[[], None],
        on_lost: Callable[[Worker], None],
    ):
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=serve, args=(theirs, portable(mset), timezone), name="hms-ach-map-worker", daemon=True
        )
        self.loop = asyncio.get_running_loop()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.generation = generation
        self.lost: str | None = None  # why, once the worker is lost
        self._on_reply = on_reply
        self._on_lost = on_lost
        self.process.start()
        theirs.close()
        self.conn = mine
        self.ready = self._expect()  # its first words: ("ready", pid)
        self.loop.add_reader(self.conn.fileno(), self._readable)

    def _expect(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        future.add_done_callback(_retrieved)
        self.pending.append(future)
        return future

    def submit(self, request: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send ``request``; the future of its reply (WorkerLost if the worker is lost first)."""
        if self.lost is not None:
            raise WorkerLost(self.lost)
        try:
            self.conn.send(request)
        except (OSError, ValueError) as exc:
            self.fail(type(exc).__name__)
            raise WorkerLost(type(exc).__name__) from None
        return self._expect()

    def _readable(self) -> None:
        try:
            reply = self.conn.recv()
        except Exception as exc:  # noqa: BLE001 - EOF, a reset pipe or an unreadable pickle
            self.fail(type(exc).__name__)
            return
        if not self.pending:
            self.fail("an answer nobody asked for")
            return
        future = self.pending.popleft()
        if not future.done():  # its caller may have stopped waiting (its own deadline)
            future.set_result(reply)
        self._on_reply()

    def fail(self, why: str) -> None:
        """Take the worker as lost: kill it, fail what it owed, tell the pool (once)."""
        if self.lost is not None:
            return
        self.lost = why
        self.kill()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(WorkerLost(why))
        self._on_lost(self)

    def quit(self) -> None:
        """Ask the worker to exit (after what it owes); its replies are no longer read."""
        if self.conn.closed:
            return
        self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        if not self.conn.closed:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        if self.process.pid is not None:
            self.process.join(0.1)  # reaped now, almost always; else by the next worker's start


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
        self._ready: list[Worker] = []  # started and said ready, not lost
        self._all: set[Worker] = set()
        self._free = asyncio.Event()  # set when a worker may have room for one more message
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        #: workers replaced since start (died, or did not answer in time)
        self.replaced = 0

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers ready for messages."""
        return [w.process.pid for w in self._ready if w.process.pid is not None]

    async def start(self) -> None:
        """Start every worker and wait until each is ready (at most :data:`START_SECONDS`)."""
        started = time.monotonic()
        workers = [self._spawn() for _ in range(self.count)]
        try:
            for worker in workers:
                await self._until_ready(worker)
        except BaseException:
            for worker in workers:
                worker.kill()
                self._all.discard(worker)
            raise
        self._ready.extend(workers)
        self._free.set()
        log.info(
            "map_workers.started",
            extra={"workers": self.count, "seconds": round(time.monotonic() - started, 3)},
        )

    def use(self, mset: MappingSet) -> None:
        """Run ``mset`` from the next message on: each worker loads it before its next message."""
        self.mset = mset
        self.generation += 1

    async def evaluate(self, raw: bytes, policy: Hl7Policy, fallback: MappingEngine) -> Evaluation:
        """:func:`~hms_ach.ingest.pipeline.evaluate` of ``raw`` in a worker; never raises for a
        worker's failure (see the module doc). ``fallback``: the engine's own mapping engine, used
        when no worker is to be had in time."""
        for attempt in range(1, ATTEMPTS + 1):
            worker = await self._pick(len(raw))
            if worker is None:
                if not self._closed:  # stopping: the last messages are mapped here, as expected
                    log.error(
                        "map_workers.fallback", extra={"channel": policy.channel, "workers": self.count}
                    )
                return evaluate(raw, policy, fallback)
            try:
                if worker.generation != self.generation:  # a reload since its last message
                    worker.submit(("use", portable(self.mset)))
                    worker.generation = self.generation
                reply = await asyncio.wait_for(worker.submit(("map", raw, policy)), self.timeout_seconds)
                if reply[0] != "done" or not isinstance(reply[1], Evaluation):
                    raise WorkerLost("unexpected answer to a message")
            except TimeoutError:
                worker.fail("no answer within the deadline")
                self._lost_message(policy.channel, attempt, "timeout")
                continue
            except WorkerLost as exc:
                worker.fail(str(exc))  # already lost, or it answered out of turn: not used again
                self._lost_message(policy.channel, attempt, str(exc))
                continue
            ev = restore(reply[1], raw)
            if ev.crashed:  # what pipeline.evaluate logs in process, said here for the worker
                log.error("pipeline.unexpected_error", extra={"channel": policy.channel, "where": ev.crash})
            return ev
        log.error("map_workers.message_failed", extra={"channel": policy.channel, "attempts": ATTEMPTS})
        return lost(raw, policy)

    async def stop(self, grace_seconds: float) -> None:
        """Let the workers finish what they owe, tell each to exit and wait for them, all within
        ``grace_seconds``; kill the rest. A message that arrives meanwhile is evaluated in process."""
        deadline = time.monotonic() + grace_seconds
        self._closed = True
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        while any(w.pending for w in self._ready) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for worker in self._all:
            worker.quit()
        for worker in list(self._all):
            await asyncio.to_thread(worker.process.join, max(0.0, deadline - time.monotonic()))
            worker.kill()
        self._all.clear()
        self._ready.clear()
        log.info("map_workers.stopped", extra={"workers": self.count})

    # ------------------------------------------------------------------ internals
    async def _pick(self, size: int) -> Worker | None:
        """The ready worker with the fewest messages owed and room for one more, waiting for one
        at most ``timeout_seconds``; None past it. A message goes behind another one only when it
        is small and the worker needs no reload first (see :data:`PIPELINE_DEPTH`)."""
        deadline = time.monotonic() + self.timeout_seconds
        while not self._closed:
            best: Worker | None = None
            for w in self._ready:
                owed = len(w.pending)
                alone = size > PIPELINE_MAX_BYTES or w.generation != self.generation
                if owed < (1 if alone else PIPELINE_DEPTH) and (best is None or owed < len(best.pending)):
                    best = w
            if best is not None:
                return best
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._free.clear()
            try:
                await asyncio.wait_for(self._free.wait(), left)
            except TimeoutError:
                return None
        return None

    def _spawn(self) -> Worker:
        worker = Worker(self.mset, self.timezone, self.generation, self._free.set, self._lost_worker)
        self._all.add(worker)
        return worker

    async def _until_ready(self, worker: Worker) -> None:
        reply = await asyncio.wait_for(asyncio.shield(worker.ready), START_SECONDS)
        if reply[0] != "ready":
            raise WorkerLost(f"unexpected first answer {reply[0]!r}")

    def _lost_message(self, channel: str, attempt: int, why: str) -> None:
        log.warning(
            "map_workers.message_retried" if attempt < ATTEMPTS else "map_workers.message_lost_worker",
            extra={"channel": channel, "attempt": attempt, "reason": why},
        )

    def _lost_worker(self, worker: Worker) -> None:
        """``worker`` is lost (died, or killed after its deadline): start another in the background."""
        was_ready = worker in self._ready
        if was_ready:
            self._ready.remove(worker)
        self._all.discard(worker)
        if self._closed or not was_ready:
            return  # stopping, or one still starting (its starter tries again)
        self.replaced += 1
        log.warning(
            "map_workers.worker_lost",
            extra={"reason": worker.lost, "exit_code": worker.process.exitcode, "pid": worker.process.pid},
        )
        task = worker.loop.create_task(self._start_one())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        """Start one worker, again after a pause until one is ready (or the pool stops)."""
        while not self._closed:
            worker = self._spawn()
            try:
                await self._until_ready(worker)
            except (WorkerLost, TimeoutError) as exc:
                worker.fail(type(exc).__name__)
                log.error("map_workers.start_failed", extra={"reason": type(exc).__name__})
                await asyncio.sleep(RESTART_PAUSE_SECONDS)
                continue
            except BaseException:
                worker.fail("stopped")
                raise
            if self._closed:
                return
            self._ready.append(worker)
            self._free.set()
            log.info("map_workers.replaced", extra={"pid": worker.process.pid})
            return
