"""Group commit: one writer thread, many messages per transaction, each answered after the commit.

Jobs (functions of a SQLAlchemy connection) are queued from the event loop. The writer thread takes
every job waiting (up to ``max_batch``), runs each in its own SAVEPOINT inside one transaction (a
batch of one needs none: its failure rolls the transaction back), and commits once: one fsync for the whole batch. Only after that commit are the jobs' futures resolved,
so an ACK built from a result always describes committed data. If the commit itself fails, every
job of the batch fails and no ACK is sent for any of them: the senders resend.

With one connection per sender this gives SQLite throughput without giving up ``synchronous=FULL``;
on PostgreSQL it also cuts round trips.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from hms_ach.core.redact import error_kind
from hms_ach.store.db import Store
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.store.writer")
T = TypeVar("T")

_STOP = object()


class StoreWriter:
    def __init__(self, store: Store, max_batch: int = 128):
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hms-ach-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def run(self, job: Callable[[Tx], T]) -> T:
        """Run ``job`` in the next group transaction; returns after that transaction committed."""
        self.start()
        fut: Future[T] = Future()
        self._queue.put((job, fut))
        return await asyncio.wrap_future(fut)

    def run_sync(self, job: Callable[[Tx], T]) -> T:
        """The same, from a thread that is not an event loop (CLI, tests)."""
        self.start()
        fut: Future[T] = Future()
        self._queue.put((job, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[[Tx], Any], Future[Any]]]) -> None:
        if len(batch) == 1:
            self._commit_one(*batch[0])
            return
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            with self.store.writer.begin() as conn:
                for job, fut in batch:
                    savepoint = conn.begin_nested()
                    try:
                        result = job(conn)
                        savepoint.commit()
                        outcomes.append((fut, result, None))
                    except Exception as exc:  # noqa: BLE001 - reported to the job's caller
                        savepoint.rollback()
                        outcomes.append((fut, None, exc))
        except Exception as exc:  # noqa: BLE001 - the commit failed: nothing of the batch is durable
            log.error("store.commit_failed", extra={"batch": len(batch), "error": error_kind(exc)})
            for _job, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for fut, result, error in outcomes:
            # A caller that gave up (its connection closed, its task was cancelled) no
            # longer waits; the job's work is committed all the same.
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _commit_one(self, job: Callable[[Tx], Any], fut: Future[Any]) -> None:
        """A batch of one job needs no SAVEPOINT: if the job fails, the whole transaction rolls back."""
        conn = self.store.writer.connect()
        try:
            txn = conn.begin()
            try:
                result = job(conn)
            except Exception as exc:  # noqa: BLE001 - reported to the job's caller
                txn.rollback()
                self._settle(fut, None, exc)
                return
            try:
                txn.commit()
            except Exception as exc:  # noqa: BLE001 - the commit failed: nothing is durable
                log.error("store.commit_failed", extra={"batch": 1, "error": error_kind(exc)})
                self._settle(fut, None, exc)
                return
        finally:
            conn.close()
        self.batches += 1
        self.jobs += 1
        self._settle(fut, result, None)

    @staticmethod
    def _settle(fut: Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():  # the caller gave up waiting; the work is committed all the same
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
