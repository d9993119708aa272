"""The whole engine as a user runs it: channels.yaml, MLLP in from python-hl7's clients, FHIR out to
httpx and fhirpy, hot reload of a mapping edit. SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import pytest
from fhirpy import AsyncFHIRClient

from hms_ach.app import runtime
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, mllp_channel, mllp_yaml, running_engine

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 5")) as eng:
        yield eng


def mllp_port(engine: Engine) -> int:
    return int(mllp_channel(engine).port)


def msa(ack: str) -> list[str]:
    line = next(s for s in ack.replace("\n", "\r").split("\r") if s.startswith("MSA"))
    return line.split("|")


async def send_with_hl7_client(port: int, names: list[str]) -> list[str]:
    """python-hl7's asyncio MLLP client: one connection, each message waits for its ACK."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    acks = []
    try:
        for name in names:
            text = (SAMPLES / name).read_bytes().decode("latin-1").replace("\n", "\r")
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 10)
            acks.append(str(ack))
    finally:
        writer.close()
    return acks


async def test_admit_transfer_discharge_over_mllp_then_query_fhir(engine: Engine) -> None:
    port = mllp_port(engine)
    acks = await send_with_hl7_client(port, ["adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7", "mfn_m02.hl7"])
    assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA", "AA"], acks
    base = f"http://127.0.0.1:{engine.http_port}/fhir"
    headers = auth_headers(engine)
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=headers) as http:
        bundle = (await http.get("/Patient", params={"family": "rivera"})).json()
        assert bundle["total"] == 1
        patient = bundle["entry"][0]["resource"]
        assert patient["birthDate"] == "1975-03-14"
        encs = (
            await http.get(
                "/Encounter", params={"patient": f"Patient/{patient['id']}", "_include": "Encounter:location"}
            )
        ).json()
        enc = [e["resource"] for e in encs["entry"] if e["resource"]["resourceType"] == "Encounter"][0]
        assert enc["status"] == "finished" and "end" in enc["period"]
        beds = (await http.get("/Location", params={"operational-status": "H"})).json()
        assert {e["resource"]["name"] for e in beds["entry"]} == {"4W 412 A", "4W 414 B"}
        read = await http.get(f"/Encounter/{enc['id']}")
        assert read.headers["etag"] == f'W/"{enc["meta"]["versionId"]}"'
        assert read.headers["content-type"].startswith("application/fhir+json")
    client = AsyncFHIRClient(
        base, authorization=headers["authorization"], extra_headers={"Accept": "application/fhir+json"}
    )
    doctors = (
        await client.resources("Practitioner")
        .search(identifier="http://hl7.org/fhir/sid/us-npi|1234567893")
        .fetch()
    )
    assert len(doctors) == 1 and doctors[0]["name"][0]["family"] == "Chen"


async def test_mllp_send_script_and_duplicates(engine: Engine, tmp_path: Path) -> None:
    """python-hl7's mllp_send console script as the sender; a resend gets the stored ACK."""
    port = mllp_port(engine)
    batch = tmp_path / "two.hl7"
    one = (SAMPLES / "adt_a04.hl7").read_bytes().rstrip(b"\r")
    batch.write_bytes(one + b"\r\r" + one + b"\r")  # the same message twice
    script = Path(sys.executable).with_name("mllp_send")
    proc = await asyncio.to_thread(
        subprocess.run,
        [str(script), "--port", str(port), "--loose", "--file", str(batch), "127.0.0.1"],
        capture_output=True,
        timeout=60,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    codes = [line.split("|")[1] for line in out.replace("\n", "\r").split("\r") if line.startswith("MSA")]
    assert codes == ["AA", "AA"]
    with engine.store.reader.connect() as conn:
        from hms_ach.store import messages

        rows = messages.list_messages(conn)
    assert sorted(r.status for r in rows) == ["duplicate", "processed"]


async def test_bad_input_gets_err_and_nothing_is_lost(engine: Engine) -> None:
    port = mllp_port(engine)
    acks = await send_with_hl7_client(
        port,
        ["bad/missing_pid3.hl7", "bad/bad_sex_code.hl7", "bad/unsupported_type.hl7", "bad/lf_separated.hl7"],
    )
    codes = [msa(a)[1] for a in acks]
    assert codes == ["AE", "AE", "AR", "AA"], acks
    assert all("\rERR|" in a.replace("\n", "\r") for a in acks[:3])
    with engine.store.reader.connect() as conn:
        from hms_ach.store import messages

        stored = {r.control_id: r.status for r in messages.list_messages(conn)}
    assert sorted(stored.values()) == ["error", "error", "processed", "rejected"]


async def test_idle_connection_is_closed(engine: Engine) -> None:
    mllp_channel(engine).server.config.idle_timeout_seconds = 0.3
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    data = await asyncio.wait_for(reader.read(), 5)  # EOF once the server gives up on us
    assert data == b""
    writer.close()


async def test_hot_reload_applies_valid_edits_and_refuses_broken_ones(engine: Engine) -> None:
    table = engine.config.mappings_dir / "tables" / "administrative_sex.yaml"
    port = mllp_port(engine)
    acks = await send_with_hl7_client(port, ["bad/bad_sex_code.hl7"])
    assert msa(acks[0])[1] == "AE"
    table.write_text(table.read_text().replace("unmapped: error", "unmapped: error\nbroken: [\n"))
    assert engine.reload_mappings() is False
    assert (
        engine.health["status"] == "degraded" and "administrative_sex.yaml" in engine.health["reload_error"]
    )
    async with httpx.AsyncClient(timeout=5) as http:
        health = (await http.get(f"http://127.0.0.1:{engine.http_port}/health")).json()
    assert health["status"] == "degraded"
    table.write_text(
        table.read_text().replace("broken: [\n", "").replace("  X: other", "  X: other\n  Q: unknown")
    )
    assert engine.reload_mappings() is True and engine.health["status"] == "ok"
    raw = (SAMPLES / "bad" / "bad_sex_code.hl7").read_bytes()
    ctrl = raw.split(b"\r")[0].split(b"|")[9]
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    writer.writemessage(hl7.parse(raw.replace(ctrl, ctrl + b"-2", 1).decode()))
    ack = await asyncio.wait_for(reader.readmessage(), 10)
    writer.close()
    assert msa(str(ack))[1] == "AA"


async def test_oversize_message_gets_ar_and_is_recorded(engine: Engine) -> None:
    from hms_ach.hl7v2.mllp import frame
    from hms_ach.store import messages

    mllp_channel(engine).server.config.max_message_bytes = 1024 * 1024
    mllp_channel(engine).config.max_message_bytes = 1024 * 1024
    huge = (
        (SAMPLES / "adt_a01.hl7").read_bytes().replace(b"S-A01-0001", b"BIG-1")
        + b"NTE|1||"
        + b"x" * 20_000_000
        + b"\r"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    writer.write(frame(huge))
    await writer.drain()
    ack = (await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30)).decode()
    assert "MSA|AR|BIG-1" in ack and "|104^" in ack
    writer.write(frame((SAMPLES / "adt_a04.hl7").read_bytes()))  # the connection still works
    await writer.drain()
    ack2 = (await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30)).decode()
    assert "MSA|AA|" in ack2
    writer.close()
    with engine.store.reader.connect() as conn:
        rows = {r.control_id: r for r in messages.list_messages(conn)}
    assert rows["BIG-1"].status == "rejected" and "max_message_bytes" in rows["BIG-1"].error


async def test_the_file_watcher_reloads_an_edited_mapping_by_itself(engine: Engine) -> None:
    """``engine.watch`` (on in ``hms-ach run`` by default): an edit is noticed within seconds, without
    a reload being asked for; a broken edit degrades the health and its fix restores it."""
    table = engine.config.mappings_dir / "tables" / "administrative_sex.yaml"
    original = table.read_text()
    watcher = asyncio.create_task(engine._watch())
    try:
        await asyncio.sleep(1.5)  # the first snapshot is taken
        table.write_text(original.replace("unmapped: error", "unmapped: error\nbroken: [\n"))
        await _until(lambda: engine.health["status"] == "degraded", 15)
        assert "administrative_sex.yaml" in engine.health["reload_error"]
        await asyncio.sleep(0.05)  # a later modification time, on file systems that keep whole 10 ms
        table.write_text(original)
        await _until(lambda: engine.health["status"] == "ok", 15)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_a_stalled_walk_of_the_mapping_files_is_shown_not_silent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk of the mapping files past its deadline (a hung mount) shows in /health until it returns."""
    monkeypatch.setattr(runtime, "WATCH_DEADLINE_SECONDS", 0.05)
    walk = engine._snapshot

    def slow_walk() -> dict[str, float]:
        time.sleep(0.4)
        return walk()

    monkeypatch.setattr(engine, "_snapshot", slow_walk)
    snapshot = asyncio.create_task(engine._snapshot_off_loop())
    await asyncio.sleep(0.2)
    assert "watch_stalled_since" in engine.health
    assert any(path.endswith("administrative_sex.yaml") for path in await snapshot)
    assert "watch_stalled_since" not in engine.health


async def test_a_stalled_reload_is_shown_and_a_second_one_waits_for_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading and compiling the mappings past the reload deadline (a hung mount) shows in /health
    until it returns; a reload asked for meanwhile (the console's button) runs after it, not beside it."""
    monkeypatch.setattr(runtime, "RELOAD_DEADLINE_SECONDS", 0.05)
    prepare = engine._prepare_reload
    running = 0
    most = 0

    def slow_prepare() -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            time.sleep(0.4)
            return prepare()
        finally:
            running -= 1

    monkeypatch.setattr(engine, "_prepare_reload", slow_prepare)
    first = asyncio.create_task(engine.reload_mappings_off_loop())
    second = asyncio.create_task(engine.reload_mappings_off_loop())
    await asyncio.sleep(0.2)
    assert "reload_stalled_since" in engine.health
    assert await first is True and await second is True
    assert most == 1 and "reload_stalled_since" not in engine.health
    assert engine.health["status"] == "ok"


async def _until(check: Callable[[], bool], seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


async def test_reload_off_loop_compiles_in_a_thread(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload from the file watcher or reload_config reads and compiles the mappings in a thread:
    the event loop (and the ACKs waiting on it) is not held for them; the swap happens on it."""
    import threading

    from hms_ach.app import runtime

    threads: list[threading.Thread] = []
    compile_now = runtime._compiled_engine

    def recording(mset: Any, timezone: str) -> Any:
        threads.append(threading.current_thread())
        return compile_now(mset, timezone)

    monkeypatch.setattr(runtime, "_compiled_engine", recording)
    before = engine.pipeline.engine
    table = engine.config.mappings_dir / "tables" / "administrative_sex.yaml"
    table.write_text(table.read_text().replace("  X: other", "  X: other\n  Q: unknown"))
    assert await engine.reload_mappings_off_loop() is True
    assert threads and threads[0] is not threading.main_thread()
    assert engine.pipeline.engine is not before and engine.health["status"] == "ok"
    table.write_text(table.read_text() + "broken: [\n")
    assert await engine.reload_mappings_off_loop() is False
    assert engine.health["status"] == "degraded" and engine.pipeline.engine is not before
