"""Who used the machine's CPUs while a latency test ran: the test's own processes, or others.

A latency bound (issue 13's "the feed's ACK p99 stays under 200 ms") can be judged only on a
machine that runs the test and little else. The load average cannot tell: it lags by a minute, so
right after other work it is high while the CPUs are idle, and it counts processes waiting for the
disk too. So a test takes a :class:`CpuSample` before and after the part it times, from Linux's
``/proc``: the CPU time of the whole machine, of the processes it names as its own (itself, the
peers it started, PostgreSQL's backends), and the time a virtual machine's CPUs were taken by the
host (``steal``). :func:`share` turns two samples into what the test reports and decides on.
Off Linux, :func:`sample` returns None and the test judges as on a quiet machine.

A quiet machine can still be a slow one: a host whose cores run a third slower than the one a
bound was set on stretches every writer job by as much, and no process, no steal shows it (seen in
CI: half the Bundles of a quiet run, the feed's p99 at 239 ms). :func:`pace` times a fixed piece of
work of the writer's kind, which no code of the engine's is part of, against the time it took where
the bounds were set: a regression of the engine's changes the test's figures, never the pace.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    at: float  # seconds since boot (/proc/uptime)
    busy: int  # ticks of every CPU, idle and I/O wait left out, steal included
    steal: int
    ours: int  # ticks of the processes counted as the test's own


@dataclass(frozen=True)
class CpuShare:
    seconds: float
    others: float  # cores used on average by processes that are not the test's
    steal: float  # cores taken by the host on average

    def busy(self, limit: float = 0.5) -> bool:
        """Whether other work took more than ``limit`` of a core (or the host took it)."""
        return self.others + self.steal > limit

    def __str__(self) -> str:
        return f"other processes used {self.others:.2f} cores and the host stole {self.steal:.2f} over {self.seconds:.1f} s"


def _process_ticks(pid: int) -> tuple[str, int]:
    """(command name, user + system ticks) of ``pid``; ("", 0) when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return name, int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def sample(own_pids: set[int], own_names: tuple[str, ...] = ("postgres",)) -> CpuSample | None:
    """The machine's CPU time now, and that of ``own_pids`` and of every process whose command
    name starts with one of ``own_names``."""
    try:
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    ticks = [int(v) for v in cpu[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    ours = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        name, used = _process_ticks(int(entry.name))
        if int(entry.name) in own_pids or name.startswith(own_names):
            ours += used
    return CpuSample(uptime, busy, ticks[7], ours)


def share(before: CpuSample | None, after: CpuSample | None) -> CpuShare | None:
    """What other processes and the host took between two samples (a process of the test that
    exited in between counts as other work: sample while the test's processes run)."""
    if before is None or after is None or after.at <= before.at:
        return None
    seconds = after.at - before.at
    others = max(0, (after.busy - before.busy) - (after.steal - before.steal) - (after.ours - before.ours))
    return CpuShare(seconds, others / _TICKS / seconds, (after.steal - before.steal) / _TICKS / seconds)


#: The best of five runs of :func:`_reference_work` on the machine the latency bounds were set on (a
#: 2-core AMD EPYC, 2026-12-07: 20.0-21.3 ms; the slower of the two hosts seen).
REFERENCE_SECONDS = 0.0205


def _reference_work() -> float:
    """Seconds to build 4,000 small FHIR-like documents, serialise them and insert them with two
    indexes into an in-memory SQLite table, in one transaction: what a writer job does, in kind."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v TEXT, body TEXT)")
        conn.execute("CREATE INDEX t_k ON t (k)")
        conn.execute("CREATE INDEX t_v ON t (v, id)")
        started = time.perf_counter()
        rows = []
        for i in range(4000):
            doc = {
                "resourceType": "Practitioner",
                "id": f"p{i}",
                "active": True,
                "name": [{"family": "Osei", "given": ["Amara"]}],
                "identifier": [{"system": "urn:x", "value": f"F{i}"}],
            }
            rows.append(
                (hashlib.sha256(str(i).encode()).hexdigest(), f"v{(i * 7919) % 4000}", json.dumps(doc))
            )
        with conn:
            conn.executemany("INSERT INTO t (k, v, body) VALUES (?, ?, ?)", rows)
        return time.perf_counter() - started
    finally:
        conn.close()


def pace(runs: int = 5) -> float:
    """How many times longer than :data:`REFERENCE_SECONDS` this machine takes for the reference
    work (best of ``runs``), 1.0 at least: the factor by which it stretches a bound set there."""
    return max(1.0, min(_reference_work() for _ in range(runs)) / REFERENCE_SECONDS)
