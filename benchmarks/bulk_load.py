"""Fill a store directly, for the FHIR API figures: Practitioners, Patients, Encounters, Locations.

Rows go straight into the record tables and the search-index tables with SQLAlchemy Core
``insert`` + executemany, in large transactions; the index rows come from the engine's own
declarations (:func:`hms_ach.store.search_params.index_rows`), so search sees exactly what it would
see had the records arrived through the pipeline. The secondary indexes are dropped while loading
and built again afterwards (much faster than maintaining them row by row). History rows are not
written: no figure reads them.

:func:`load` can be called again on the same store to grow it (100 k, then 1 M): the generator picks
up where it stopped, so ids, NPIs and MRNs stay unique.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Index, Table, insert, text

from benchmarks.data import EPOCH, Generator, encounter, locations, patient, practitioner, seeded_uuid
from hms_ach.store.db import make_engine
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.search_params import index_rows

CHUNK = 10_000
#: Practitioners who take part in encounters (the hospital's active medical staff).
STAFF_POOL = 2_000


@dataclass
class LoadState:
    """Counts loaded so far and what the query driver needs (ids, names, patients with encounters)."""

    seed: int
    practitioners: int = 0
    patients: int = 0
    encounters: int = 0
    location_ids: list[str] = field(default_factory=list)
    bed_ids: list[str] = field(default_factory=list)
    staff_ids: list[str] = field(default_factory=list)
    sample_practitioner_ids: list[str] = field(default_factory=list)
    sample_families: list[str] = field(default_factory=list)
    sample_patients: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rows: int = 0

    def targets(self) -> dict[str, Any]:
        """What the query driver asks for: uniform samples of everything loaded so far."""
        return {
            "practitioner_ids": list(self.sample_practitioner_ids),
            "families": list(self.sample_families),
            "patients": list(self.sample_patients),
            "date_ge": "2025-06-01",
        }

    def counts(self) -> dict[str, int]:
        return {
            "Practitioner": self.practitioners,
            "Patient": self.patients,
            "Encounter": self.encounters,
            "Location": len(self.location_ids),
        }


def _record_row(
    rid: str, key_system: str | None, key_value: str | None, resource: dict[str, Any], when: datetime
) -> dict[str, Any]:
    return {
        "id": rid,
        "key_system": key_system,
        "key_value": key_value,
        "version_id": 1,
        "last_updated": when,
        "deleted": False,
        "resource": orjson.dumps(resource).decode(),
    }


class _Batch:
    """Rows waiting to be inserted, per table."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.index: dict[str, list[dict[str, Any]]] = {k: [] for k in INDEX_TABLES}
        self.size = 0

    def add(
        self,
        rtype: str,
        rid: str,
        key_system: str | None,
        key_value: str | None,
        resource: dict[str, Any],
        when: datetime,
    ) -> None:
        self.records.setdefault(rtype, []).append(_record_row(rid, key_system, key_value, resource, when))
        for kind, rows in index_rows(rtype, resource).items():
            target = self.index[kind]
            for row in rows:
                row["resource_type"] = rtype
                row["resource_id"] = rid
                target.append(row)
        self.size += 1

    def flush(self, engine: Engine) -> int:
        written = 0
        put = _copy if engine.dialect.name == "postgresql" else _insert
        with engine.begin() as conn:
            for rtype, rows in self.records.items():
                if rows:
                    put(conn, RECORD_TABLES[rtype].__table__, rows)  # type: ignore[attr-defined]
                    written += len(rows)
            for kind, rows in self.index.items():
                if rows:
                    put(conn, INDEX_TABLES[kind].__table__, rows)  # type: ignore[attr-defined]
                    written += len(rows)
        self.__init__()  # type: ignore[misc]
        return written


def _insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(table), rows)


def _copy(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: the rows through ``COPY ... FROM STDIN`` on the connection's psycopg driver
    connection (several times faster than multi-row INSERTs for a 1 M store). The columns are those
    the rows name; the others (the index tables' ``row_id``) take their defaults as with INSERT."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    names = ", ".join(f'"{c}"' for c in columns)
    driver: Any = conn.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([row.get(c) for c in columns])


def _secondary_indexes() -> list[Index]:
    out: list[Index] = []
    for model in [*RECORD_TABLES.values(), *INDEX_TABLES.values()]:
        out.extend(model.__table__.indexes)  # type: ignore[attr-defined]
    return out


def _analyze_sql(conn: Connection) -> str:
    """ANALYZE of the loaded tables. On PostgreSQL a bare ANALYZE reads every table of the database,
    other stores' schemas too (the tests' parallel workers, earlier benchmark schemas), and two of
    them at once deadlock on the catalog; the names here resolve in this store's search_path."""
    if conn.dialect.name != "postgresql":
        return "ANALYZE"
    quote = conn.dialect.identifier_preparer.quote
    tables = [m.__table__.name for m in [*RECORD_TABLES.values(), *INDEX_TABLES.values()]]  # type: ignore[attr-defined]
    return "ANALYZE " + ", ".join(quote(t) for t in tables)


def loader_engine(url: str) -> Engine:
    """A bulk-load engine on ``url``: the store's tables exist; SQLite skips fsync while loading."""
    engine = make_engine(url, create=True, writer=True)
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _fast(dbapi_connection: Any, _record: Any) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA synchronous=OFF")  # loading is set-up, not a measured, durable write
            cur.execute("PRAGMA cache_size=-262144")
            cur.close()

    return engine


class BulkLoader:
    """Grow one store: :meth:`begin` drops the secondary indexes, :meth:`grow` adds records (in
    chunks, stopping early at a deadline), :meth:`finish` builds the indexes and runs ANALYZE."""

    def __init__(self, url: str, state: LoadState):
        self.url = url
        self.state = state
        self.engine = loader_engine(url)
        self.when = datetime(2026, 11, 1, tzinfo=UTC)
        self._t0 = time.perf_counter()

    def begin(self) -> None:
        with self.engine.begin() as conn:
            for ix in _secondary_indexes():
                conn.execute(text(f'DROP INDEX IF EXISTS "{ix.name}"'))

    def grow(
        self,
        practitioners: int,
        patients: int,
        encounters_per_patient: float = 2.0,
        deadline: float | None = None,
    ) -> bool:
        """Add records up to the given counts; False if ``deadline`` (monotonic) stopped it first.

        Practitioners and patients are added in proportion, chunk by chunk, so a store cut short by
        the deadline still has the same mix.
        """
        st = self.state
        batch = _Batch()
        if not st.location_ids:
            _load_locations(batch, st, random.Random(st.seed), self.when)
        p0, q0 = st.practitioners, st.patients
        steps = max(1, (practitioners - p0) // CHUNK)
        for step in range(1, steps + 1):
            p_to = p0 + (practitioners - p0) * step // steps
            q_to = q0 + (patients - q0) * step // steps
            for rtype, rid, res, key in _practitioners(st, p_to, self.when):
                batch.add(rtype, rid, res["identifier"][0]["system"], key, res, self.when)
            for item in _patients_and_encounters(st, q_to, encounters_per_patient, self.when):
                batch.add(*item, self.when)
            st.rows += batch.flush(self.engine)
            if deadline is not None and time.monotonic() > deadline and step < steps:
                return False
        return True

    def finish(self) -> None:
        with self.engine.begin() as conn:
            for ix in _secondary_indexes():
                ix.create(conn, checkfirst=True)
            conn.execute(text(_analyze_sql(conn)))
        if self.engine.dialect.name == "sqlite":  # leave the engine a compact file, not a huge WAL
            raw = self.engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        self.engine.dispose()
        self.state.seconds += time.perf_counter() - self._t0


def load(
    url: str, state: LoadState, practitioners: int, patients: int, deadline: float | None = None
) -> bool:
    """Grow the store at ``url`` to the given counts (Locations are loaded once); False if cut short."""
    loader = BulkLoader(url, state)
    loader.begin()
    try:
        complete = loader.grow(practitioners, patients, deadline=deadline)
    finally:
        loader.finish()
    return complete


def _load_locations(batch: _Batch, state: LoadState, rng: random.Random, when: datetime) -> None:
    ids: dict[str, str] = {}
    for key, res in locations():
        rid = seeded_uuid(rng)
        ids[key] = rid
        body = dict(res)
        if "partOf" in body:
            body["partOf"] = {"reference": f"Location/{ids[body['partOf']['reference'][1:]]}"}
        body = {
            "resourceType": "Location",
            "id": rid,
            "meta": {"versionId": "1", "lastUpdated": when.isoformat().replace("+00:00", "Z")},
            **{k: v for k, v in body.items() if k != "resourceType"},
        }
        batch.add("Location", rid, "urn:hms-ach:location", key, body, when)
        state.location_ids.append(rid)
        if body["physicalType"]["coding"][0]["code"] == "bd":
            state.bed_ids.append(rid)


def _practitioners(
    state: LoadState, target: int, when: datetime
) -> Iterator[tuple[str, str, dict[str, Any], str]]:
    g = Generator(state.seed * 1_000_003 + state.practitioners)
    id_rng = random.Random(state.seed * 7919 + state.practitioners)
    pick = random.Random(state.seed * 17 + state.practitioners)
    for i in range(state.practitioners, target):
        rid = seeded_uuid(id_rng)
        res, npi = practitioner(g, i, rid, when)
        if len(state.staff_ids) < STAFF_POOL:
            state.staff_ids.append(rid)
        slot = _reservoir_slot(pick, i, len(state.sample_practitioner_ids))
        if slot is not None:
            _put(state.sample_practitioner_ids, slot, rid)
            _put(state.sample_families, slot, res["name"][0]["family"])
        state.practitioners = i + 1
        yield "Practitioner", rid, res, npi


def _patients_and_encounters(
    state: LoadState, target: int, per_patient: float, when: datetime
) -> Iterator[tuple[str, str, str | None, str | None, dict[str, Any]]]:
    g = Generator(state.seed * 2_000_003 + state.patients)
    id_rng = random.Random(state.seed * 104729 + state.patients)
    pick = random.Random(state.seed * 19 + state.patients)
    for i in range(state.patients, target):
        pid = seeded_uuid(id_rng)
        res, mrn = patient(g, i, pid, when)
        state.patients = i + 1
        yield "Patient", pid, res["identifier"][0]["system"], mrn, res
        n = max(1, min(8, round(g.rng.expovariate(1.0 / per_patient))))
        for _ in range(n):
            eid = seeded_uuid(id_rng)
            start = EPOCH - timedelta(days=g.rng.randint(0, 700), minutes=g.rng.randint(0, 1440))
            end = None if g.rng.random() < 0.1 else start + timedelta(hours=g.rng.randint(4, 24 * 12))
            doctors = g.rng.sample(state.staff_ids, min(3, len(state.staff_ids)))
            eres, visit = encounter(
                g, state.encounters, eid, when, pid, g.rng.choice(state.bed_ids), doctors, start, end
            )
            state.encounters += 1
            yield "Encounter", eid, eres["identifier"][0]["system"], visit, eres
        slot = _reservoir_slot(pick, i, len(state.sample_patients))
        if slot is not None:
            _put(state.sample_patients, slot, pid)


#: How many ids, names and patients the query driver draws from (a uniform sample of all loaded).
SAMPLE_SIZE = 4000


def _reservoir_slot(rng: random.Random, index: int, filled: int) -> int | None:
    """Reservoir sampling (algorithm R): where item ``index`` goes in the sample, if anywhere."""
    if filled < SAMPLE_SIZE:
        return filled
    j = rng.randint(0, index)
    return j if j < SAMPLE_SIZE else None


def _put(sample: list[Any], slot: int, value: Any) -> None:
    if slot == len(sample):
        sample.append(value)
    else:
        sample[slot] = value
