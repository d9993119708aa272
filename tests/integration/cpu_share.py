"""Who used the machine's CPUs while a latency test ran: the test's own processes, or others.

A latency bound (issue 13's "the feed's ACK p99 stays under 200 ms") can be judged only on a
machine that runs the test and little else. The load average cannot tell: it lags by a minute, so
right after other work it is high while the CPUs are idle, and it counts processes waiting for the
disk too. So a test takes a :class:`CpuSample` before and after the part it times, from Linux's
``/proc``: the CPU time of the whole machine, of the processes it names as its own (itself, the
peers it started, PostgreSQL's backends), and the time a virtual machine's CPUs were taken by the
host (``steal``). :func:`share` turns two samples into what the test reports and decides on.
Off Linux, :func:`sample` returns None and the test judges as on a quiet machine.
"""

from __future__ import annotations

import os
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
