"""Issue 13 acceptance: faults of the whole process, with ``hms-ach run`` as a real subprocess and
real MLLP senders.

* kill -9 during load (SQLite and PostgreSQL): after a restart every message ACKed AA is stored
  exactly once, and the ones never answered, sent again, are stored once too.
* A disk that fills and is then freed (SQLite on a small tmpfs the test mounts; skipped where
  mounting is not allowed): during the fault the senders get negative ACKs or positive ones for
  what did commit, ``/health/ready`` says 503 and the process stays up; once space is freed intake
  resumes without a restart; the log stays small (no flood of tracebacks).

The PostgreSQL connection faults (``pg_terminate_backend`` with one and eight senders) are in
``test_writer_faults.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hms_ach.store.db import Store
from tests.integration.engine_process import (
    EngineProcess,
    SendLog,
    send_one_each,
    send_until_closed,
    sqlite_stored_counts,
    stored_counts,
)

SENDERS = 4


@pytest.mark.timeout(180)
async def test_kill_9_during_load_loses_no_acked_message(tmp_path: Path, store: Store) -> None:
    engine = EngineProcess(tmp_path, store.url)
    store.dispose()
    sent = SendLog()
    try:
        await engine.start()
        senders = [
            asyncio.create_task(send_until_closed(engine.mllp_port, f"K9-{s}", sent)) for s in range(SENDERS)
        ]
        deadline = time.monotonic() + 30
        while len(sent.acked()) < 40:
            assert time.monotonic() < deadline, len(sent.acked())
            await asyncio.sleep(0.02)
        engine.signal(signal.SIGKILL)
        assert await engine.wait(10) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*senders), 30)

        acked, unanswered = sent.acked(), sent.unanswered()
        assert set(sent.codes.values()) <= {"AA", None}, sent.codes
        assert len(unanswered) <= SENDERS  # the messages in flight when the process died
        await engine.start()  # SQLite replays its WAL; PostgreSQL has what committed
        counts = stored_counts(store, list(sent.codes))
        assert all(counts[c] == 1 for c in acked), {c: counts[c] for c in acked if counts[c] != 1}
        assert all(counts[c] <= 1 for c in unanswered), {c: counts[c] for c in unanswered}
        # the senders send the unanswered ones again: each is then stored once, never twice
        assert await send_one_each(engine.mllp_port, unanswered) == ["AA"] * len(unanswered)
        assert await engine.terminate() == 0
        counts = stored_counts(store, list(sent.codes))
        assert set(counts.values()) == {1}, {c: n for c, n in counts.items() if n != 1}
    finally:
        engine.kill()


# ---------------------------------------------------------------------------- a disk that fills
DISK_MB = 24


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MB MiB mounted for this test (root and a kernel that allows it), else skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a disk that fills needs a tmpfs mount: run as root with mount(8) available")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(
            f"a disk that fills needs a tmpfs mount, which is not allowed here: {done.stderr.strip()}"
        )
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(path: Path) -> int:
    """Write ``path`` until the disk is full; the bytes written."""
    chunk = b"\0" * 65536
    written = 0
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        while True:  # the last partial block
            try:
                written += f.write(b"\0" * 512) or 0
            except OSError:
                return written


async def _ready_status(http: httpx.AsyncClient) -> int:
    return (await http.get("/health/ready")).status_code


@pytest.mark.timeout(180)
async def test_a_full_disk_gets_negative_acks_and_intake_resumes_once_freed(
    tmp_path: Path, small_disk: Path
) -> None:
    db = small_disk / "store.db"
    engine = EngineProcess(
        tmp_path,
        f"sqlite:///{db}",
        engine_yaml="  commit_timeout_seconds: 3\n  min_free_disk_mb: 1\n  shutdown_grace_seconds: 20\n",
        http=True,
    )
    filler = small_disk / "filler"
    try:
        await engine.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=15) as http:
            before = SendLog()
            await send_until_closed(engine.mllp_port, "DF-BEFORE", before, limit=5)
            assert before.acked() == list(before.codes) and len(before.codes) == 5, before.codes
            assert await _ready_status(http) == 200

            _fill(filler)
            log_before_fault = len(engine.output())
            during = SendLog()
            for n in range(2):  # two senders, one after another, six messages each
                await send_until_closed(engine.mllp_port, f"DF-FULL{n}", during, limit=6, ack_wait=15)
            assert engine.proc is not None and engine.proc.poll() is None  # no crash
            assert set(during.codes.values()) <= {"AA", "AE", None}, during.codes
            assert during.acked("AE"), during.codes  # the fault is reported, not hidden
            assert await _ready_status(http) == 503
            body = (await http.get("/health/ready")).json()
            assert "disk" in body["failed"], body
            fault_log = engine.output()[log_before_fault:]

            filler.unlink()
            deadline = time.monotonic() + 30
            while await _ready_status(http) != 200:  # no restart: the same process recovers
                assert time.monotonic() < deadline, (await http.get("/health/ready")).text
                await asyncio.sleep(0.2)
            again = [c for c, code in during.codes.items() if code != "AA"]
            assert await send_one_each(engine.mllp_port, again) == ["AA"] * len(again)
            after = SendLog()
            await send_until_closed(engine.mllp_port, "DF-AFTER", after, limit=5)
            assert after.acked() == list(after.codes) and len(after.codes) == 5, after.codes
        assert await engine.terminate() == 0, engine.output()[-3000:]
    finally:
        engine.kill()
        filler.unlink(missing_ok=True)

    # every message ACKed AA is stored exactly once; the negatively answered ones, sent again, too
    ids = [*before.codes, *during.codes, *after.codes]
    counts = sqlite_stored_counts(db, ids)
    assert set(counts.values()) == {1}, {c: n for c, n in counts.items() if n != 1}
    # bounded log volume: one line per failed commit and per message, no tracebacks
    assert "Traceback" not in fault_log
    assert len(fault_log) < 200_000, len(fault_log)
