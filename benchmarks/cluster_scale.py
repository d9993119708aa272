"""The cluster figure: 1 and 2 ``hms-ach run`` instances on one PostgreSQL, the same MLLP load.

``python -m benchmarks.cluster_scale [--database URL] [--connections 8] [--seconds 15]``

For each instance count (1, then 2) on a fresh schema: the instances start (their own folders and
ports, one shared audit key), their RSS and database connections are read idle, then
``benchmarks.mllp_load`` drivers (one per instance, the connections split between them, each in a
process of its own) send ADT messages, each after the previous ACK, for ``--seconds``. Printed as
one JSON object: msg/s in all, and the CPU each process used in that window (engines, drivers, and
the PostgreSQL backends of the engines' connections), as a share of one core, so that a machine
with few cores shows what bounds the figure. RSS from /proc/<pid>/status; connections from
``pg_stat_activity`` by ``application_name``. While the load runs, the engines' active backends are
sampled every 100 ms for what they wait on (``backend_waits``), and each engine's log is counted
for conflict retries (deadlocks, unique-key races).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg

from benchmarks.procs import Service, cpu_seconds, memory_kb, run_driver, start_engine


def _admin(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.encode())
        return list(cur.fetchall()) if cur.description else []


def _backends(url: str, app: str) -> list[int]:
    rows = _admin(url, f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'")  # noqa: S608
    return [int(r[0]) for r in rows]


def _cpu(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


class WaitSampler:
    """Samples, every ``every`` seconds, what the engines' PostgreSQL backends are doing
    (``pg_stat_activity``: the wait event of each active backend, or ``cpu`` when it waits on
    nothing), so the output says whether commits queue on a lock, on the WAL flush or on CPU."""

    def __init__(self, url: str, app: str, every: float = 0.1):
        self.url, self.app, self.every = url, app, every
        self.counts: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        sql = (
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'cpu') FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'active'"
        )
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                self.samples += 1
                for (what,) in conn.execute(sql, (self.app,)).fetchall():
                    self.counts[what] = self.counts.get(what, 0) + 1

    def summary(self) -> dict[str, float]:
        """Per wait event: how many backends were in it on average (over the samples)."""
        n = max(1, self.samples)
        return {k: round(v / n, 2) for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}


def _conflict_retries(log: Path) -> int:
    """The deadlock and unique-key retries an engine logged (``store.conflict_retry``,
    ``message.conflict_retry``)."""
    try:
        return log.read_text(encoding="utf-8", errors="replace").count("conflict_retry")
    except OSError:
        return 0


def run(
    url: str, instances: int, connections: int, seconds: float, folder: Path, session: str = ""
) -> dict[str, Any]:
    schema = f"bench_cluster_{uuid.uuid4().hex[:10]}"
    app = f"hms-ach-{schema}"
    _admin(url, f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in url else "?"
    engine_url = f"{url}{sep}options=-csearch_path%3D{schema}{session}&application_name={app}"
    engines: list[tuple[Service, int, int]] = []
    try:
        for i in range(instances):
            home = folder / f"{instances}-{i}"
            home.mkdir()
            engines.append(start_engine(home, engine_url))
        time.sleep(2)  # the pools settle
        idle = {
            "rss_kib": [memory_kb(svc.pid).get("VmRSS", 0) for svc, _m, _h in engines],
            "database_connections": len(_backends(url, app)),
        }
        before_backends = _cpu(_backends(url, app))
        before_engines = [cpu_seconds(svc.pid) for svc, _m, _h in engines]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        results: list[dict[str, Any]] = []
        per = max(1, connections // instances)

        def drive(i: int, port: int) -> None:
            args = ["--port", str(port), "--connections", str(per), "--seconds", str(seconds)]
            args += ["--reps", "1", "--warmup", "5", "--tag", f"K{instances}E{i}{uuid.uuid4().hex[:4]}"]
            results.append(run_driver("benchmarks.mllp_load", args, timeout=seconds + 120))

        started = time.monotonic()
        threads = [
            threading.Thread(target=drive, args=(i, mllp)) for i, (_svc, mllp, _h) in enumerate(engines)
        ]
        with WaitSampler(url, app) as waits:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall = time.monotonic() - started
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        engine_cpu = [
            cpu_seconds(svc.pid) - b for (svc, _m, _h), b in zip(engines, before_engines, strict=True)
        ]
        after_backends = _cpu(_backends(url, app))
        backend_cpu = sum(v - before_backends.get(pid, 0.0) for pid, v in after_backends.items())
        driver_cpu = (after_children.ru_utime + after_children.ru_stime) - (
            children.ru_utime + children.ru_stime
        )
        rates = [r["runs"][0]["msg_per_s"] for r in results]
        codes: dict[str, int] = {}
        for r in results:
            for code, n in r["runs"][0]["codes"].items():
                codes[code] = codes.get(code, 0) + n
        return {
            "instances": instances,
            "connections": per * instances,
            "msg_per_s": round(sum(rates), 1),
            "codes": codes,
            "ack_p99_ms": [r["runs"][0].get("p99_ms") for r in results],
            "idle": idle,
            "loaded_rss_kib": [memory_kb(svc.pid).get("VmRSS", 0) for svc, _m, _h in engines],
            "loaded_database_connections": len(after_backends),
            "wall_seconds": round(wall, 2),
            # the engines' active backends by what they waited on (mean count per sample);
            # Lock:advisory is the audit chain's lock, Lock:transactionid a row another holds
            "backend_waits": waits.summary(),
            "conflict_retries": [_conflict_retries(svc.log) for svc, _m, _h in engines],
            # a share of one core over the whole window (drivers include their warm-up and start)
            "cpu_share": {
                "engines": [round(c / wall, 2) for c in engine_cpu],
                "drivers": round(driver_cpu / wall, 2),
                "postgres_backends": round(backend_cpu / wall, 2),
            },
        }
    finally:
        for svc, _m, _h in engines:
            svc.stop()
        _admin(url, f'DROP SCHEMA "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--database", default=os.environ.get("HMS_ACH_TEST_POSTGRES_URL", ""))
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument(
        "--deadlock-timeout",
        default="",
        help="the engines' sessions' deadlock_timeout (e.g. 100ms; needs a superuser); default: the server's",
    )
    args = p.parse_args(argv)
    session = f"%20-cdeadlock_timeout%3D{args.deadlock_timeout}" if args.deadlock_timeout else ""
    if not args.database:
        raise SystemExit("give --database postgresql://... (or set HMS_ACH_TEST_POSTGRES_URL)")
    with tempfile.TemporaryDirectory(prefix="hms-ach-cluster-") as tmp:
        folder = Path(tmp)
        os.environ["HMS_ACH_AUDIT_KEY_FILE"] = str(folder / "audit.key")  # one key for the instances
        out: dict[str, Any] = {
            "cores": os.cpu_count(),
            "deadlock_timeout": args.deadlock_timeout or "server default",
            "runs": [run(args.database, n, args.connections, args.seconds, folder, session) for n in (1, 2)],
        }
    one, two = out["runs"]
    out["ratio_2_to_1"] = round(two["msg_per_s"] / one["msg_per_s"], 2) if one["msg_per_s"] else None
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
