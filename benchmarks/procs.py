"""Processes of a benchmark run: the engine (``hms-ach run``), the ceilings and the load drivers.

Every process started here is started by this module, remembered, and stopped by its own pid
(SIGINT first, so the engine shuts down as it does for a user's Ctrl-C; SIGKILL only if it hangs).
Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAPPINGS = REPO / "mappings"


class BenchmarkError(RuntimeError):
    """A benchmark could not be measured (a process died, a port never opened, a driver failed)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("HMS_ACH_DATABASE_URL", None)
    env.update(extra)
    return env


def hms_ach_command() -> list[str]:
    """``hms-ach`` as installed beside this Python (the console script), else ``python -m hms_ach.app.cli``."""
    beside = Path(sys.executable).with_name("hms-ach")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("hms-ach")
    return [found] if found else [sys.executable, "-m", "hms_ach.app.cli"]


def write_engine_config(
    folder: Path,
    database_url: str,
    mllp_port: int,
    http_port: int,
    secured: bool = False,
    map_workers: int = 0,
) -> Path:
    """A channels.yaml like the shipped one: one MLLP channel, a fhir_rest channel and the HTTP API, on
    loopback ports.

    ``secured``: authentication on (``auth.mode: local``, the key in ``folder/data``: the driver
    sends a token of :func:`bench_token`) and an access record per read; otherwise both off.
    ``map_workers``: ``engine.map_workers`` (0: parse and map in the engine process)."""
    path = folder / "channels.yaml"
    security = (
        "# authentication and the access audit on: the driver sends a token of the local issuer\n"
        "auth:\n  mode: local\naudit:\n  access_records: true\n"
        if secured
        else "# the load drivers send no bearer token: authentication off (allowed: every listener is loopback)\n"
        "auth:\n  mode: off\naudit:\n  access_records: false\n"
    )
    path.write_text(
        "# written by benchmarks/procs.py for one benchmark run\n"
        "engine:\n"
        f"  database_url: {database_url}\n"
        f"  mappings: {MAPPINGS}\n"
        "  timezone: UTC\n"
        "  watch: true\n"
        f"  map_workers: {map_workers}\n"
        f"  data_dir: {folder / 'data'}\n"
        "http:\n"
        "  host: 127.0.0.1\n"
        f"  port: {http_port}\n"
        "  rate_limit:\n"
        "    enabled: false  # the load drivers are one client sending as fast as they can\n"
        + security
        + "channels:\n"
        "  - name: adt_in\n"
        "    type: mllp\n"
        "    host: 127.0.0.1\n"
        f"    port: {mllp_port}\n"
        "    idle_timeout_seconds: 60\n"
        "    max_connections: 100\n"
        "  - name: fhir_in  # FHIR writes (figure C's create)\n"
        "    type: fhir_rest\n",
        encoding="utf-8",
    )
    return path


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return float("nan")


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the live child processes of ``pid`` (the engine's
    map workers), from /proc/<pid>/task/*/children; 0.0 without children."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                children = [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            used = cpu_seconds(child)
            total += 0.0 if used != used else used  # a child gone meanwhile counts nothing
    return total


class Service:
    """A long-running child process (the engine or a ceiling server) with its log in a file."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env or child_env(),
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ports(self, ports: list[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                raise BenchmarkError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BenchmarkError(
                    f"{self.name} did not open ports {pending} within {timeout:.0f} s:\n{self.log_tail()}"
                )
            pending = [p for p in pending if not port_open(p)]
            if pending:
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_fh.close()
        return self.proc.returncode

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_engine(
    folder: Path, database_url: str, secured: bool = False, map_workers: int = 0
) -> tuple[Service, int, int]:
    """``hms-ach run --config <folder>/channels.yaml`` on ``database_url``; returns (service, mllp, http)."""
    mllp, http = free_port(), free_port()
    config = write_engine_config(folder, database_url, mllp, http, secured, map_workers)
    svc = Service(
        "engine",
        [*hms_ach_command(), "run", "--config", str(config)],
        folder / "engine.log",
        folder,
        child_env(HMS_ACH_DATABASE_URL=database_url),
    )
    svc.wait_ports([mllp, http], timeout=90)
    return svc, mllp, http


def start_module(name: str, module: str, args: list[str], folder: Path, ports: list[int]) -> Service:
    svc = Service(name, [sys.executable, "-m", module, *args], folder / f"{name}.log", REPO)
    svc.wait_ports(ports, timeout=60)
    return svc


def run_driver(
    module: str,
    args: list[str],
    timeout: float,
    on_tick: Callable[[], None] | None = None,
    tick_seconds: float = 0.5,
) -> dict[str, Any]:
    """Run ``python -m module args`` to completion (at most ``timeout`` s) and parse its JSON output.

    ``on_tick`` is called every ``tick_seconds`` while it runs (memory sampling).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    chunks: dict[str, bytes] = {}

    def _read(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [
        threading.Thread(target=_read, args=(n, s), daemon=True)
        for n, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise BenchmarkError(f"{module} {' '.join(args)} did not finish within {timeout:.0f} s")
        if on_tick is not None:
            on_tick()
        try:
            proc.wait(tick_seconds)
        except subprocess.TimeoutExpired:
            pass
    for r in readers:
        r.join(10)
    out = chunks.get("out", b"").decode("utf-8", "replace").strip()
    err = chunks.get("err", b"").decode("utf-8", "replace").strip()
    if proc.returncode != 0 or not out:
        raise BenchmarkError(f"{module} failed (exit {proc.returncode}): {err[-2000:]}")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    if "error" in result:
        raise BenchmarkError(f"{module}: {result['error']}")
    return result


def bench_token(folder: Path) -> str:
    """A token of the local issuer of the engine whose config :func:`write_engine_config` wrote in
    ``folder`` (``hms-ach token``), that may create, read and search everything for a day."""
    out = subprocess.run(
        [*hms_ach_command(), "token", "--config", str(folder / "channels.yaml"), "--scope", "system/*.crs",
         "--sub", "bench-driver", "--ttl", "1d"],
        capture_output=True, text=True, timeout=60, check=True, env=child_env(), cwd=folder,
    )  # fmt: skip
    return out.stdout.strip()
