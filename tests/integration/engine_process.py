"""``hms-ach run`` as a real subprocess on a temporary channels.yaml, for the lifecycle and process
fault tests: start it (ports 0, learnt from its JSON log), signal it, wait for its exit, and drive
it with MLLP senders that record what each message got."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import text

from hms_ach.store.db import Store

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
VT, FS_CR = b"\x0b", b"\x1c\r"


class EngineProcess:
    """One ``hms-ach run`` process at a time on one channels.yaml (MLLP channel ``adt_in``, plus
    ``channels_yaml``); it can be started again on the same store. Its stderr (the JSON log) goes
    to ``log_path``."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        *,
        engine_yaml: str = "",
        sinks_yaml: str = "",
        http: bool = False,
        log_level: str = "INFO",
        channels_yaml: str = "",
    ):
        self.config = tmp_path / "channels.yaml"
        self.log_path = tmp_path / "engine.log"
        self.database_url = database_url
        self.http = http
        self.log_level = log_level
        self.config.write_text(
            f"engine:\n  mappings: {ROOT / 'mappings'}\n  watch: false\n"
            + engine_yaml
            + f"http:\n  enabled: {'true' if http else 'false'}\n  host: 127.0.0.1\n  port: 0\n"
            "channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
            "    idle_timeout_seconds: 10\n" + channels_yaml + (f"sinks:\n{sinks_yaml}" if sinks_yaml else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._offset = 0  # where this run's lines start in log_path
        self.mllp_port = 0
        self.http_port = 0
        self.ready_at = 0.0  # time.time() when this run's MLLP listener was up

    async def start(self, within: float = 90) -> None:
        """Start the process and wait until its MLLP listener (and HTTP, when enabled) is up."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        env = {**os.environ, "HMS_ACH_DATABASE_URL": self.database_url}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hms_ach.app.cli",
                "run",
                "-c",
                str(self.config),
                "--log-level",
                self.log_level,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
            cwd=self.config.parent,
        )
        deadline = time.monotonic() + within
        while True:
            listening = self.event("mllp.listening")
            http = self.event("http.started") if self.http else {"port": 0}
            if listening is not None and http is not None:
                self.mllp_port = int(listening["fields"]["port"])
                self.http_port = int(http["port"])
                self.ready_at = time.time()
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"hms-ach run exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"hms-ach run not listening within {within} s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.1)

    def output(self) -> str:
        """This run's stderr so far."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """This run's JSON log lines (other lines, such as the start banner, are skipped)."""
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        """The first log line of this run whose event is ``name``."""
        return next((e for e in self.events() if e.get("event") == name), None)

    async def wait_for_event(self, name: str, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while (found := self.event(name)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} within {within} s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)
        return found

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        """The exit code, which must come within ``within`` seconds."""
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"hms-ach run still running after {within} s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    async def terminate(self, within: float = 60) -> int:
        """SIGTERM and the exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait(within)

    def kill(self) -> None:
        """SIGKILL if still running (the tests' clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None


def a01(control_id: str, patient: str = "100001") -> bytes:
    """The sample A01 with MSH-10 ``control_id`` and PID-3 ``patient``, CR-separated."""
    raw = (SAMPLES / "adt_a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return raw.replace(b"S-A01-0001", control_id.encode(), 1).replace(b"100001^", patient.encode() + b"^", 1)


@dataclass
class SendLog:
    """What each message got: its MSA-1 code, or None when it was sent and no ACK came back."""

    codes: dict[str, str | None] = field(default_factory=dict)

    def acked(self, code: str = "AA") -> list[str]:
        return [c for c, got in self.codes.items() if got == code]

    def unanswered(self) -> list[str]:
        return [c for c, got in self.codes.items() if got is None]


async def send_until_closed(
    port: int,
    prefix: str,
    log: SendLog,
    *,
    keep_going: Callable[[], bool] = lambda: True,
    ack_wait: float = 30,
    limit: int = 100_000,
) -> None:
    """Send A01s ``<prefix>-<n>`` one after another on one connection, each after the previous ACK,
    until the engine closes the connection, ``keep_going()`` is false or ``limit`` are sent. A
    message whose ACK did not come (the connection closed, or ``ack_wait`` passed) is recorded with
    None; the sender stops there."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError):
        return
    try:
        for n in range(limit):
            if not keep_going():
                return
            control_id = f"{prefix}-{n}"
            try:
                writer.write(VT + a01(control_id, f"{prefix}{n}") + FS_CR)
                await writer.drain()
            except OSError:
                return  # not sent: nothing to record
            log.codes[control_id] = None
            try:
                ack = await asyncio.wait_for(reader.readuntil(FS_CR), ack_wait)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            msa = next(s for s in ack.strip(VT + FS_CR).split(b"\r") if s.startswith(b"MSA"))
            log.codes[control_id] = msa.split(b"|")[1].decode()
    finally:
        writer.close()


async def send_one_each(port: int, control_ids: list[str], ack_wait: float = 30) -> list[str | None]:
    """Resend: each control id again (same content, same patient) on one connection; their MSA-1."""
    codes: list[str | None] = []
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        for control_id in control_ids:
            prefix, n = control_id.rsplit("-", 1)
            writer.write(VT + a01(control_id, f"{prefix}{n}") + FS_CR)
            await writer.drain()
            ack = await asyncio.wait_for(reader.readuntil(FS_CR), ack_wait)
            msa = next(s for s in ack.strip(VT + FS_CR).split(b"\r") if s.startswith(b"MSA"))
            codes.append(msa.split(b"|")[1].decode())
    finally:
        writer.close()
    return codes


def stored_counts(store: Store, control_ids: list[str]) -> dict[str, int]:
    """Per control id, the stored messages that are not duplicates (1: stored exactly once)."""
    counts = dict.fromkeys(control_ids, 0)
    with store.read() as conn:
        rows = conn.execute(
            text("SELECT control_id, COUNT(*) FROM message WHERE status != 'duplicate' GROUP BY control_id")
        ).all()
    for control_id, count in rows:
        if control_id in counts:
            counts[control_id] = int(count)
    return counts


def sqlite_stored_counts(db: Path, control_ids: list[str]) -> dict[str, int]:
    """:func:`stored_counts` on an SQLite file, with a plain sqlite3 connection (closed at once)."""
    counts = dict.fromkeys(control_ids, 0)
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute(
            "SELECT control_id, COUNT(*) FROM message WHERE status != 'duplicate' GROUP BY control_id"
        ).fetchall()
    finally:
        conn.close()
    for control_id, count in rows:
        if control_id in counts:
            counts[control_id] = int(count)
    return counts
