"""Parse + map alone, in the engine process or through ``engine.map_workers`` worker processes.

What the map worker pool (hms_ach/ingest/workers.py) costs and gains without the store: ``C``
senders at once each evaluate generated ADT^A01 messages one after another (as an MLLP connection
does), for ``--seconds``, ``--reps`` times; in process (workers 0) every evaluation runs on the event
loop, one at a time. Prints JSON: msg/s medians per (workers, senders), this process's and the
workers' CPU, and the load average (the machine may be shared).

    python -m benchmarks.map_pool --workers 0,2 --senders 1,8 --seconds 3 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import orjson

from benchmarks import procs
from benchmarks.data import a01_messages
from benchmarks.stats import summary
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import evaluate
from hms_ach.ingest.workers import MapWorkers, compiled_engine
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings


async def _rate(
    pool: MapWorkers | None, local: MappingEngine, senders: int, seconds: float, messages: list[bytes]
) -> float:
    policy = Hl7Policy("bench")
    done = 0
    stop = time.monotonic() + seconds

    async def sender(offset: int) -> None:
        nonlocal done
        i = offset
        while time.monotonic() < stop:
            raw = messages[i % len(messages)]
            ev = await pool.evaluate(raw, policy, local) if pool else evaluate(raw, policy, local)
            if ev.result is None:
                raise procs.BenchmarkError(f"evaluate failed: {ev.error}")
            done += 1
            i += senders
            if pool is None:
                await asyncio.sleep(0)  # let the other senders in, as the event loop would

    started = time.monotonic()
    await asyncio.gather(*(sender(s) for s in range(senders)))
    return done / (time.monotonic() - started)


async def measure(workers: list[int], senders: list[int], seconds: float, reps: int) -> dict[str, Any]:
    messages = a01_messages(200, seed=20261126, tag="P")
    mset = load_mappings(procs.MAPPINGS)
    local = compiled_engine(mset, "UTC")
    out: dict[str, Any] = {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "runs": {}}
    for n in workers:
        pool = MapWorkers(n, mset, "UTC", 30.0) if n else None
        if pool is not None:
            await pool.start()
        try:
            for c in senders:
                await _rate(pool, local, c, min(1.0, seconds), messages)  # warm-up
                me0, kids0, t0 = (
                    procs.cpu_seconds(os.getpid()),
                    procs.children_cpu_seconds(os.getpid()),
                    time.monotonic(),
                )
                samples = [await _rate(pool, local, c, seconds, messages) for _ in range(reps)]
                wall = time.monotonic() - t0
                out["runs"][f"workers={n} senders={c}"] = {
                    "msg_per_s": summary(samples),
                    "engine_cpu_percent": round(100 * (procs.cpu_seconds(os.getpid()) - me0) / wall, 1),
                    "workers_cpu_percent": round(
                        100 * (procs.children_cpu_seconds(os.getpid()) - kids0) / wall, 1
                    ),
                    "load_average": os.getloadavg(),
                }
        finally:
            if pool is not None:
                await pool.stop(10)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,2", help="comma-separated pool sizes (0: in process)")
    p.add_argument("--senders", default="1,8", help="comma-separated numbers of concurrent senders")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    senders = [int(x) for x in args.senders.split(",")]
    result = asyncio.run(measure(workers, senders, args.seconds, args.reps))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
