"""The figures, A to F. Each function measures one figure and its ceilings or peers in the same
run, and returns a JSON-ready dict (every sample kept, with median/min/max).

The engine and the ceiling servers run in their own processes and are driven by load processes of
their own (:mod:`benchmarks.mllp_load`, :mod:`benchmarks.http_load`); only figure A, which is
in-process by definition, and the bare commit and store ceilings run in this process.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from benchmarks import procs
from benchmarks.bulk_load import BulkLoader, LoadState
from benchmarks.data import a01_messages, roster_csv
from benchmarks.stats import summary

SEED = 20261126
PG_URL = os.environ.get("HMS_ACH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Mode:
    """How much each figure measures. ``reps`` repetitions of ``*_seconds`` each, everywhere."""

    name: str
    reps: int
    a_messages: int  # messages per repetition for pipeline.evaluate and hl7.parse
    a_hl7apy: int  # messages per repetition for hl7apy (slow)
    b_seconds: float
    b_echo_seconds: float
    b_commit_seconds: float
    c_sizes: tuple[int, ...]
    c_seconds: float
    c_load_budget_seconds: float  # stop growing the store after this much loading (all sizes together)
    d_rows: int  # rows of the generated staff roster CSV
    e_messages: int
    e_seconds: float
    f_sizes: tuple[int, ...]
    f_default: bool  # run F (PostgreSQL) unless told not to


MODES = {
    "smoke": Mode(
        "smoke",
        reps=2,
        a_messages=20,
        a_hl7apy=2,
        b_seconds=0.6,
        b_echo_seconds=0.4,
        b_commit_seconds=0.2,
        c_sizes=(200,),
        c_seconds=0.4,
        c_load_budget_seconds=30,
        d_rows=300,
        e_messages=100,
        e_seconds=3,
        f_sizes=(200,),
        f_default=False,
    ),
    "quick": Mode(
        "quick",
        reps=3,
        a_messages=300,
        a_hl7apy=12,
        b_seconds=2.0,
        b_echo_seconds=1.0,
        b_commit_seconds=0.5,
        c_sizes=(10_000,),
        c_seconds=1.5,
        c_load_budget_seconds=60,
        d_rows=3_000,
        e_messages=20_000,
        e_seconds=20,
        f_sizes=(10_000,),
        f_default=False,
    ),
    "full": Mode(
        "full",
        reps=5,
        a_messages=2000,
        a_hl7apy=40,
        b_seconds=8.0,
        b_echo_seconds=3.0,
        b_commit_seconds=2.0,
        c_sizes=(100_000, 1_000_000),
        c_seconds=4.0,
        c_load_budget_seconds=900,
        d_rows=100_000,
        e_messages=1_000_000,
        e_seconds=300,
        f_sizes=(100_000,),
        f_default=True,
    ),
}


class Run:
    """One benchmark run: its mode, its temporary folder, progress messages."""

    def __init__(self, mode: Mode, keep: bool = False):
        self.mode = mode
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"hms-ach-bench-{mode.name}-"))
        self.keep = keep
        #: ``engine.map_workers`` values figure B runs with, back to back (``--map-workers``)
        self.map_workers: list[int] = [0]

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cleanup(self) -> None:
        if not self.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def _cpu_rate(fn: Callable[[Any], Any], items: list[Any]) -> float:
    """Items per second of this thread's CPU time: what figure A reports, so that other processes
    on a shared machine do not count (on an idle machine it equals the wall-clock rate)."""
    t0 = time.thread_time()
    for item in items:
        fn(item)
    return len(items) / max(time.thread_time() - t0, 1e-9)


def _runs_summary(runs: list[dict[str, Any]], rate_key: str) -> dict[str, Any]:
    return {
        rate_key: summary([r[rate_key] for r in runs]),
        "p50_ms": summary([r["p50_ms"] for r in runs]),
        "p99_ms": summary([r["p99_ms"] for r in runs]),
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------- A
def figure_a(run: Run) -> dict[str, Any]:
    """In-process parse + map of ADT^A01 (pipeline.evaluate), one thread, against parsers alone."""
    import hl7

    from hms_ach.hl7v2.policy import Hl7Policy
    from hms_ach.ingest.pipeline import evaluate
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    m = run.mode
    messages = a01_messages(max(m.a_messages, 50), seed=SEED, tag="A")
    mapping = MappingEngine(load_mappings(procs.MAPPINGS), "UTC")
    policy = Hl7Policy("bench")
    errors = [str(ev.error) for ev in (evaluate(x, policy, mapping) for x in messages) if ev.error]
    if errors:
        raise procs.BenchmarkError(f"figure A: generated ADT^A01 messages failed to map: {errors[:3]}")
    sizes = [len(x) for x in messages]

    def evaluate_one(raw: bytes) -> None:
        ev = evaluate(raw, policy, mapping)
        if ev.result is None:
            raise procs.BenchmarkError(f"evaluate failed: {ev.error}")

    def hl7_parse(raw: bytes) -> None:
        hl7.parse(raw.decode("utf-8"))

    def split_components(raw: bytes) -> None:
        [[f.split("^") for f in seg.split("|")] for seg in raw.decode("utf-8").split("\r")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from hl7apy.parser import parse_message

        def hl7apy_parse(raw: bytes) -> None:
            parse_message(raw.decode("utf-8"))

        work = messages[: m.a_messages]
        hl7apy_work = messages[: m.a_hl7apy]
        for fn in (evaluate_one, hl7_parse, split_components):  # warm caches and the allocator
            _cpu_rate(fn, work[:20])
        hl7apy_parse(messages[0])
        samples: dict[str, list[float]] = {"evaluate": [], "hl7_parse": [], "hl7apy": [], "split": []}
        for _ in range(m.reps):
            samples["evaluate"].append(_cpu_rate(evaluate_one, work))
            samples["hl7_parse"].append(_cpu_rate(hl7_parse, work))
            samples["hl7apy"].append(_cpu_rate(hl7apy_parse, hl7apy_work))
            samples["split"].append(_cpu_rate(split_components, work * 5))
    run.say(
        f"A: evaluate {summary(samples['evaluate'])['median']:.0f} msg/s, "
        f"hl7.parse {summary(samples['hl7_parse'])['median']:.0f}, hl7apy {summary(samples['hl7apy'])['median']:.1f}"
    )
    return {
        "title": "In-process parse + map of ADT^A01 to canonical records, one thread (msg/s)",
        "messages": {
            "count": len(work),
            "distinct": len(set(work)),
            "mean_bytes": round(sum(sizes) / len(sizes)),
            "hl7apy_count": len(hl7apy_work),
        },
        "evaluate_msg_per_s": summary(samples["evaluate"]),
        "hl7_parse_msg_per_s": summary(samples["hl7_parse"]),
        "hl7apy_msg_per_s": summary(samples["hl7apy"]),
        "split_msg_per_s": summary(samples["split"]),
        "notes": [
            "evaluate = hms_ach.ingest.pipeline.evaluate: MSH checks, decode, parse, the shipped mappings",
            "hl7.parse and hl7apy parse_message include decoding the bytes, nothing else",
            "split = str.split to segments, fields and components: no escapes, no objects",
            "rates are per second of the measuring thread's CPU time (time.thread_time)",
        ],
    }


# ------------------------------------------------------------------------------------------- B
def _mllp_args(
    port: int,
    connections: int,
    seconds: float,
    reps: int,
    tag: str,
    warmup: int = 0,
    cycle: int = 0,
    count: int = 1_000_000,
) -> list[str]:
    args = [
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        "--reps",
        str(reps),
        "--tag",
        tag,
        "--seed",
        str(SEED),
        "--count",
        str(count),
    ]
    if warmup:
        args += ["--warmup", str(warmup)]
    if cycle:
        args += ["--cycle", str(cycle)]
    return args


def _drive_engine(
    run: Run, engine: procs.Service, port: int, connections: int, seconds: float, tag: str
) -> dict[str, Any]:
    m = run.mode
    cpu0, t0 = procs.cpu_seconds(engine.pid), time.monotonic()
    workers0 = procs.children_cpu_seconds(engine.pid)
    result = procs.run_driver(
        "benchmarks.mllp_load",
        _mllp_args(port, connections, seconds, m.reps, tag, warmup=max(3, 20 // connections)),
        timeout=m.reps * seconds + 120,
    )
    cpu = procs.cpu_seconds(engine.pid) - cpu0
    workers_cpu = procs.children_cpu_seconds(engine.pid) - workers0
    wall = time.monotonic() - t0
    out = _runs_summary(result["runs"], "msg_per_s")
    out["warmup"] = result.get("warmup")
    out["generated_mix"] = result.get("generated_mix")
    codes: dict[str, int] = {}
    for r in result["runs"]:
        for code, n in r["codes"].items():
            codes[code] = codes.get(code, 0) + n
    out["ack_codes"] = codes
    out["engine_cpu_percent"] = round(100 * cpu / wall, 1) if wall else None
    if run.map_workers != [0]:  # the worker processes' CPU (engine.map_workers), all of them together
        out["map_workers_cpu_percent"] = round(100 * workers_cpu / wall, 1) if wall else None
    out["load_average"] = os.getloadavg()
    bad = {c: n for c, n in codes.items() if c not in ("AA", "CA")}
    if bad:
        out["problem"] = f"ACKs other than AA: {bad} (see the engine log)"
    return out


def commit_ceiling_sqlite(folder: Path, seconds: float, reps: int, payload_bytes: int) -> dict[str, Any]:
    """A bare SQLite insert loop, WAL + synchronous=FULL, one row (a message-sized blob) per commit."""
    path = folder / "commit-ceiling.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE IF NOT EXISTS message (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
    blob = os.urandom(payload_bytes)
    samples = []
    try:
        for _ in range(reps):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds and n < 1_000_000:
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO message (raw) VALUES (?)", (blob,))
                con.execute("COMMIT")
                n += 1
            samples.append(n / (time.perf_counter() - t0))
    finally:
        con.close()
    return {
        "commits_per_s": summary(samples),
        "payload_bytes": payload_bytes,
        "how": "sqlite3, WAL, synchronous=FULL, BEGIN IMMEDIATE; INSERT one row; COMMIT",
    }


def commit_ceiling_postgres(
    url: str, schema: str, seconds: float, reps: int, payload_bytes: int
) -> dict[str, Any]:
    """A bare PostgreSQL insert loop (psycopg, autocommit: one row per commit, synchronous_commit on)."""
    import psycopg

    blob = os.urandom(payload_bytes)
    samples = []
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".commit_ceiling (id bigserial PRIMARY KEY, raw bytea)'
        )
        sync = con.execute("SHOW synchronous_commit").fetchone()
        for _ in range(reps):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds and n < 1_000_000:
                con.execute(f'INSERT INTO "{schema}".commit_ceiling (raw) VALUES (%s)', (blob,))
                n += 1
            samples.append(n / (time.perf_counter() - t0))
    return {
        "commits_per_s": summary(samples),
        "payload_bytes": payload_bytes,
        "how": f"psycopg autocommit INSERT, synchronous_commit={sync[0] if sync else '?'}",
    }


def echo_ceiling(run: Run) -> dict[str, Any]:
    """The no-parse MLLP echo server, driven exactly like the engine."""
    m = run.mode
    folder = run.folder("b-echo")
    port = procs.free_port()
    out: dict[str, Any] = {"how": "hms_ach.hl7v2.mllp.MllpServer, handler returns a fixed ACK (own process)"}
    with procs.start_module("echo", "benchmarks.echo_server", ["--port", str(port)], folder, [port]):
        for conns in (1, 8):
            result = procs.run_driver(
                "benchmarks.mllp_load",
                _mllp_args(port, conns, m.b_echo_seconds, m.reps, f"E{conns}", warmup=20, cycle=200),
                timeout=m.reps * m.b_echo_seconds + 60,
            )
            out[f"{conns}_connection" + ("s" if conns > 1 else "")] = _runs_summary(
                result["runs"], "msg_per_s"
            )
    return out


def figure_b(run: Run, database_url: str | None = None, label: str = "sqlite") -> dict[str, Any]:
    """MLLP ingest end to end: ``hms-ach run`` in its own process, one and eight senders; once per
    ``engine.map_workers`` value of ``run.map_workers`` (``--map-workers``), back to back. The first
    value's figures are the top-level ones; with several, ``by_map_workers`` holds each."""
    if run.map_workers == [0] or database_url is not None:  # PostgreSQL (F): one store, the first value
        return _figure_b_once(run, database_url, label, run.map_workers[0])
    by = {str(n): _figure_b_once(run, None, f"{label}-w{n}", n) for n in run.map_workers}
    out = dict(by[str(run.map_workers[0])])
    out["database"] = label
    out["by_map_workers"] = by
    out["map_workers_note"] = (
        "each map_workers value ran on a fresh engine and store, one after another in this run; "
        f"{os.cpu_count()} cores, shared with whatever else ran (see load_average)"
    )
    return out


def _figure_b_once(run: Run, database_url: str | None, label: str, map_workers: int) -> dict[str, Any]:
    m = run.mode
    folder = run.folder(f"b-{label}")
    url = database_url or f"sqlite:///{folder}/engine.db"
    engine, mllp, _http = procs.start_engine(folder, url, map_workers=map_workers)
    out: dict[str, Any] = {"database": label.split("-w")[0], "map_workers": map_workers}
    try:
        out["rss_kb_after_start"] = procs.memory_kb(engine.pid)
        out["1_connection"] = _drive_engine(run, engine, mllp, 1, m.b_seconds, f"B{label[:2]}1")
        run.say(f"B[{label}] 1 connection: {out['1_connection']['msg_per_s']['median']} msg/s")
        out["8_connections"] = _drive_engine(run, engine, mllp, 8, m.b_seconds, f"B{label[:2]}8")
        run.say(f"B[{label}] 8 connections: {out['8_connections']['msg_per_s']['median']} msg/s")
        out["rss_kb_at_end"] = procs.memory_kb(engine.pid)
    finally:
        rc = engine.stop()
        out["engine_exit_code"] = rc
    if rc not in (0, None):
        out["problem"] = f"hms-ach run exited with {rc}: {engine.log_tail(500)}"
    return out


# ------------------------------------------------------------------------------------------- C
KINDS = ("read", "family", "encounter")
#: Measured after the searches, with and without authentication and the access audit: FHIR ingest.
WRITE_KINDS = ("create",)
#: Rounds of (off, on) for the cost of authentication and the access audit (figure C).
SECURED_ROUNDS = 2


def _store_ceiling(url: str, targets: dict[str, Any], seconds: float, reps: int) -> dict[str, Any]:
    """The same reads and searches in this process, one thread, straight on the store (no HTTP)."""
    from sqlalchemy import select

    from hms_ach.store import search
    from hms_ach.store.db import Store
    from hms_ach.store.models import RECORD_TABLES

    store = Store(url)
    t = RECORD_TABLES["Practitioner"].__table__  # type: ignore[attr-defined]
    rng = random.Random(SEED)

    def read(conn: Any) -> None:
        rid = rng.choice(targets["practitioner_ids"])
        conn.execute(
            select(t.c.version_id, t.c.last_updated, t.c.deleted, t.c.resource).where(t.c.id == rid)
        ).first()

    def family(conn: Any) -> None:
        q = search.parse_query(
            "Practitioner", [("family", rng.choice(targets["families"])), ("_count", "20")]
        )
        search.execute(conn, q)

    def encounter(conn: Any) -> None:
        q = search.parse_query(
            "Encounter",
            [
                ("patient", f"Patient/{rng.choice(targets['patients'])}"),
                ("date", f"ge{targets['date_ge']}"),
                ("_include", "Encounter:location"),
            ],
        )
        search.execute(conn, q)

    out: dict[str, Any] = {}
    try:
        for name, fn in (("read", read), ("family", family), ("encounter", encounter)):
            samples = []
            for _ in range(reps):
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds and n < 200_000:
                    with store.reader.connect() as conn, conn.begin():
                        fn(conn)
                    n += 1
                samples.append(n / (time.perf_counter() - t0))
            out[name] = {"queries_per_s": summary(samples)}
    finally:
        store.dispose()
    return out


def http_ceiling(run: Run) -> dict[str, Any]:
    m = run.mode
    folder = run.folder("c-http-echo")
    port = procs.free_port()
    with procs.start_module("http-echo", "benchmarks.http_echo", ["--port", str(port)], folder, [port]):
        result = procs.run_driver(
            "benchmarks.http_load",
            [
                "--port",
                str(port),
                "--kind",
                "ping",
                "--seconds",
                str(m.c_seconds),
                "--reps",
                str(m.reps),
                "--warmup",
                "100",
                "--concurrency",
                "8",
            ],
            timeout=m.reps * m.c_seconds + 60,
        )
    out = _runs_summary(result["runs"], "req_per_s")
    out["how"] = "uvicorn (same settings as the engine) serving a bare ASGI app: fixed 1.2 KB JSON body"
    return out


def figure_c(
    run: Run, database_url: str | None = None, label: str = "sqlite", sizes: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """The FHIR API over a store bulk-loaded to each size in turn (the store grows between sizes)."""
    m = run.mode
    sizes = sizes or m.c_sizes
    folder = run.folder(f"c-{label}")
    url = database_url or f"sqlite:///{folder}/api.db"
    state = LoadState(seed=SEED)
    out: dict[str, Any] = {"database": label, "sizes": {}}
    loading_spent = 0.0  # the budget counts loading only, not the measurements between sizes
    for size in sizes:
        patients = max(20, size // 10)
        run.say(f"C[{label}]: loading {size:,} Practitioners, {patients:,} Patients and their Encounters ...")
        loader = BulkLoader(url, state)
        loader.begin()
        t0 = time.perf_counter()
        try:
            load_deadline = time.monotonic() + m.c_load_budget_seconds - loading_spent
            complete = loader.grow(size, patients, deadline=load_deadline)
        finally:
            loader.finish()
        load_seconds = time.perf_counter() - t0
        loading_spent += load_seconds
        counts = state.counts()
        key = str(counts["Practitioner"])
        entry: dict[str, Any] = {
            "requested_practitioners": size,
            "counts": counts,
            "complete": complete,
            "load_seconds": round(load_seconds, 1),
            "rows_total": state.rows,
        }
        if not complete:
            entry["note"] = (
                f"loading stopped by the {m.c_load_budget_seconds:.0f} s load budget at "
                f"{counts['Practitioner']:,} of {size:,} Practitioners; measured at that size"
            )
        if url.startswith("sqlite:///"):
            db_file = Path(url[len("sqlite:///") :])
            entry["database_mb"] = round(db_file.stat().st_size / 1e6, 1)
        run.say(f"C[{label}]: loaded {counts} in {load_seconds:.0f} s; starting hms-ach run")
        targets_file = folder / f"targets-{key}.json"
        targets = state.targets()
        targets_file.write_bytes(orjson.dumps(targets))
        # The same kinds with authentication and the access audit off, then on (issue 14 "Cost"):
        # the "<kind>" entries are off (as before), "<kind>_secured" on, "<kind>_secured_ratio" on/off.
        # The two variants alternate for SECURED_ROUNDS rounds (off, on, off, on), each round with
        # its own engine, so that a drift of the machine's load falls on both alike.
        runs: dict[str, list[dict[str, Any]]] = {}
        for _round in range(SECURED_ROUNDS):
            for secured in (False, True):
                engine, _mllp, http = procs.start_engine(folder, url, secured=secured)
                extra: list[str] = []
                if secured:
                    token_file = folder / "bench-token.txt"
                    token_file.write_text(procs.bench_token(folder))
                    extra = ["--token-file", str(token_file)]
                suffix = "_secured" if secured else ""
                try:
                    for kind in KINDS + WRITE_KINDS:
                        result = procs.run_driver(
                            "benchmarks.http_load",
                            [
                                "--port",
                                str(http),
                                "--kind",
                                kind,
                                "--targets",
                                str(targets_file),
                                "--seconds",
                                str(m.c_seconds),
                                "--reps",
                                str(m.reps),
                                "--warmup",
                                "40",
                                "--concurrency",
                                "8",
                                "--seed",
                                str(SEED),
                                "--timeout",
                                "120",
                                *extra,
                            ],
                            timeout=m.reps * (m.c_seconds + 120) + 180,
                        )
                        runs.setdefault(kind + suffix, []).extend(result["runs"])
                        summary_now = _runs_summary(result["runs"], "req_per_s")
                        run.say(
                            f"C[{label}] {key} {kind}{' (auth+audit on)' if secured else ''}, round "
                            f"{_round + 1}: {summary_now['req_per_s']['median']} req/s, "
                            f"p99 {summary_now['p99_ms']['median']} ms"
                        )
                finally:
                    engine.stop()
        for name, kind_runs in runs.items():
            entry[name] = _runs_summary(kind_runs, "req_per_s")
            good = "201" if name.removesuffix("_secured") in WRITE_KINDS else "200"
            bad = {s: n for r in kind_runs for s, n in r["statuses"].items() if s != good}
            if bad:
                entry[name]["problem"] = f"non-{good} responses: {bad}"
        for kind in KINDS + WRITE_KINDS:
            off, on = entry[kind]["req_per_s"]["median"], entry[kind + "_secured"]["req_per_s"]["median"]
            entry[kind + "_secured_ratio"] = round(on / off, 3) if off else None
            run.say(f"C[{label}] {key} {kind}: auth+audit on / off = {entry[kind + '_secured_ratio']}")
        entry["store_ceiling"] = _store_ceiling(url, targets, m.c_seconds / 2, m.reps)
        out["sizes"][key] = entry
        if not complete:
            break
    return out


# ------------------------------------------------------------------------------------------- D
_AN_HOUR_AGO = 3600.0


def _put_old(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` dated an hour ago, so min_file_age_seconds is met."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - _AN_HOUR_AGO
    os.utime(path, (then, then))


async def _poll_roster(settings: dict[str, Any], url: str, mapping: Any) -> tuple[Any, float, float, int]:
    """One poll of the sftp_csv channel on a fresh store: (PollResult, seconds, CPU seconds, Practitioners)."""
    from sqlalchemy import func, select

    from hms_ach.channels.sftp_csv import SftpCsvChannel, SftpCsvConfig
    from hms_ach.ingest.pipeline import Pipeline
    from hms_ach.store.db import Store
    from hms_ach.store.models import RECORD_TABLES

    Practitioner = RECORD_TABLES["Practitioner"]
    from hms_ach.app.wiring import wire_listeners
    from hms_ach.store.writer import StoreWriter

    wire_listeners()  # the roster's records write their events, as in the engine
    store = Store(url)  # tables are created here, before the clock starts
    writer = StoreWriter(store)
    writer.start()
    try:
        channel = SftpCsvChannel(SftpCsvConfig.model_validate(settings), Pipeline(writer, mapping))
        await channel.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = await channel.poll()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        with store.reader.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(Practitioner.__table__)).scalar_one()  # type: ignore[attr-defined]
    finally:
        writer.stop()
        store.dispose()
    return result, seconds, cpu, int(stored)


async def _download_rates(
    port: int, password: str, known_hosts: Path, remote: str, reps: int
) -> tuple[list[float], float]:
    """The raw SFTP read of one file, as the channel reads it (same chunk size), nothing else:
    seconds per repetition on one connection, and the connect + login seconds."""
    import asyncssh

    from hms_ach.ingest.files import CHUNK_BYTES

    t0 = time.perf_counter()
    async with await asyncssh.connect(
        "127.0.0.1",
        port=port,
        username="bench",
        password=password,
        known_hosts=str(known_hosts),
        agent_path=None,
        config=[],
        preferred_auth="password",
    ) as conn:
        async with conn.start_sftp_client() as sftp:
            connect = time.perf_counter() - t0
            times = []
            for _ in range(reps):
                t1 = time.perf_counter()
                async with sftp.open(remote, "rb") as src:
                    while await src.read(CHUNK_BYTES):
                        pass
                times.append(time.perf_counter() - t1)
    return times, connect


def _csv_alone(path: Path) -> tuple[int, float]:
    """Python's csv module alone over the same file (as the channel opens it): (data rows, seconds)."""
    import csv

    t0 = time.perf_counter()
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        next(reader)
        n = sum(1 for _ in reader)
    return n, time.perf_counter() - t0


def figure_d(run: Run) -> dict[str, Any]:
    """One poll of the sftp_csv channel over a generated staff roster, against the csv module alone
    and the raw SFTP download of the same file."""
    import asyncio

    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    m = run.mode
    folder = run.folder("d")
    root = folder / "sftp"
    data = roster_csv(m.d_rows, seed=SEED)
    local = folder / "roster.csv"
    local.write_bytes(data)
    mb = len(data) / 1e6
    mapping = MappingEngine(load_mappings(procs.MAPPINGS), "UTC")
    port = procs.free_port()
    polls: list[dict[str, Any]] = []
    run.say(f"D: {m.d_rows:,} roster rows ({mb:.1f} MB); {m.reps} polls, each on a fresh SQLite store")
    with procs.start_module(
        "sftp", "benchmarks.sftp_server", ["--root", str(root), "--port", str(port)], folder, [port]
    ) as server:
        password = (root / "password").read_text(encoding="ascii").strip()
        settings: dict[str, Any] = {
            "name": "roster_bench",
            "type": "sftp_csv",
            "host": "127.0.0.1",
            "port": port,
            "username": "bench",
            "password": password,
            "known_hosts": str(root / "known_hosts"),
            "dataset": "staff_roster",
            "glob": "roster-*.csv",
            "min_file_age_seconds": 60,
            "stable_seconds": 0,
            "work_dir": str(folder / "work"),
        }
        for rep in range(m.reps):
            _put_old(root / "inbox" / f"roster-{rep}.csv", data)
            server_cpu0 = procs.cpu_seconds(server.pid)
            result, seconds, cpu, stored = asyncio.run(
                _poll_roster(settings, f"sqlite:///{folder}/store-{rep}.db", mapping)
            )
            files = result.files
            if (
                result.error
                or len(files) != 1
                or files[0].status != "processed"
                or files[0].stored != m.d_rows
            ):
                raise procs.BenchmarkError(
                    f"figure D: poll {rep} did not store every row: {result.summary()}"
                    f"; errors {files[0].errors[:3] if files else None}"
                )
            if stored != m.d_rows:
                raise procs.BenchmarkError(f"figure D: {stored} Practitioners stored, expected {m.d_rows}")
            polls.append(
                {
                    "seconds": round(seconds, 3),
                    "rows_per_s": m.d_rows / seconds,
                    "engine_cpu_percent": round(100 * cpu / seconds, 1),
                    "sftp_server_cpu_percent": round(
                        100 * (procs.cpu_seconds(server.pid) - server_cpu0) / seconds, 1
                    ),
                }
            )
            run.say(f"D: poll {rep + 1}: {m.d_rows / seconds:,.0f} rows/s ({seconds:.1f} s)")
        _put_old(root / "raw" / "roster.csv", data)
        dl_times, connect = asyncio.run(
            _download_rates(port, password, root / "known_hosts", "raw/roster.csv", m.reps + 1)
        )
    dl_times = dl_times[1:]  # the first read warms the server's page cache and the connection
    csv_runs = [_csv_alone(local) for _ in range(m.reps + 1)][1:]
    if any(n != m.d_rows for n, _ in csv_runs):
        raise procs.BenchmarkError(
            f"figure D: the csv module read {csv_runs[0][0]} rows, expected {m.d_rows}"
        )
    out: dict[str, Any] = {
        "title": "SFTP CSV: one poll of a generated staff roster (rows/s)",
        "rows": m.d_rows,
        "file_bytes": len(data),
        "bytes_per_row": round(len(data) / (m.d_rows + 1), 1),
        "poll_rows_per_s": summary([p["rows_per_s"] for p in polls]),
        "poll_seconds": summary([p["seconds"] for p in polls]),
        "polls": polls,
        "csv_rows_per_s": summary([n / s for n, s in csv_runs]),
        "download_mb_per_s": summary([mb / s for s in dl_times]),
        "download_rows_per_s": summary([m.d_rows / s for s in dl_times]),
        "sftp_connect_seconds": round(connect, 3),
        "notes": [
            "poll = SftpCsvChannel.poll() in the benchmark process (writer thread, mapping thread) on a "
            "fresh SQLite file (WAL, synchronous=FULL), the asyncssh SFTP server in its own process: "
            "connect and log in, list, download with sha256, map each row with the shipped staff_roster "
            "mapping, upsert the Practitioners (500 rows per writer job), commit, move to processed/",
            "stable_seconds is 0 (the default 2 s wait for a growing file is not measured); the file is "
            "dated an hour ago, so min_file_age_seconds (60) is met",
            "csv alone = csv.reader over the local copy of the same file, counting rows",
            "download = reading the same file over one open SFTP connection in the channel's chunk size, "
            "nothing else (no hashing, no disk); rows/s is the file's rows over that time",
        ],
    }
    run.say(
        f"D: poll {out['poll_rows_per_s']['median']:,.0f} rows/s; csv alone "
        f"{out['csv_rows_per_s']['median']:,.0f} rows/s; download {out['download_mb_per_s']['median']:.1f} MB/s"
    )
    return out


# ------------------------------------------------------------------------------------------- E
def figure_e(run: Run) -> dict[str, Any]:
    """Peak RSS of the engine while it ingests messages from 8 senders, sampled over time."""
    m = run.mode
    folder = run.folder("e")
    db = folder / "engine.db"
    engine, mllp, _http = procs.start_engine(folder, f"sqlite:///{db}")
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    baseline = procs.memory_kb(engine.pid)

    def tick() -> None:
        mem = procs.memory_kb(engine.pid)
        count = None
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                row = con.execute("SELECT max(id) FROM message").fetchone()
                count = row[0] if row else None
            finally:
                con.close()
        except sqlite3.Error:
            pass
        samples.append(
            {
                "t": round(time.monotonic() - t0, 2),
                "messages": count,
                "rss_kb": mem.get("VmRSS"),
                "hwm_kb": mem.get("VmHWM"),
            }
        )

    try:
        per_conn = max(1, m.e_messages // 8)
        result = procs.run_driver(
            "benchmarks.mllp_load",
            _mllp_args(mllp, 8, m.e_seconds, 1, "EM", count=per_conn),
            timeout=m.e_seconds + 120,
            on_tick=tick,
            tick_seconds=max(0.5, m.e_seconds / 120),
        )
        tick()
    finally:
        engine.stop()
    r = result["runs"][0]
    sent = r["messages"]
    peak = max((s["hwm_kb"] or 0) for s in samples) if samples else None
    growth = _growth(samples)
    out = {
        "messages_requested": m.e_messages,
        "messages_ingested": sent,
        "seconds": r["seconds"],
        "msg_per_s": r["msg_per_s"],
        "ack_codes": r["codes"],
        "stopped_by": "count" if sent >= per_conn * 8 else "time limit",
        "rss_kb_after_start": baseline.get("VmRSS"),
        "peak_rss_kb": peak,
        "growth": growth,
        "samples": samples,
    }
    run.say(
        f"E: {sent} messages in {r['seconds']:.0f} s, peak RSS {peak and peak / 1024:.0f} MiB, "
        f"growth {growth.get('kb_per_10k_messages')} KiB per 10k messages (second half)"
    )
    return out


def _growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS growth over the second half of the run: a least-squares slope in KiB per 10k messages."""
    pts = [(s["messages"], s["rss_kb"]) for s in samples if s["messages"] and s["rss_kb"]]
    if len(pts) < 4:
        return {"kb_per_10k_messages": None, "note": "too few samples"}
    half = pts[len(pts) // 2 :]
    xs, ys = [p[0] for p in half], [p[1] for p in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    quarter = [pts[int(len(pts) * f) - 1 if f == 1 else int(len(pts) * f)] for f in (0.25, 0.5, 0.75, 1.0)]
    return {
        "kb_per_10k_messages": round(slope * 10_000, 1),
        "rss_kb_at_quarters": [{"messages": q[0], "rss_kb": q[1]} for q in quarter],
    }


# ------------------------------------------------------------------------------------------- F
def postgres_available(url: str = PG_URL) -> str | None:
    """None when PostgreSQL answers at ``url``; else why not."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as con:
            con.execute("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: skip F and say why
        return f"{type(exc).__name__}: {str(exc).strip()[:200]}"


def figure_f(run: Run) -> dict[str, Any]:
    """Figures B and C again on PostgreSQL, in a fresh schema that is dropped afterwards."""
    import psycopg

    why = postgres_available()
    if why:
        return {"status": f"skipped: PostgreSQL not reachable at {PG_URL} ({why})"}
    m = run.mode
    base = f"hms_ach_bench_{int(time.time())}_{os.getpid()}"
    schemas = {"B": f"{base}_b", "C": f"{base}_c"}  # separate stores, as B and C have separate SQLite files
    out: dict[str, Any] = {"url": PG_URL, "schemas": schemas}
    sep = "&" if "?" in PG_URL else "?"

    def url(schema: str) -> str:
        return f"{PG_URL}{sep}options={quote('-csearch_path=' + schema)}"

    try:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            out["server_version"] = con.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            for schema in schemas.values():
                con.execute(f'CREATE SCHEMA "{schema}"')
        out["B"] = figure_b(run, url(schemas["B"]), "postgresql")
        out["B"]["commit_ceiling"] = commit_ceiling_postgres(
            PG_URL, schemas["B"], m.b_commit_seconds, m.reps, 1300
        )
        run.say(
            f"F: PostgreSQL commit ceiling {out['B']['commit_ceiling']['commits_per_s']['median']} commits/s"
        )
        out["C"] = figure_c(run, url(schemas["C"]), "postgresql", sizes=m.f_sizes)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            for schema in schemas.values():
                con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return out


def mode_settings(mode: Mode) -> dict[str, Any]:
    return asdict(mode)
