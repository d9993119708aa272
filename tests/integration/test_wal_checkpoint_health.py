"""The WAL checkpointer, watched from outside a running engine on SQLite (issue 13 follow-up).

A checkpoint thread that dies is started again by the engine's watchdog within about a second,
with no commit needed, and counted in ``hms_ach_wal_checkpointer_restarts_total``.

A second connection (a report, a backup) holds a read transaction while FHIR writes commit: no
checkpoint can complete, the WAL grows, ``/health/ready`` turns 503 (``wal_checkpoint``) once
commits have waited ``engine.wal_checkpoint_max_age_seconds``, and ``/metrics`` shows the WAL's
size. When the reader ends, the next checkpoint completes and readiness is 200 again, without a
restart and without another commit.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import FHIR_JSON, auth_headers
from tests.integration.test_writer_faults import _ready, _until_ready
from tests.unit.store.test_checkpointer import kill_checkpointer

ROOT = Path(__file__).resolve().parents[2]
MAX_AGE = 1.0  # engine.wal_checkpoint_max_age_seconds in this test


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n  ready_probe_seconds: 2\n"
        f"  wal_checkpoint_max_age_seconds: {MAX_AGE}\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=f"sqlite:///{tmp_path}/engine.db")
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


async def _wal_metrics(http: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, float]:
    r = await http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name.startswith("hms_ach_wal_")
    }


async def _post_patients(http: httpx.AsyncClient, headers: dict[str, str], first: int, count: int) -> None:
    for n in range(first, first + count):
        body = b'{"resourceType": "Patient", "name": [{"family": "Walker%d"}]}' % n
        r = await http.post("/fhir/Patient", content=body, headers={**FHIR_JSON, **headers})
        assert r.status_code == 201, r.text


async def test_a_reader_blocking_checkpoints_turns_ready_503_and_back_to_200(engine: Engine) -> None:
    writes = auth_headers(engine)
    scrape = auth_headers(engine, roles=("operator",))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=10) as http:
        await _post_patients(http, writes, 0, 3)
        await asyncio.sleep(0.6)  # a checkpoint round after the commits
        assert await _ready(http) == (200, {"status": "ready"})
        before = await _wal_metrics(http, scrape)
        assert before["hms_ach_wal_checkpointer_up"] == 1.0
        assert before["hms_ach_wal_last_checkpoint_timestamp_seconds"] > time.time() - 60
        health = (await http.get("/health")).json()
        assert health["wal_checkpoint"]["running"] is True and health["wal_checkpoint"]["restarts"] == 0

        db = engine.store.writer.url.database
        assert db is not None
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM message").fetchone()  # holds its snapshot
            started = time.monotonic()
            await _post_patients(http, writes, 10, 20)
            status, body = await _ready(http)
            while status == 200 and time.monotonic() - started < MAX_AGE + 5:
                await asyncio.sleep(0.1)
                status, body = await _ready(http)
            assert status == 503 and set(body["failed"]) == {"wal_checkpoint"}, body
            assert "no WAL checkpoint completed" in body["failed"]["wal_checkpoint"]
            during = await _wal_metrics(http, scrape)
            assert during["hms_ach_wal_bytes"] > before["hms_ach_wal_bytes"]  # the WAL grows meanwhile
            assert during["hms_ach_wal_checkpointer_up"] == 1.0  # running: a restart would not help
            assert (await http.get("/health")).json()["status"] == "unavailable"
        finally:
            reader.execute("COMMIT")
            reader.close()

        await _until_ready(http)
        after = await _wal_metrics(http, scrape)
        assert after["hms_ach_wal_last_checkpoint_timestamp_seconds"] > during.get(
            "hms_ach_wal_last_checkpoint_timestamp_seconds", 0.0
        )
        health = (await http.get("/health")).json()  # its probe is a commit too: pending, briefly
        assert health["status"] == "ok" and (health["wal_checkpoint"]["pending_seconds"] or 0) < MAX_AGE


async def test_a_checkpointer_that_dies_is_restarted_by_the_watchdog_and_counted(engine: Engine) -> None:
    checkpointer = engine.store.checkpointer()
    assert checkpointer is not None
    scrape = auth_headers(engine, roles=("operator",))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=10) as http:
        await _post_patients(http, auth_headers(engine), 0, 1)
        counted = (await _wal_metrics(http, scrape))["hms_ach_wal_checkpointer_restarts_total"]
        await asyncio.to_thread(kill_checkpointer, checkpointer)
        deadline = time.monotonic() + 3
        while not checkpointer.alive:  # no commit, no readiness check: the watchdog (every second)
            assert time.monotonic() < deadline, "not restarted"
            await asyncio.sleep(0.05)
        assert checkpointer.restarts == 1
        metrics = await _wal_metrics(http, scrape)
        assert metrics["hms_ach_wal_checkpointer_restarts_total"] == counted + 1
        assert metrics["hms_ach_wal_checkpointer_up"] == 1.0
        await _post_patients(http, auth_headers(engine), 1, 1)
        # the commit before the kill waited for the watchdog (up to a second, as long as the bound
        # here): ready again once the new thread's first checkpoint completed
        await _until_ready(http)
