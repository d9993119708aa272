"""The writer time of one 1,000-entry FHIR transaction Bundle: entry by entry, and through the bulk
path (hms_ach/fhir/transaction.py), in one run (docs/reliability.md, "Fairness between channels").

    python -m benchmarks.transaction_writer [--database URL] [--bundles N] [--entries N]

Each mode writes ``--bundles`` transactions of new Practitioners into a fresh store (SQLite in a
temporary directory unless ``--database`` names another, e.g. a PostgreSQL schema of its own), as
``POST /fhir`` does: validated and mapped, planned, then one heavy writer job. It prints, per
mode, the median wall and CPU time of the job (CPU: of the thread that ran it), and the ratios.
The interpreter is set up as ``hms-ach run`` sets it up (:func:`hms_ach.app.cli.tune_interpreter`:
with Python's default of a young garbage collection every 700 allocations, about a fifth of the
bulk job's CPU was collections that the engine does not run).

While the Bundles are written, a light job (a one-entry FHIR create: a record, its audit entry and
outbox event) is submitted every ``LIGHT_EVERY_SECONDS`` as another channel would, and the p50/p99
of its wait-and-commit time is printed: what a feed sees of the Bundles. On PostgreSQL the bulk
mode runs twice, with the transaction on the writer thread and ``apart`` (a connection of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hms_ach.app.cli import tune_interpreter
from hms_ach.app.wiring import wire_listeners
from hms_ach.fhir import transaction
from hms_ach.fhir.bundles import bundle_operations
from hms_ach.fhir.write import RequestOutcome, prepare_all, request_job
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.outbound import events
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def bundle(prefix: str, number: int, entries: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:b{number}-{i}",
                "resource": {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": "urn:bench:staff", "value": f"{prefix}{number}-{i}"}],
                    "active": True,
                    "name": [{"family": "Osei", "given": ["Amara"]}],
                    "gender": "female",
                },
                "request": {"method": "POST", "url": "Practitioner"},
            }
            for i in range(entries)
        ],
    }


#: A light job is submitted this often while the Bundles are written.
LIGHT_EVERY_SECONDS = 0.02


async def _prepared(mapping: MappingEngine, body: dict[str, Any]) -> tuple[messages.MessageMeta, Any, str]:
    ops, kind = bundle_operations(body, len(body["entry"]))
    await prepare_all(ops, mapping)
    meta = messages.MessageMeta(
        channel="bench", raw=b"{}", content_type="fhir+json", control_id=str(uuid.uuid4())
    )
    await asyncio.to_thread(transaction.plan, ops, meta.channel)  # as the engine plans: in a worker thread
    return meta, ops, kind


async def _light_jobs(
    writer: StoreWriter, mapping: MappingEngine, prefix: str, done: asyncio.Event
) -> list[float]:
    """Seconds from submit to commit of a one-entry create every ``LIGHT_EVERY_SECONDS``."""
    waits: list[float] = []
    n = 0
    while not done.is_set():
        meta, ops, kind = await _prepared(mapping, bundle(f"{prefix}light", n, 1))
        n += 1
        started = time.perf_counter()
        outcome: RequestOutcome = await writer.run(request_job(meta, ops, kind), lane="light", timeout=300)
        waits.append(time.perf_counter() - started)
        if outcome.error is not None:
            raise SystemExit(f"light job {n} was not stored: {outcome.error}")
        await asyncio.sleep(LIGHT_EVERY_SECONDS)
    return waits


async def run(
    url: str, mapping: MappingEngine, prefix: str, bundles: int, entries: int, apart: bool = False
) -> tuple[list[tuple[float, float]], list[float]]:
    """(wall, CPU) seconds of each Bundle's writer job (identifiers start with ``prefix``), and the
    seconds each light job took meanwhile."""
    store = Store(url)
    writer = StoreWriter(store, apart=apart)
    times: list[tuple[float, float]] = []
    done = asyncio.Event()
    light = asyncio.ensure_future(_light_jobs(writer, mapping, prefix, done))
    try:
        for n in range(bundles):
            meta, ops, kind = await _prepared(mapping, bundle(prefix, n, entries))
            job = request_job(meta, ops, kind)

            def timed(tx: Any, job: Any = job) -> RequestOutcome:
                wall, cpu = time.perf_counter(), time.thread_time()
                out: RequestOutcome = job(tx)
                times.append((time.perf_counter() - wall, time.thread_time() - cpu))
                return out

            outcome = await writer.run(timed, heavy=True, apart=True, timeout=300)
            if outcome.error is not None or any(r.status != 201 for r in outcome.results):
                raise SystemExit(f"bundle {n} was not stored: {outcome.error}")
    finally:
        done.set()
        waits = await light
        writer.stop()
        store.dispose()
    return times, waits


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="a store URL (default: a new SQLite file)")
    parser.add_argument("--bundles", type=int, default=4)
    parser.add_argument("--entries", type=int, default=1000)
    args = parser.parse_args()
    wire_listeners()
    mapping = MappingEngine(load_mappings(ROOT / "mappings"))
    events.use_engine(mapping)  # event payloads from mappings/events/, as the engine writes them
    tune_interpreter()  # as hms-ach run does, once the engine is loaded
    results: dict[str, tuple[float, float]] = {}
    modes = ["entry by entry", "bulk"]
    if args.database and args.database.startswith("postgresql"):
        modes.append("bulk, apart")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            url = args.database or f"sqlite:///{tmp}/{mode.replace(' ', '_')}.db"
            saved = transaction.MIN_GROUP
            transaction.MIN_GROUP = 10**9 if mode == "entry by entry" else saved
            try:
                times, waits = asyncio.run(
                    run(url, mapping, mode[0] + mode[-1], args.bundles, args.entries, mode.endswith("apart"))
                )
            finally:
                transaction.MIN_GROUP = saved
            wall = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
            results[mode] = (wall, cpu)
            print(
                f"{mode:>15}: writer job median {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU; "
                f"{len(waits)} light jobs meanwhile p50 {_quantile(waits, 0.5) * 1000:.0f} ms, "
                f"p99 {_quantile(waits, 0.99) * 1000:.0f} ms"
            )
    (w0, c0), (w1, c1) = results["entry by entry"], results["bulk"]
    print(f"{'ratio':>15}: {w0 / w1:.1f}x wall, {c0 / c1:.1f}x CPU")


if __name__ == "__main__":
    main()
