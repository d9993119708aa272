"""The writer's own CPU per HL7 v2 message (issue 20, item 2): figure B's writer job, without the disk.

    python -m benchmarks.writer_cpu [--messages N] [--reps R] [--database-dir DIR] [--batch B]

Figure B's census mix (A01, A08, A03, MFN^M02; :class:`benchmarks.data.AdtStream`) is evaluated
first (parse and map, not timed); then each message's writer job (``commit_hl7``: the message row,
its records, history, search index, audit and outbox rows, and its ACK) is committed in a
transaction of its own, as the group-commit writer runs a batch of one. The listeners are wired and
the event payload mappings in use, as in ``hms-ach run``. The database is SQLite in a fresh
directory under ``--database-dir`` (default ``/dev/shm`` when it exists), so that ``fsync`` costs
next to nothing and the figure is the writer's CPU: on a machine shared with other work, figure B's
wall-clock rates move with the disk and the other processes, and this one much less.

``--batch B`` (B > 1) commits the jobs B at a time through the group-commit writer's own batch
path (:class:`hms_ach.store.writer.StoreWriter`, called on this thread; its checkpointer thread
runs, and its CPU counts), as figure B's 8 connections make it run them.

Prints, per repetition, the process CPU time and the wall time per message (ms), and their medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.data import AdtStream
from hms_ach.app.wiring import wire_listeners
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import commit_hl7, evaluate
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.outbound import events
from hms_ach.store.db import Store
from hms_ach.store.savepoint import optimistic
from hms_ach.store.writer import StoreWriter


def one_run(
    messages: int, seed: int, folder: Path, mapping: MappingEngine, batch: int = 1
) -> tuple[float, float]:
    """(CPU ms, wall ms) per message of one repetition on a fresh store in ``folder``."""
    policy = Hl7Policy("bench")
    stream = AdtStream(seed, f"W{seed}")
    evaluated = [evaluate(stream.next_message().encode("utf-8"), policy, mapping) for _ in range(messages)]
    failed = [str(ev.error) for ev in evaluated if ev.error is not None]
    if failed:
        raise SystemExit(f"generated messages failed to map: {failed[:3]}")
    store = Store(f"sqlite:///{folder}/writer.db")
    writer = StoreWriter(store) if batch > 1 else None
    try:
        if writer is not None:
            writer.start()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if writer is None:
            for ev in evaluated:
                with store.transaction() as tx, optimistic(tx):  # as the writer runs a batch of one
                    outcome = commit_hl7(ev, policy)(tx)
                _check(outcome)
        else:
            for i in range(0, len(evaluated), batch):
                jobs = [(commit_hl7(ev, policy), Future[Any]()) for ev in evaluated[i : i + batch]]
                for _fut, outcome, error in writer._commit_batch(jobs):
                    if error is not None:
                        raise SystemExit(f"a writer job failed: {error!r}")
                    _check(outcome)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        if writer is not None:
            writer.stop()
        store.dispose()
    return 1000 * cpu / messages, 1000 * wall / messages


def _check(outcome: Any) -> None:
    if outcome.ack_code != "AA":
        raise SystemExit(f"a message was answered {outcome.ack_code}: {outcome.error}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=800, help="messages per repetition")
    p.add_argument("--reps", type=int, default=3)
    shm = Path("/dev/shm")
    p.add_argument("--database-dir", type=Path, default=shm if shm.is_dir() else None)
    p.add_argument(
        "--batch", type=int, default=1, help="jobs per transaction, through the group-commit writer"
    )
    args = p.parse_args(argv)
    mapping = MappingEngine(load_mappings(procs.MAPPINGS), "UTC")
    wire_listeners()
    events.use_engine(mapping)
    results = []
    for rep in range(args.reps):
        folder = Path(tempfile.mkdtemp(prefix="hms-ach-writer-cpu-", dir=args.database_dir))
        try:
            results.append(one_run(args.messages, 7 + rep, folder, mapping, args.batch))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    cpu = [round(c, 3) for c, _ in results]
    wall = [round(w, 3) for _, w in results]
    print(f"writer CPU ms/message per repetition: {cpu} (median {statistics.median(cpu):.3f})")
    print(f"wall ms/message per repetition:       {wall} (median {statistics.median(wall):.3f})")


if __name__ == "__main__":
    main()
