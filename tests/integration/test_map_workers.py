"""``engine.map_workers``: parse and map in worker processes (hms_ach/ingest/workers.py).

Real engines and real worker processes: A01/A08/A03 over MLLP from several connections store the
same records as the in-process engine, in the order each sender sent them; a worker killed with
SIGKILL mid-run loses no message and is replaced; a mapping reload reaches every worker; a worker
that never answers in time costs its message an AE (stored for replay), never the message."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Evaluation, Pipeline, evaluate
from hms_ach.ingest.workers import LOST_TEXT, MapWorkers, compiled_engine
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.writer import StoreWriter
from tests.conftest import empty_store
from tests.integration.engine_helpers import mllp_channel, mllp_yaml, running_engine
from tests.integration.engine_process import (
    FS_CR,
    VT,
    EngineProcess,
    SendLog,
    send_until_closed,
    stored_counts,
)
from tests.integration.test_cluster import message, patient_versions

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7")
#: Senders at once, and patients per sender (each patient: A01, A08, A03 in that order).
CONNECTIONS = 4
PATIENTS = 3


def engine_with(tmp_path: Path, store: Store, map_workers: int) -> AbstractAsyncContextManager[Engine]:
    """An engine on ``store`` with one MLLP channel and ``engine.map_workers`` as given."""
    return running_engine(
        tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 30"), f"  map_workers: {map_workers}\n"
    )


def _msa(ack: bytes) -> str:
    line = next((s for s in ack.strip(VT + FS_CR).split(b"\r") if s.startswith(b"MSA")), b"MSA||")
    return line.split(b"|")[1].decode()


async def sender(port: int, frames: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """One connection sending ``frames`` in order, each after the previous one's ACK."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    answers = []
    try:
        for cid, raw in frames:
            writer.write(raw)
            await writer.drain()
            answers.append((cid, _msa(await asyncio.wait_for(reader.readuntil(FS_CR), 60))))
    finally:
        writer.close()
    return answers


def workload(connection: int, patients: int = PATIENTS) -> list[tuple[str, bytes]]:
    """Connection ``connection``'s messages: its patients' A01, A08, A03, patients interleaved."""
    frames = []
    for step, name in enumerate(STEPS):
        for p in range(patients):
            k = connection * 100 + p
            cid = f"MW{k}-{step}"
            frames.append((cid, message(name, cid, k, f"{step} Step St", f"(614)555-{k % 100:02d}{step}0")))
    return frames


async def ingest(engine: Engine, connections: int = CONNECTIONS) -> dict[str, str]:
    """Every connection's workload, all connections at once; control id -> MSA-1."""
    port = int(mllp_channel(engine).port)
    runs = await asyncio.gather(*(sender(port, workload(c)) for c in range(connections)))
    return {cid: code for run in runs for cid, code in run}


def _normalised(resource: dict[str, Any]) -> Any:
    body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    return orjson.loads(re.sub(rb'"([A-Za-z]+)/[0-9a-f-]{32,36}"', rb'"\1/*"', orjson.dumps(body)))


def stored_records(store: Store) -> dict[str, list[Any]]:
    """Every current record of every type, without ids and meta, sorted: what two stores that took
    the same messages must hold alike."""
    out: dict[str, list[Any]] = {}
    with store.read() as conn:
        for rtype, model in RECORD_TABLES.items():
            table = model.__tablename__
            rows = conn.execute(text(f"SELECT resource FROM {table}")).all()  # noqa: S608 - fixed names
            if rows:
                found = [_normalised(orjson.loads(r[0])) for r in rows]
                out[rtype] = sorted(found, key=lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
    return out


def message_rows(store: Store) -> dict[str, tuple[str, str | None]]:
    with store.read() as conn:
        rows = conn.execute(text("SELECT control_id, status, ack_code FROM message")).all()
    return {str(r[0]): (str(r[1]), r[2]) for r in rows}


def _alive(pid: int) -> bool:
    """``pid`` runs (a killed child not yet reaped, a zombie, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_two_workers_store_what_the_engine_process_stores_in_each_senders_order(
    tmp_path: Path, store: Store
) -> None:
    with empty_store("sqlite", tmp_path, "single") as single:
        async with engine_with(tmp_path / "in_process", single, 0) as eng:
            assert eng.map_workers is None
            expected_codes = await ingest(eng)
        expected_rows, expected_records = message_rows(single), stored_records(single)
    async with engine_with(tmp_path / "workers", store, 2) as eng:
        assert eng.map_workers is not None and len(eng.map_workers.pids) == 2
        pids = eng.map_workers.pids
        codes = await ingest(eng)
    assert not [p for p in pids if _alive(p)], "the workers exit when the engine stops"
    assert set(codes.values()) == {"AA"} and codes == expected_codes
    assert len(codes) == CONNECTIONS * PATIENTS * len(STEPS)
    assert message_rows(store) == expected_rows
    assert stored_records(store) == expected_records
    for c in range(CONNECTIONS):
        for p in range(PATIENTS):
            k = c * 100 + p
            assert patient_versions(store, k) == [f"MW{k}-{step}" for step in range(len(STEPS))]


async def test_a_worker_killed_mid_run_loses_no_message_and_is_replaced(tmp_path: Path, store: Store) -> None:
    async with engine_with(tmp_path, store, 2) as eng:
        pool = eng.map_workers
        assert pool is not None
        victim = pool.pids[0]
        port = int(mllp_channel(eng).port)
        runs = [asyncio.create_task(sender(port, workload(c, patients=8))) for c in range(CONNECTIONS)]
        while not message_rows(store):  # the run is under way
            await asyncio.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        codes = {cid: code for run in await asyncio.gather(*runs) for cid, code in run}
        for _ in range(600):  # the replacement starts in the background
            if len(pool.pids) == 2:
                break
            await asyncio.sleep(0.1)
        assert victim not in pool.pids and len(pool.pids) == 2 and pool.replaced >= 1
        again = await sender(
            port, [("MW-after", message("adt_a01.hl7", "MW-after", 999, "9 St", "(614)5550000"))]
        )
    assert again == [("MW-after", "AA")]
    assert len(codes) == CONNECTIONS * 8 * len(STEPS)
    # the message in flight on the killed worker was evaluated again by the other one
    assert set(codes.values()) == {"AA"}, {c: v for c, v in codes.items() if v != "AA"}
    rows = message_rows(store)
    assert {cid: rows[cid] for cid in codes} == {cid: ("processed", "AA") for cid in codes}
    for c in range(CONNECTIONS):
        k = c * 100
        assert patient_versions(store, k) == [f"MW{k}-{step}" for step in range(len(STEPS))]


async def test_a_mapping_reload_reaches_every_worker(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    bad = (ROOT / "samples" / "hl7" / "bad" / "bad_sex_code.hl7").read_bytes().replace(b"\n", b"\r")
    cid = bad.split(b"\r")[0].split(b"|")[9]

    def frames(tag: str) -> list[tuple[str, bytes]]:
        return [(f"{tag}{i}", VT + bad.replace(cid, f"{tag}{i}".encode(), 1) + FS_CR) for i in range(4)]

    async with engine_with(tmp_path, store, 2) as eng:
        port = int(mllp_channel(eng).port)
        before = await asyncio.gather(*(sender(port, [f]) for f in frames("RB")))
        assert {code for run in before for _, code in run} == {"AE"}
        table = eng.config.mappings_dir / "tables" / "administrative_sex.yaml"
        table.write_text(table.read_text().replace("  X: other", "  X: other\n  Q: unknown"))
        assert eng.reload_mappings() is True
        after = await asyncio.gather(*(sender(port, [f]) for f in frames("RA")))
        # the number of workers is read at start only: a reload says so and keeps the pool
        config = tmp_path / "channels.yaml"
        config.write_text(config.read_text().replace("map_workers: 2", "map_workers: 1"))
        assert eng.map_workers is not None and await eng.reload_config() is True
        assert len(eng.map_workers.pids) == 2
        assert "config.restart_needed" in [r.getMessage() for r in caplog.records]
    # four senders at once: both workers answered, each with the reloaded mappings
    assert {code for run in after for _, code in run} == {"AA"}


async def test_a_worker_that_does_not_answer_in_time_costs_an_ae_never_the_message(tmp_path: Path) -> None:
    mset = load_mappings(ROOT / "mappings")
    local = compiled_engine(mset, "UTC")
    raw = message("adt_a01.hl7", "MW-slow", 7, "1 St", "(614)5550001").strip(VT + FS_CR)
    policy = Hl7Policy("adt_in")
    pool = MapWorkers(2, mset, "UTC", timeout_seconds=0.5)
    await pool.start()
    try:
        stuck = pool.pids
        for pid in stuck:  # alive, but they never answer
            os.kill(pid, signal.SIGSTOP)
        ev = await pool.evaluate(raw, policy, local)
        # both attempts timed out: an internal error (AE), the header kept for the ACK and the key
        assert ev.error is not None and ev.error.message == LOST_TEXT and ev.result is None
        assert ev.header is not None and ev.meta.idempotency_key == "ADTSYS|GENHOSP|MW-slow"
        assert ev.raw == raw and pool.replaced == 2
        for _ in range(100):  # the stuck workers were killed
            if not [p for p in stuck if _alive(p)]:
                break
            await asyncio.sleep(0.05)
        assert not [p for p in stuck if _alive(p)]
        # both workers are being replaced: a message that cannot wait is evaluated in this process
        pool.timeout_seconds = 0.000_001
        fallback = await pool.evaluate(raw, policy, local)
        assert fallback.error is None and repr(fallback) == repr(evaluate(raw, policy, local))
        pool.timeout_seconds = 30
        for _ in range(600):
            if len(pool.pids) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(pool.pids) == 2
        answered = await pool.evaluate(raw, policy, local)
        assert answered.error is None and repr(answered) == repr(evaluate(raw, policy, local))
    finally:
        await pool.stop(10)
    assert pool.pids == []


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_map_workers_setting_is_checked(tmp_path: Path, value: str) -> None:
    from hms_ach.core.errors import ConfigError, ConfigErrors

    (tmp_path / "channels.yaml").write_text(f"engine:\n  map_workers: {value}\nchannels: []\n")
    with pytest.raises((ConfigError, ConfigErrors), match="map_workers"):
        load_config(tmp_path / "channels.yaml")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the map workers and multiprocessing's resource tracker)."""
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
            found += [int(c) for c in fh.read().split()]
    return found


async def test_hms_ach_run_with_workers_drains_on_sigterm_and_leaves_no_process(
    tmp_path: Path, store: Store
) -> None:
    engine = EngineProcess(
        tmp_path, store.url, engine_yaml="  map_workers: 2\n  shutdown_grace_seconds: 20\n"
    )
    sent = SendLog()
    try:
        await engine.start()
        assert engine.proc is not None
        workers = _children(engine.proc.pid)
        assert len(workers) >= 2
        for pid in workers:  # a SIGTERM to the whole process group: the workers leave it to the engine
            os.kill(pid, signal.SIGTERM)
        senders = [
            asyncio.create_task(send_until_closed(engine.mllp_port, f"MWT-{s}", sent)) for s in range(3)
        ]
        for _ in range(600):
            if len(sent.acked()) >= 30:
                break
            await asyncio.sleep(0.05)
        assert all(_alive(pid) for pid in workers)
        code = await engine.terminate(within=30)
        await asyncio.gather(*senders)
    finally:
        engine.kill()
    assert code == 0, engine.output()[-3000:]
    for _ in range(100):  # the engine has exited; its workers went before it
        if not any(_alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)]
    # as without workers (test_lifecycle): every ACKed message stored once; a sender's last frame,
    # sent as the engine stopped reading, may be unanswered, and is then stored at most once
    acked, unanswered = sent.acked(), sent.unanswered()
    assert len(acked) >= 30 and set(sent.codes.values()) <= {"AA", None} and len(unanswered) <= 3, sent.codes
    counts = stored_counts(store, list(sent.codes))
    assert all(counts[c] == 1 for c in acked) and all(counts[c] <= 1 for c in unanswered), counts
    assert engine.event("map_workers.stopped") is not None


async def test_a_fault_of_the_pool_itself_maps_the_message_in_the_engine_process(tmp_path: Path) -> None:
    with empty_store("sqlite", tmp_path, "fault") as db:
        writer = StoreWriter(db)
        writer.start()
        try:
            pipeline = Pipeline(writer, compiled_engine(load_mappings(ROOT / "mappings"), "UTC"))

            async def broken(raw: bytes, policy: Hl7Policy, fallback: MappingEngine) -> Evaluation:
                raise RuntimeError("a bug in the pool")

            pipeline.remote = broken
            raw = message("adt_a01.hl7", "MW-fault", 5, "1 St", "(614)5550005").strip(VT + FS_CR)
            outcome = await pipeline.process_hl7(raw, Hl7Policy("adt_in"))
        finally:
            writer.stop()
        assert outcome.status == "processed" and outcome.ack_code == "AA"
        assert message_rows(db)["MW-fault"] == ("processed", "AA")
