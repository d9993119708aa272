"""Several engines on one PostgreSQL, as one cluster (issue 20, item 4; docs/scale-out.md).

* The mapping version: an instance that reloads changed files publishes them; the others load the
  published texts within seconds; a version that fails the check on an instance is refused there,
  which keeps its last good mappings and says so (readiness, ``config_instance``).
* The cluster test: three ``hms-ach run`` processes on one database, senders spread over them with
  A01/A08/A03 updates to the same patients and two senders racing on each patient at the end, the
  scheduler's leader killed with ``kill -9`` during the run. Every ACKed message is stored once;
  each patient's records equal those of a replay of its messages, in the order the database
  committed them, on one fresh engine; every event reaches the webhook sink; the scheduled job
  never ran on two instances at once.

PostgreSQL only (``HMS_ACH_TEST_POSTGRES_URL``): SQLite is one process's store.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from hms_ach.app import cluster_config
from hms_ach.app.config import load_config
from hms_ach.app.job_settings import JobsSettings
from hms_ach.app.jobs import job_names
from hms_ach.app.runtime import Engine
from hms_ach.app.scheduler import JobDef, Scheduler, trigger_for
from hms_ach.app.wiring import wire_listeners
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import config_version, conflicts, job_runs
from hms_ach.store.db import Store
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter
from tests.conftest import PG_URL, empty_store
from tests.integration.engine_process import FS_CR, VT, EngineProcess
from tests.integration.outbound_helpers import SECRET, Receiver

pytestmark = pytest.mark.skipif(
    not PG_URL, reason="the cluster tests need PostgreSQL: set HMS_ACH_TEST_POSTGRES_URL"
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Store]:
    """An empty PostgreSQL store in a schema of its own."""
    with empty_store("postgres", tmp_path) as s:
        yield s


# ---------------------------------------------------------------------------- the mapping version
def _engine(base: Path, store: Store) -> Engine:
    base.mkdir()
    shutil.copytree(ROOT / "mappings", base / "mappings")
    (base / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\nhttp:\n  enabled: false\njobs:\n  enabled: false\n"
    )
    return Engine(load_config(base / "channels.yaml"), database=store.url)


def _table_value(engine: Engine) -> Any:
    """What the code table ``active_inactive`` maps ``A`` to in the mappings ``engine`` runs."""
    return getattr(engine.mappings.tables["active_inactive"].model, "map", {}).get("A")


async def _until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1)


async def test_a_reload_on_one_instance_reaches_the_other_and_a_bad_version_is_refused(
    tmp_path: Path, pg: Store
) -> None:
    a, b = _engine(tmp_path / "a", pg), _engine(tmp_path / "b", pg)
    await a.start()
    await b.start()
    try:
        assert a.cluster is not None and b.cluster is not None
        assert a.cluster.seq == b.cluster.seq  # the same files: one version
        table = tmp_path / "a" / "mappings" / "tables" / "active_inactive.yaml"
        table.write_text(table.read_text().replace("A: true", "A: false"))
        assert a.reload_mappings()
        assert _table_value(a) is False
        # b loads the published texts (not its own files, which did not change) within seconds
        await _until(lambda: _table_value(b) is False, 60, "b follows a")
        assert b.cluster.seq == a.cluster.seq and b.cluster.digest == a.cluster.digest
        with pg.read() as conn:
            running = {i.instance: i for i in config_version.instances(conn)}
        assert {i.status for i in running.values()} == {"ok"}
        assert {i.seq for i in running.values()} == {a.cluster.seq}
        # b's own files did not change: a reload there keeps the cluster's version
        assert b.reload_mappings() and _table_value(b) is False
        # a broken edit on a is refused there and never published
        published = a.cluster.seq
        good = table.read_text()
        table.write_text("kind: table\nmap: [\n")
        assert not a.reload_mappings()
        assert _table_value(a) is False and a.cluster.seq == published
        with pg.read() as conn:
            newest = config_version.latest(conn)
        assert newest is not None and newest.seq == published
        table.write_text(good)

        # a version b cannot load (published by an instance with a newer engine, say): refused there
        files = cluster_config.mapping_files(tmp_path / "a" / "mappings")
        files["tables/active_inactive.yaml"] += "\nnot_a_field: 1\n"
        with pg.transaction() as tx:
            bad = config_version.publish(tx, cluster_config.digest(files), files, "elsewhere:1")
        await _until(lambda: b.cluster is not None and b.cluster.refused is not None, 60, "b refuses")
        assert _table_value(b) is False  # the last good mappings still run
        failed = await b.readiness()
        assert f"config version {bad}" in failed["mappings"], failed
        with pg.read() as conn:
            states = {i.instance: i for i in config_version.instances(conn)}
        refused = states[b.cluster.instance]
        assert refused.status == "refused" and refused.seq == bad
        assert refused.detail is not None and "not_a_field" in refused.detail
        assert b.pipeline.engine is not None  # still taking messages
    finally:
        await b.stop()
        await a.stop()


# ---------------------------------------------------------------------------- conflicts
def test_a_deadlock_between_two_instances_writers_is_retried_and_both_commit(tmp_path: Path) -> None:
    """Two instances' writers lock the same two rows in opposite orders: PostgreSQL refuses one
    transaction (deadlock); its writer runs it again, and both commit."""
    with empty_store("postgres", tmp_path) as one:
        other = Store(one.url)
        with one.transaction() as tx:
            job_runs.record_start(tx, "row-a")
            job_runs.record_start(tx, "row-b")
        meet = threading.Barrier(2)
        attempts = {"row-a": 0, "row-b": 0}

        def job(first: str, second: str) -> Callable[[Tx], str]:
            def run(tx: Tx) -> str:
                attempts[first] += 1
                job_runs.record_start(tx, first)  # row lock on ``first``
                if attempts[first] == 1:
                    meet.wait(10)  # both hold their first row: each now waits for the other's
                job_runs.record_start(tx, second)
                return first

            return run

        writers = [StoreWriter(one), StoreWriter(other)]
        try:
            futures = [
                writers[0]._submit(job("row-a", "row-b")),
                writers[1]._submit(job("row-b", "row-a")),
            ]
            assert sorted(f.result(30) for f in futures) == ["row-a", "row-b"]
        finally:
            for w in writers:
                w.stop()
            other.dispose()
        # one of them ran again (more than once if the machine is slow enough for a second refusal)
        assert min(attempts.values()) == 1 and 1 < max(attempts.values()) <= conflicts.MAX_ATTEMPTS
        assert all(w.health.consecutive_failures == 0 for w in writers)  # not taken for an outage
        with one.read() as conn:
            runs = job_runs.last_runs(conn)
        assert (runs["row-a"].runs, runs["row-b"].runs) == (3, 3)  # each job's two updates, once


# ---------------------------------------------------------------------------- the scheduler's leader
async def test_a_leader_whose_lock_session_ends_stops_before_another_takes_over(tmp_path: Path) -> None:
    """The leader's lock session is terminated while its process lives on (a network break): it
    must not go on scheduling while the standby takes over. Every run is recorded with who ran
    it and when: no two runs of different instances overlap, and both instances ran the job."""
    runs: list[tuple[str, float, float]] = []

    def job(who: str) -> JobDef:
        async def run() -> str:
            started = time.monotonic()
            await asyncio.sleep(0.05)
            runs.append((who, started, time.monotonic()))
            return "ok"

        return JobDef("tick", trigger_for(None, 0.2, "UTC"), run)

    def settings(retry: float) -> JobsSettings:
        no_jobs = {name: {"enabled": False} for name in job_names()}
        return JobsSettings.model_validate({"lock_retry_seconds": retry, **no_jobs})

    with empty_store("postgres", tmp_path) as one:
        other = Store(one.url)
        writers = [StoreWriter(one), StoreWriter(other)]
        a = Scheduler(one, writers[0], [job("a")], settings(5.0))  # b retries sooner: b takes over
        b = Scheduler(other, writers[1], [job("b")], settings(0.3))
        try:
            assert await a.start() is True
            assert await b.start() is False
            await _until(lambda: len(runs) >= 3, 30, "a runs the job")
            lock_conn = a._lock._conn
            assert lock_conn is not None
            backend = lock_conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with one.transaction() as tx:
                tx.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend})
            await _until(lambda: any(who == "b" for who, _s, _e in runs), 30, "b takes over")
            await asyncio.sleep(1.0)
            assert not a.leader and a.aps is None  # a noticed and stands by
            assert b.leader
        finally:
            await a.stop()
            await b.stop()
            for w in writers:
                w.stop()
            other.dispose()
    by_a = [(s, e) for who, s, e in runs if who == "a"]
    by_b = [(s, e) for who, s, e in runs if who == "b"]
    assert by_a and by_b
    assert max(e for _s, e in by_a) < min(s for s, _e in by_b)  # a's last run ended before b's first


# ---------------------------------------------------------------------------- the cluster test
INSTANCES = 3
PATIENTS = 24
#: Patients in flight at once (each one's messages go one after another).
PARALLEL = 9
SINK = "cluster_hook"
STEPS = ("adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7")  # then two A08s racing


def _sample(name: str) -> str:
    return (SAMPLES / name).read_bytes().decode("latin-1").replace("\r\n", "\r").replace("\n", "\r")


_TEMPLATES = {name: _sample(name) for name in STEPS}
_STREETS = ("1420 Maple Ave^Apt 3B", "88 Birchwood Ct^")
_PHONES = ("(614)555-0142^PRN^PH^^1^614^5550142", "(614)555-0163^PRN^PH^^1^614^5550163")


def message(name: str, control_id: str, k: int, street: str, phone: str) -> bytes:
    """Sample ``name`` for patient ``k`` (MRN, visit, account and coverage of its own) with the home
    address line and phone given: each message of a patient changes its Patient record."""
    raw = re.sub(r"\|S-A0\d-0001\|", f"|{control_id}|", _TEMPLATES[name], count=1)
    raw = raw.replace("100001^", f"CL{k:04d}^").replace("V5001^", f"CV{k:04d}^")
    raw = raw.replace("A70001^", f"CA{k:04d}^").replace("XOH884512001", f"XCL{k:04d}")
    for old in _STREETS:
        raw = raw.replace(old, f"{street}^")
    for old in _PHONES:
        raw = raw.replace(old, f"{phone}^PRN^PH")
    return VT + raw.encode("latin-1") + FS_CR


@dataclass
class Sent:
    """What the senders saw: per control id the message and its MSA-1 (AA once ACKed)."""

    raw: dict[str, bytes] = field(default_factory=dict)
    codes: dict[str, str | None] = field(default_factory=dict)
    acked_in_order: dict[int, list[str]] = field(default_factory=dict)  # patient -> control ids

    def acked(self) -> list[str]:
        return [c for c, code in self.codes.items() if code == "AA"]


async def _send_once(port: int, raw: bytes, within: float = 20) -> str | None:
    """Send one message on a new connection; its MSA-1, or None (refused, closed, no ACK in time)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(raw)
        await writer.drain()
        ack = await asyncio.wait_for(reader.readuntil(FS_CR), within)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        writer.close()
    msa = next((s for s in ack.strip(VT + FS_CR).split(b"\r") if s.startswith(b"MSA")), b"MSA||")
    return msa.split(b"|")[1].decode()


async def send_to_cluster(ports: list[int], first: int, control_id: str, raw: bytes, sent: Sent) -> None:
    """Send through instance ``first``; when it gives no AA, the next instance (a load balancer's
    failover): a message that did commit is answered from the duplicate store."""
    sent.raw[control_id] = raw
    for attempt in range(3 * len(ports)):
        code = await _send_once(ports[(first + attempt) % len(ports)], raw)
        sent.codes[control_id] = code
        if code == "AA":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{control_id}: no AA from any instance (last answer {sent.codes[control_id]})")


async def patient_run(ports: list[int], k: int, sent: Sent, gate: asyncio.Semaphore) -> None:
    """Patient ``k``: A01, A08, A03 each after the previous ACK, each through another instance,
    then two A08s at once through two instances (phones differ: both change the record)."""
    async with gate:
        order = sent.acked_in_order.setdefault(k, [])
        for step, name in enumerate(STEPS):
            cid = f"CL{k}-{step}"
            raw = message(name, cid, k, f"{step} Step St", f"(614)555-{k:02d}{step}0")
            await send_to_cluster(ports, k + step, cid, raw, sent)
            order.append(cid)
        race = [(f"CL{k}-r{i}", f"(700)555-{k:02d}{i}9") for i in range(2)]
        await asyncio.gather(
            *(
                send_to_cluster(
                    ports, k + 3 + i, cid, message("adt_a08.hl7", cid, k, "2 Step St", phone), sent
                )
                for i, (cid, phone) in enumerate(race)
            )
        )


def _sink_yaml(url: str) -> str:
    return (
        f"sinks:\n  - name: {SINK}\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        '    events: ["*"]\n    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.5\n'
        "    timeout_seconds: 5\n"
    )


_JOBS = "jobs:\n  lock_retry_seconds: 1\n  housekeeping:\n    cron: null\n    interval_seconds: 1\n"


@asynccontextmanager
async def cluster(tmp_path: Path, store: Store, sinks: str) -> AsyncIterator[list[EngineProcess]]:
    """Three ``hms-ach run`` processes on ``store``, each with a data directory of its own and one
    shared audit key (docs/scale-out.md); the first one started is the scheduler's leader."""
    engines = []
    for i in range(INSTANCES):
        base = tmp_path / f"instance{i}"
        base.mkdir()
        engines.append(EngineProcess(base, store.url, channels_yaml=_JOBS + sinks))
    try:
        await engines[0].start()
        await engines[0].wait_for_event("scheduler.started")
        await asyncio.gather(*(e.start() for e in engines[1:]))
        yield engines
    finally:
        for e in engines:
            e.kill()


def _ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["ts"]))


def _normalised(resource: dict[str, Any]) -> Any:
    """A record without what differs between two stores: ids, meta, and the ids in references."""
    body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    return orjson.loads(re.sub(rb'"([A-Za-z]+)/[0-9a-f-]{32,36}"', rb'"\1/*"', orjson.dumps(body)))


def _records(store: Store, k: int) -> dict[str, Any]:
    """Patient ``k``'s Patient and Encounter, normalised."""
    out = {}
    with store.read() as conn:
        for table, key in (("patient", f"CL{k:04d}"), ("encounter", f"CV{k:04d}")):
            row = conn.execute(
                text(f"SELECT resource FROM {table} WHERE key_value = :k"),  # noqa: S608 - fixed names
                {"k": key},
            ).one()
            out[table] = _normalised(orjson.loads(row[0]))
    return out


def patient_versions(store: Store, k: int) -> list[str]:
    """The control ids of the messages that made patient ``k``'s Patient versions, in version order."""
    with store.read() as conn:
        rows = conn.execute(
            text(
                "SELECT m.control_id FROM resource_history h JOIN patient p ON p.id = h.id"
                " JOIN message m ON m.id = h.message_id"
                " WHERE h.resource_type = 'Patient' AND p.key_value = :k ORDER BY h.version_id"
            ),
            {"k": f"CL{k:04d}"},
        ).all()
    return [str(r[0]) for r in rows]


def _committed_order(store: Store, k: int, sent: Sent) -> list[str]:
    """The control ids of patient ``k``'s messages in the order the database committed them: the
    ACKed chain, then the racing pair in the order of the Patient versions they made."""
    versions = patient_versions(store, k)
    chain = sent.acked_in_order[k]
    assert versions[: len(chain)] == chain, (k, versions)  # one version per message, in ACK order
    race = versions[len(chain) :]
    assert sorted(race) == [f"CL{k}-r0", f"CL{k}-r1"], (k, versions)  # neither racer was lost
    return chain + race


async def replay_on_one_instance(tmp_path: Path, orders: dict[int, list[str]], sent: Sent) -> Store:
    """The same messages, patient by patient in the committed order, through one fresh engine."""
    single = Store(f"sqlite:///{tmp_path}/single.db")
    wire_listeners()
    writer = StoreWriter(single)
    writer.start()
    pipeline = Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings"), "UTC"))
    policy = Hl7Policy("adt_in")
    try:
        for k in sorted(orders):
            for cid in orders[k]:
                outcome = await pipeline.process_hl7(sent.raw[cid].strip(VT + FS_CR), policy)
                assert outcome.ack_code == "AA", (cid, outcome)
    finally:
        writer.stop()
    return single


@pytest.mark.timeout(90)  # the bound of the whole run; about 30 s of it is the dead instance's lease
async def test_three_instances_one_killed_lose_nothing_and_keep_each_patients_order(
    tmp_path: Path, pg: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMS_ACH_AUDIT_KEY_FILE", str(tmp_path / "audit.key"))  # one key, one trail
    receiver = Receiver()
    url = await receiver.start()
    sent = Sent()
    try:
        async with cluster(tmp_path, pg, _sink_yaml(url)) as engines:
            ports = [e.mllp_port for e in engines]
            gate = asyncio.Semaphore(PARALLEL)
            patients = list(range(PATIENTS))
            random.Random(20).shuffle(patients)
            runs = [asyncio.create_task(patient_run(ports, k, sent, gate)) for k in patients]
            # kill -9 the scheduler's leader (and the sink's first lease holder) mid-run
            deadline = time.monotonic() + 60
            while len(sent.acked()) < PATIENTS * 2:
                assert time.monotonic() < deadline, f"only {len(sent.acked())} ACKed"
                await asyncio.sleep(0.05)
            engines[0].signal(signal.SIGKILL)
            killed_at = time.time()
            assert await engines[0].wait(10) == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*runs), 60)
            acked_after_kill = len(sent.acked())

            # every event reaches the sink (once the lease the dead instance held has expired)
            def undelivered() -> int:
                with pg.read() as conn:
                    return int(
                        conn.execute(
                            text(
                                "SELECT (SELECT MAX(id) FROM outbox_event)"
                                " - (SELECT last_event_id FROM outbox_cursor WHERE destination = :d)"
                                " + (SELECT COUNT(*) FROM outbox WHERE destination = :d AND status != 'delivered')"
                            ),
                            {"d": SINK},
                        ).scalar_one()
                    )

            await _until(lambda: undelivered() == 0, 60, "every outbox row delivered")
            # stop the standbys before the leader: a leader that stops first frees the lock, and a
            # standby still running would take it over (a second, legitimate, take-over)
            survivors = sorted(engines[1:], key=lambda e: e.event("scheduler.took_over") is not None)
            for e in survivors:
                assert await e.terminate() == 0
    finally:
        await receiver.stop()

    # every ACKed message stored exactly once (a resend after the kill is a duplicate row)
    with pg.read() as conn:
        stored: dict[str, int] = {
            str(cid): int(n)
            for cid, n in conn.execute(
                text(
                    "SELECT control_id, COUNT(*) FROM message WHERE status != 'duplicate' GROUP BY control_id"
                )
            ).all()
        }
    assert acked_after_kill == len(sent.codes) == PATIENTS * 5
    assert {c: stored.get(c, 0) for c in sent.acked() if stored.get(c, 0) != 1} == {}

    # each patient's records equal a replay of its messages, in the committed order, on one engine
    orders = {k: _committed_order(pg, k, sent) for k in range(PATIENTS)}
    single = await replay_on_one_instance(tmp_path, orders, sent)
    try:
        for k in range(PATIENTS):
            assert _records(pg, k) == _records(single, k), k
    finally:
        single.dispose()

    # every event delivered to the sink once (a redelivery only for a delivery the kill cut short)
    with pg.read() as conn:
        events = int(
            conn.execute(text("SELECT COUNT(*) FROM outbox WHERE destination = :d"), {"d": SINK}).scalar_one()
        )
    assert receiver.bad_signatures == 0
    assert len(receiver.keys) == events >= PATIENTS * 2  # admitted and discharged, at least
    redelivered = receiver.requests - len(receiver.keys)
    assert redelivered <= 8, redelivered  # at most one batch in flight at the kill

    # the scheduler: one leader at a time; the job never ran on two instances at once
    leader_runs = [
        [
            _ts(ev)
            for ev in e.events()
            if ev.get("event") == "job.finished" and ev.get("job") == "housekeeping"
        ]
        for e in engines
    ]
    took_over = [e.event("scheduler.took_over") for e in engines[1:]]
    assert sum(t is not None for t in took_over) == 1, took_over
    new_leader = 1 + next(i for i, t in enumerate(took_over) if t is not None)
    assert all(not leader_runs[i] for i in range(INSTANCES) if i not in (0, new_leader))
    assert all(t.timestamp() <= killed_at for t in leader_runs[0])
    assert leader_runs[new_leader] and all(t.timestamp() > killed_at for t in leader_runs[new_leader])
    with pg.read() as conn:
        job_row = conn.execute(text("SELECT runs FROM job_run WHERE name = 'housekeeping'")).one()
    finished = len(leader_runs[0]) + len(leader_runs[new_leader])
    assert int(job_row[0]) - finished in (0, 1), (job_row, finished)  # 1: the run the kill cut short
