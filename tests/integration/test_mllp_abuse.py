"""Issue 13 acceptance: abusive MLLP clients cannot starve a legitimate sender nor grow the engine.

The engine runs as its own process (``hms-ach run``, SQLite store), so that its RSS is its own. From
other loopback addresses (Linux routes all of 127/8 to lo):

* 200 idle or slowloris connections, one source address each (127.0.1.1-200), so that the
  per-source cap cannot help and the total cap must: a third stay silent, a third send a CR every
  second between frames, a third open a frame and send a byte a second. Each reconnects half a
  second after it is closed.
* 99 unterminated 15 MB frames from 127.0.0.2-9 (the per-source cap applies to them): each sender
  connects again while it is refused, then holds its frame open until the engine gives up on it.

Meanwhile a legitimate sender on 127.0.0.1 opens a new connection for every three messages (and,
like any MLLP sender, resends a message whose connection closed without an ACK). Its ACKs must come
back AA with a p99 under 200 ms, resends included, and the engine's peak RSS must stay under the
bound documented in docs/reliability.md ("MLLP limits"): RSS before the attack +
process_buffer_budget_bytes + max_connections x 512 KiB + 64 MiB of allocator and interpreter slack.
Run with ``-s`` to see the measurements.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hms_ach.hl7v2.mllp import CR, FS, VT, frame

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
BUDGET_BYTES = 64 * MIB
MAX_CONNECTIONS = 100
ATTACK_SECONDS = 12.0
LARGE_FRAME_BYTES = 15 * 1000 * 1000
SAMPLE = (ROOT / "samples/hl7/adt_a01.hl7").read_bytes()

pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def status(self, key: str) -> int:
        """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        assert m, text
        return int(m[1]) * 1024

    def events(self) -> Counter[str]:
        """How many times each event was logged, plus ``bytes_read``: the bytes the engine read."""
        counts: Counter[str] = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                counts[str(entry.get("event", ""))] += 1
                if entry.get("event") == "mllp.connection_closed":
                    counts["bytes_read"] += int(entry["fields"].get("bytes", 0))
        return counts


def start_engine(tmp_path: Path) -> Engine:
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(
        f"engine:\n  database_url: sqlite:///{tmp_path}/abuse.db\n  mappings: {ROOT / 'mappings'}\n"
        "  watch: false\nhttp:\n  enabled: false\njobs:\n  enabled: false\n"
        "channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
        f"    max_connections: {MAX_CONNECTIONS}\n    max_connections_per_source: 8\n"
        "    frame_timeout_seconds: 20\n    min_bytes_per_second: 1024\n    rate_window_seconds: 2\n"
        f"    process_buffer_budget_bytes: {BUDGET_BYTES}\n"
    )
    log = tmp_path / "engine.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hms_ach.app.cli", "run", "-c", str(cfg)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(rb'"mllp.listening".*"port": (\d+)', log.read_bytes())
        if m:
            return Engine(proc, log, int(m[1]))
        if proc.poll() is not None:
            raise AssertionError(f"engine exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("engine did not start listening within 60 s")


def stop_engine(engine: Engine) -> None:
    if engine.proc.poll() is None:
        engine.proc.send_signal(signal.SIGINT)
        try:
            engine.proc.wait(15)
        except subprocess.TimeoutExpired:
            engine.proc.kill()
            engine.proc.wait(5)


@dataclass
class Tally:
    connects: int = 0
    refused: int = 0
    closed_by_server: int = 0
    bytes_sent: int = 0


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(5):
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(4096) == b""
    except TimeoutError:
        return False


async def slowloris(i: int, port: int, tally: Tally) -> None:
    """Connection ``i`` of the 200: silent, CR chatter between frames, or a frame a byte a second."""
    kind = i % 3
    while True:
        try:
            reader, writer = await _connect(port, f"127.0.1.{i + 1}")
        except (OSError, TimeoutError):
            tally.refused += 1
            await asyncio.sleep(0.5)
            continue
        tally.connects += 1
        try:
            if kind == 2:
                writer.write(VT + b"MSH|")
            while True:
                if kind == 1:
                    writer.write(CR)
                elif kind == 2:
                    writer.write(b"x")
                await writer.drain()
                if await _closed_within(reader, 1.0):
                    tally.closed_by_server += 1
                    break
        except (ConnectionError, OSError):
            tally.closed_by_server += 1
        finally:
            writer.close()
        await asyncio.sleep(0.5)


async def large_frame(i: int, port: int, tally: Tally) -> None:
    """Sender ``i`` of the 99: one 15 MB frame that never ends, held until the server gives up on
    it. A connection closed within a second was refused (a cap), and the sender tries again."""
    chunk = b"OBX|1|ED|||" + b"A" * (256 * 1024)
    for _attempt in range(10):
        opened = time.monotonic()
        try:
            reader, writer = await _connect(port, f"127.0.0.{2 + i % 8}")
        except (OSError, TimeoutError):
            tally.refused += 1
            await asyncio.sleep(0.3)
            continue
        tally.connects += 1
        try:
            writer.write(VT + SAMPLE)
            if await _closed_within(reader, 0.2):
                raise ConnectionError("refused")  # spare this machine's CPU the bytes of a refused frame
            sent = 0
            while sent < LARGE_FRAME_BYTES:
                writer.write(chunk)
                async with asyncio.timeout(10):
                    await writer.drain()
                sent += len(chunk)
                tally.bytes_sent += len(chunk)
            while not await _closed_within(reader, 1.0):
                pass  # hold it, unterminated, until the server gives up
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
        tally.closed_by_server += 1
        if time.monotonic() - opened >= 1.0:
            return  # it was admitted and held: this sender's frame is spent
        await asyncio.sleep(0.3)


@dataclass
class Legit:
    latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    resends: int = 0
    resend_reasons: Counter[str] = field(default_factory=Counter)
    slowest: list[tuple[float, int, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    failures: list[str] = field(default_factory=list)


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(frame(payload))
    ack = b""
    while not ack.endswith(FS + CR):
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the ACK")
        ack += data
    return ack


def legitimate_sender(port: int, seconds: float, out: Legit, tag: str) -> None:
    """Blocking sender on 127.0.0.1, a new connection for every 3 messages. Like a real MLLP sender
    it resends a message on a new connection when one is closed without its ACK; the latency is
    from the first send to the ACK, resends included."""
    deadline = time.monotonic() + seconds
    n = 0
    sock: socket.socket | None = None
    on_connection = 0
    while time.monotonic() < deadline:
        n += 1
        payload = SAMPLE.replace(b"S-A01-0001", f"LEGIT-{tag}-{n:05d}".encode())
        started = time.perf_counter()
        ack = b""
        for _attempt in range(40):
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    out.connections += 1
                    on_connection = 0
                ack = _exchange(sock, payload)
                break
            except OSError as exc:
                out.resends += 1
                out.resend_reasons[type(exc).__name__] += 1
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(0.05)
        if not ack:
            out.failures.append(f"message {n}: no ACK after 40 attempts")
            continue
        took = time.perf_counter() - started
        on_connection += 1
        out.latencies.append(took)
        out.slowest.append((round(started - out.t0, 2), on_connection, round(took, 3)))
        m = re.search(rb"MSA\|(\w+)\|", ack)
        out.codes[m[1].decode() if m else "?"] += 1
        if on_connection == 3 and sock is not None:
            sock.close()
            sock = None
            time.sleep(0.05)
    if sock is not None:
        sock.close()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def test_abusive_clients_neither_starve_a_legitimate_sender_nor_grow_the_engine(tmp_path: Path) -> None:
    engine = await asyncio.to_thread(start_engine, tmp_path)
    try:
        warm = Legit()
        await asyncio.to_thread(legitimate_sender, engine.port, 0.5, warm, "W")
        assert warm.codes["AA"] >= 3, (warm, engine.log.read_text()[-3000:])
        rss_before = engine.status("VmRSS")
        bound = rss_before + BUDGET_BYTES + MAX_CONNECTIONS * 512 * 1024 + 64 * MIB

        slow, large = Tally(), Tally()
        attackers = [asyncio.create_task(slowloris(i, engine.port, slow)) for i in range(200)]
        attackers += [asyncio.create_task(large_frame(i, engine.port, large)) for i in range(99)]
        rss_samples: list[int] = []

        async def sample_rss() -> None:
            while True:
                rss_samples.append(engine.status("VmRSS"))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_rss())
        await asyncio.sleep(2.0)  # let the attack take hold
        legit = Legit()
        await asyncio.to_thread(legitimate_sender, engine.port, ATTACK_SECONDS, legit, "L")
        for task in [*attackers, sampler]:
            task.cancel()
        await asyncio.gather(*attackers, sampler, return_exceptions=True)
        peak = engine.status("VmHWM")
        events = engine.events()
        test_cpu = resource.getrusage(resource.RUSAGE_SELF)
        stat = Path(f"/proc/{engine.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        engine_cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        await asyncio.to_thread(stop_engine, engine)

    lat = sorted(legit.latencies)
    report = (
        f"legit: {len(lat)} ACKs on {legit.connections} connections, codes {dict(legit.codes)}, "
        f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99(lat) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
        f"slowest (s after start, message on connection, s) {sorted(legit.slowest, key=lambda x: -x[2])[:5]}; "
        f"resends {legit.resends} {dict(legit.resend_reasons)}; failures {legit.failures[:3]}; slowloris {slow}; large {large}; "
        f"RSS before {rss_before / MIB:.0f} MiB, max sampled {max(rss_samples) / MIB:.0f} MiB, "
        f"engine CPU {engine_cpu:.1f} s, test CPU {test_cpu.ru_utime + test_cpu.ru_stime:.1f} s; peak (VmHWM) {peak / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB; engine events "
        + str({k: v for k, v in events.items() if k != "mllp.connection_opened"})
    )
    print(report)
    # every defence was exercised
    assert events["mllp.connection_evicted"] > 0, report
    assert events["mllp.connection_rejected"] > 0, report
    assert events["mllp.frame_too_slow"] + events["mllp.frame_timeout"] > 0, report
    # the legitimate sender was served, fast
    assert not legit.failures, report
    assert len(lat) >= 50 and set(legit.codes) == {"AA"}, report
    assert p99(lat) < 0.200, report
    # and the engine stayed small
    assert peak < bound, report
    assert "Traceback" not in engine.log.read_text(errors="replace")
