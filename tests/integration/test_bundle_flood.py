"""Fairness between channels (issue 13): a flood of 1,000-entry FHIR Bundles does not starve an MLLP feed.

An MLLP feed sends at a steady rate from a process of its own (:mod:`tests.integration.mllp_feed`)
while 1,000-entry Bundles (batch, then transaction) are POSTed to /fhir back to back for
``FLOOD_SECONDS``. The feed's ACK p99, measured from the time each message was due (a stall counts
against every message it delayed), stays under 200 ms; every message gets its AA, every Bundle its
response with a 201 per entry, and every record is stored once.

Transaction Bundles on PostgreSQL commit on the writer's second connection, and the feed waits
only for each one's audit/outbox tail; on SQLite a transaction is one writer job under the one
write lock, and the feed's p99 is about the length of one (the Bundle's parsing, record checks and
answer run off the event loop): on this 2-core machine, quiet, 59-108 ms on SQLite and 36-75 ms on
PostgreSQL (2026-12-07), and 145-189 ms on SQLite with two CPU-bound processes beside it.

A latency bound can be judged only where the test has the CPUs to itself, and the load average
cannot tell (it lags a minute behind, so it is high right after the parallel pass): the test
samples what other processes and the host took while the flood ran (:mod:`tests.integration.cpu_share`).
A p99 over 200 ms fails the test, unless others took more than half a core: then a transaction
Bundle's run still asserts the bound it reaches busy (``TRANSACTION_P99_GUARD_MS``) and reports
XFAIL with the p99 and who took the CPUs. A quiet host can be slow too (in CI once: 14 Bundles
where 24 are usual, p99 239 ms): before the feed starts the test times a fixed piece of work of the
writer's kind (:func:`tests.integration.cpu_share.pace`), and on a host that takes longer for it
than the one the bound was set on, a transaction Bundle's p99 is judged against 200 ms stretched by
as much (XFAIL when it needs the stretch). Every run prints its figures. The module is marked
``serial``: scripts/test.sh runs it alone, after the parallel pass.

The engine runs in this process as ``hms-ach run`` runs it, with the interpreter tuned by
:func:`hms_ach.app.cli.tune_interpreter` (the start-up heap frozen, young collections every 50,000 allocations, a 1 ms switch interval).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from hms_ach.app.cli import tune_interpreter
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.cpu_share import pace, sample, share
from tests.integration.engine_helpers import FHIR_JSON, auth_headers, mllp_channel, mllp_yaml, start_engine

ROOT = Path(__file__).resolve().parents[2]
FEED_RATE = 10  # messages a second, one sender waiting for each ACK
ENTRIES = 1000  # per Bundle
FLOOD_SECONDS = 12.0  # Bundles are posted back to back for this long (the last one is waited for)
P99_LIMIT_MS = 200.0
#: Transaction Bundles on a busy machine: on SQLite the feed's p99 is the writer time of one Bundle. Entry by entry it
#: was 8 s (load average 6); the bulk path measured 0.3-1.3 s, and 0.5-0.9 s at load average 5-6
#: once new Practitioners were merged and their audit diffs made in the plan. This guards that.
TRANSACTION_P99_GUARD_MS = 2000.0
STAFF = "urn:test:flood-staff"
PREBUILT = 24  # Bundle bodies built before the flood (about 0.3 MB each)

pytestmark = [pytest.mark.timeout(150), pytest.mark.serial]


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    channels = mllp_yaml("adt_in") + "  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 4000000\n"
    eng = await start_engine(tmp_path, store, channels)
    switch_interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    tune_interpreter()  # as hms-ach run does
    try:
        yield eng
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch_interval)
        await eng.stop()


def _bundle(number: int, kind: str = "batch") -> bytes:
    entries = [
        {
            "fullUrl": f"urn:uuid:flood-{number}-{i}",
            "resource": {
                "resourceType": "Practitioner",
                "identifier": [{"system": STAFF, "value": f"F{number}-{i}"}],
                "active": True,
                "name": [{"family": "Osei", "given": ["Amara"]}],
                "gender": "female",
            },
            "request": {"method": "POST", "url": "Practitioner"},
        }
        for i in range(ENTRIES)
    ]
    return json.dumps({"resourceType": "Bundle", "type": kind, "entry": entries}).encode()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _stop_feed(feed: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await asyncio.wait_for(feed.communicate(b""), 30)
    assert feed.returncode == 0, "the MLLP feed failed"
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_a_bundle_flood_does_not_starve_an_mllp_feed(engine: Engine, store: Store, kind: str) -> None:
    # built before the feed starts (the test shares the engine's event loop: a body built during
    # the flood would stall the feed as no engine work does); more, if needed, in a worker thread
    bodies = [_bundle(n, kind) for n in range(PREBUILT)]
    slower = pace()  # before the feed starts: how much slower than where the bound was set this host is
    feed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.mllp_feed",
        str(mllp_channel(engine).port),
        str(FEED_RATE),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    answers: list[httpx.Response] = []
    try:
        await asyncio.sleep(1.0)  # the feed is running before the flood
        own = {os.getpid(), feed.pid}
        cpu_before = sample(own)
        started = time.monotonic()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{engine.http_port}/fhir", timeout=120, headers=auth_headers(engine)
        ) as http:
            while time.monotonic() - started < FLOOD_SECONDS:
                n = len(answers)
                body = bodies[n] if n < len(bodies) else await asyncio.to_thread(_bundle, n, kind)
                answers.append(await http.post("", content=body, headers=FHIR_JSON))
        flood_seconds = time.monotonic() - started
        others = share(cpu_before, sample(own))  # sampled while the feed still runs
    finally:
        result = await _stop_feed(feed)

    # every Bundle answered in full, every entry stored once
    for answer in answers:
        assert answer.status_code == 200, answer.text[:500]
        reply = answer.json()
        assert reply["type"] == f"{kind}-response"
        assert [e["response"]["status"] for e in reply["entry"]] == ["201 Created"] * ENTRIES
    with store.read() as conn:
        stored = conn.execute(
            text("SELECT COUNT(*) FROM practitioner WHERE key_system = :s"), {"s": STAFF}
        ).scalar_one()
        rows = conn.execute(
            text("SELECT status, COUNT(*) FROM message WHERE channel = 'fhir_in' GROUP BY status")
        ).all()
    assert stored == ENTRIES * len(answers)
    assert [tuple(r) for r in rows] == [("processed", len(answers))]

    # every message of the feed answered AA, at its rate, and the p99 bounded
    due = result["due_ms"]
    assert result["bad"] == []
    p50, p99, worst = _quantile(due, 0.5), _quantile(due, 0.99), max(due)
    summary = (
        f"{store.dialect}: {len(answers)} {kind} Bundles x {ENTRIES} entries in {flood_seconds:.1f} s; "
        f"feed {len(due)} ACKs, p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms"
    )
    if others is not None:
        summary += f"; {others}"
    summary += f"; the reference work {slower:.2f}x as long as where the bound was set"
    print(summary)
    assert len(due) >= 0.8 * FEED_RATE * flood_seconds, summary
    if kind == "transaction" and p99 >= P99_LIMIT_MS and others is not None and others.busy():
        # Other work took the CPUs the feed and the writer needed: the test cannot judge 200 ms
        # (on SQLite the feed's p99 is the length of one transaction's writer job, which a shared
        # CPU stretches). It still asserts the guard, and says what it measured.
        assert p99 < TRANSACTION_P99_GUARD_MS, summary
        pytest.xfail(f"the machine was busy, 200 ms not judged: {summary}")
    if kind == "transaction" and p99 >= P99_LIMIT_MS and slower > 1.0:
        # A quiet host with slower cores than the one the bound was set on: its writer job is that
        # much longer. The test judges the bound stretched by as much, and says so.
        assert p99 < P99_LIMIT_MS * slower, summary
        pytest.xfail(f"a slower host, 200 ms judged as {P99_LIMIT_MS * slower:.0f}: {summary}")
    assert p99 < P99_LIMIT_MS, summary


async def test_a_batch_bundle_in_many_slices_is_answered_and_stored_as_one_request(
    tmp_path: Path, store: Store
) -> None:
    """With a tiny slice every entry is committed on its own: the answer, the refusals of single
    entries and the message row are still those of one batch request."""
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n    batch_slice_seconds: 0.000001\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await eng.start()
    try:
        batch = json.loads(_bundle(7))
        batch["entry"] = batch["entry"][:5]
        batch["entry"][3]["resource"]["identifier"][0]["value"] = "F7-1"  # the same as entry 1
        batch["entry"][4]["request"] = {"method": "PUT", "url": "Practitioner/not-there"}
        batch["entry"][4]["resource"]["id"] = "not-there"  # an update names its target in its body too
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{eng.http_port}/fhir", timeout=30) as http:
            answer = await http.post("", json=batch, headers={**FHIR_JSON, **auth_headers(eng)})
        batches_before = eng.writer.batches
    finally:
        await eng.stop()
    assert answer.status_code == 200, answer.text
    statuses = [e["response"]["status"] for e in answer.json()["entry"]]
    assert statuses == ["201 Created", "201 Created", "201 Created", "409", "404"]
    assert answer.json()["entry"][3]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert batches_before >= 5  # one commit per entry
    with store.read() as conn:
        row = conn.execute(text("SELECT status, ack_code, ack FROM message WHERE channel = 'fhir_in'")).one()
        stored = conn.execute(
            text("SELECT COUNT(*) FROM practitioner WHERE key_system = :s"), {"s": STAFF}
        ).scalar_one()
    assert (row.status, row.ack_code) == ("processed", "200")
    assert json.loads(row.ack)["status"] == [201, 201, 201, 409, 404]
    assert stored == 3
