"""The ADT events real feeds send, end to end through the pipeline and the store (SQLite, and
PostgreSQL when set): Encounter.location keeps its history across transfers, A17 swaps two beds in
one commit, A20 sets a bed's status, and each change is announced with the event that says what
happened (encounter.discharge_cancelled for A13, never encounter.admitted)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from hms_ach.app.wiring import wire_listeners
from hms_ach.hl7v2.ack import msa_code
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.outbound import events
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.models import OutboxEvent
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
VISIT = "urn:hms-ach:id:GENHOSP"
LOC = "urn:hms-ach:location"
POLICY = Hl7Policy("adt_in")


def adt(event: str, control_id: str, *segments: str, when: str = "20261127100500-0500") -> bytes:
    head = [
        f"MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|{when}||ADT^{event}|{control_id}|P|2.5.1",
        f"EVN|{event}|{when}",
    ]
    return ("\r".join(head + list(segments)) + "\r").encode()


def pid(mrn: str = "100001") -> str:
    return f"PID|1||{mrn}^^^GENHOSP^MR||Rivera^Maria||19750314^D|F"


def pv1(bed: str, visit: str = "V5001", prior: str = "", cls: str = "I", tail: str = "") -> str:
    ward, room, b = bed.split("-")
    prior_pl = ""
    if prior:
        pw, pr, pb = prior.split("-")
        prior_pl = f"{pw}^{pr}^{pb}^GENHOSP"
    return f"PV1|1|{cls}|{ward}^{room}^{b}^GENHOSP|||{prior_pl}|||||||||||||{visit}^^^GENHOSP^VN{tail}"


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    wire_listeners()
    engine = MappingEngine(load_mappings(ROOT / "mappings"))
    events.use_engine(engine)
    writer = StoreWriter(store)
    yield Pipeline(writer, engine)
    writer.stop()
    events.use_engine(None)


async def send(pipeline: Pipeline, raw: bytes) -> None:
    outcome = await pipeline.process_hl7(raw, POLICY)
    assert msa_code(outcome.ack) == "AA", outcome.ack


def record(store: Store, resource_type: str, system: str, value: str) -> dict[str, Any]:
    with store.reader.connect() as conn:
        found = Repository(conn).find_by_key(resource_type, system, value)
    assert found is not None, f"no {resource_type} {value}"
    return found[1]


def outbox(store: Store) -> list[tuple[str, dict[str, Any]]]:
    t = OutboxEvent.__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        rows = conn.execute(select(t.c.event, t.c.payload).order_by(t.c.id)).all()
    return [(r.event, orjson.loads(r.payload)) for r in rows]


def ref(store: Store, bed: str) -> str:
    return "Location/" + str(record(store, "Location", LOC, "GENHOSP/" + bed.replace("-", "/"))["id"])


def history(store: Store, visit: str = "V5001") -> list[tuple[str, str, dict[str, Any]]]:
    enc = record(store, "Encounter", VISIT, visit)
    return [(i["location"]["reference"], i.get("status", ""), i.get("period", {})) for i in enc["location"]]


async def test_transfers_keep_the_location_history_and_a13_is_a_cancelled_discharge(
    pipeline: Pipeline, store: Store
) -> None:
    await send(pipeline, adt("A01", "E-1", pid(), pv1("4W-412-A"), when="20261127080000-0500"))
    await send(
        pipeline, adt("A02", "E-2", pid(), pv1("4W-414-B", prior="4W-412-A"), when="20261127100000-0500")
    )
    await send(
        pipeline, adt("A02", "E-3", pid(), pv1("5E-501-A", prior="4W-414-B"), when="20261127120000-0500")
    )
    a, b, c = ref(store, "4W-412-A"), ref(store, "4W-414-B"), ref(store, "5E-501-A")
    assert history(store) == [
        (c, "active", {"start": "2026-11-27T12:00:00-05:00"}),
        (b, "completed", {"start": "2026-11-27T10:00:00-05:00", "end": "2026-11-27T12:00:00-05:00"}),
        (a, "completed", {"start": "2026-11-27T08:00:00-05:00", "end": "2026-11-27T10:00:00-05:00"}),
    ]
    # an update naming the same bed keeps when the stay there began
    await send(pipeline, adt("A08", "E-4", pid(), pv1("5E-501-A"), when="20261127130000-0500"))
    assert history(store)[0] == (c, "active", {"start": "2026-11-27T12:00:00-05:00"})
    await send(pipeline, adt("A03", "E-5", pid(), pv1("5E-501-A"), when="20261127150000-0500"))
    await send(pipeline, adt("A13", "E-6", pid(), pv1("5E-501-A"), when="20261127153000-0500"))
    enc = record(store, "Encounter", VISIT, "V5001")
    assert enc["status"] == "in-progress" and "end" not in enc["period"]
    assert history(store)[0] == (c, "active", {"start": "2026-11-27T12:00:00-05:00"})
    names = [e for e, _ in outbox(store) if e.startswith("encounter.")]
    assert names == [
        "encounter.admitted",
        "encounter.transferred",
        "encounter.transferred",
        "encounter.discharged",
        "encounter.discharge_cancelled",
    ]


async def test_a17_swaps_two_beds_in_one_commit(pipeline: Pipeline, store: Store) -> None:
    await send(pipeline, adt("A01", "S-1", pid("100001"), pv1("4W-412-A", "V5001")))
    await send(pipeline, adt("A01", "S-2", pid("100002"), pv1("4W-414-B", "V5002")))
    before = len(outbox(store))
    await send(
        pipeline,
        adt("A17", "S-3", pid("100001"), pv1("4W-414-B", "V5001"), pid("100002"), pv1("4W-412-A", "V5002")),
    )
    a, b = ref(store, "4W-412-A"), ref(store, "4W-414-B")
    one, two = record(store, "Encounter", VISIT, "V5001"), record(store, "Encounter", VISIT, "V5002")
    assert [i["location"]["reference"] for i in one["location"]] == [b, a]
    assert [i["location"]["reference"] for i in two["location"]] == [a, b]
    patient_one = record(store, "Patient", VISIT, "100001")["id"]
    patient_two = record(store, "Patient", VISIT, "100002")["id"]
    assert one["subject"]["reference"] == f"Patient/{patient_one}"
    assert two["subject"]["reference"] == f"Patient/{patient_two}"
    swapped = outbox(store)[before:]
    assert sorted((e, p["location"]) for e, p in swapped if e == "encounter.transferred") == sorted(
        [("encounter.transferred", b), ("encounter.transferred", a)]
    )
    # one message, one commit: an A17 whose second group is bad (an impossible birth date) stores
    # neither move
    outcome = await pipeline.process_hl7(
        adt(
            "A17",
            "S-4",
            pid("100001"),
            pv1("4W-412-A", "V5001"),
            pid("100002").replace("19750314^D", "19751399"),
            pv1("4W-414-B", "V5002"),
        ),
        POLICY,
    )
    assert msa_code(outcome.ack) == "AE"
    assert record(store, "Encounter", VISIT, "V5001")["location"][0]["location"]["reference"] == b
    assert record(store, "Encounter", VISIT, "V5002")["location"][0]["location"]["reference"] == a


async def test_bed_status_leave_and_pending_events(pipeline: Pipeline, store: Store) -> None:
    await send(pipeline, adt("A01", "P-1", pid(), pv1("4W-412-A")))
    await send(pipeline, adt("A20", "P-2", "NPU|4W^412^B^GENHOSP|K"))
    assert record(store, "Location", LOC, "GENHOSP/4W/412/B")["operationalStatus"]["code"] == "K"
    pending_pv1 = pv1("4W-412-A", tail="|||||||||||||||||||||||4W^414^B^GENHOSP")
    await send(pipeline, adt("A15", "P-3", pid(), pending_pv1))
    planned = ref(store, "4W-414-B")
    assert (planned, "planned") in [(r, s) for r, s, _ in history(store)]
    await send(pipeline, adt("A26", "P-4", pid(), pv1("4W-412-A"), "PV2|4W^414^B^GENHOSP"))
    assert planned not in [r for r, _, _ in history(store)]
    await send(pipeline, adt("A16", "P-5", pid(), pv1("4W-412-A"), "PV2|||||||||20261128120000-0500"))
    await send(pipeline, adt("A25", "P-6", pid(), pv1("4W-412-A")))
    assert "extension" not in record(store, "Encounter", VISIT, "V5001")
    await send(pipeline, adt("A21", "P-7", pid(), pv1("4W-412-A")))
    assert record(store, "Encounter", VISIT, "V5001")["status"] == "onleave"
    await send(pipeline, adt("A22", "P-8", pid(), pv1("4W-412-A")))
    await send(pipeline, adt("A07", "P-9", pid(), pv1("4W-412-A", cls="O")))
    names = [e for e, _ in outbox(store)]
    for expected in (
        "bed.status_changed",
        "encounter.transfer_pending",
        "encounter.transfer_pending_cancelled",
        "encounter.discharge_pending",
        "encounter.discharge_pending_cancelled",
        "encounter.leave_started",
        "encounter.leave_ended",
        "encounter.class_changed",
    ):
        assert expected in names, (expected, names)
    assert names.count("encounter.admitted") == 1  # neither A22 nor A13-like returns count as admissions
    bed = next(p for e, p in outbox(store) if e == "bed.status_changed" and p["status"] == "K")
    assert bed["resource"] == ref(store, "4W-412-B")


async def test_a04_without_visit_number_or_admit_time_stores_the_demographics_with_a_warning(
    pipeline: Pipeline, store: Store
) -> None:
    raw = adt("A04", "W-1", pid("100777"), "PV1|1|O|CLINIC^^^GENHOSP")
    outcome = await pipeline.process_hl7(raw, POLICY)
    segments = {s[:3]: s.split("|") for s in outcome.ack.split("\r") if s}
    assert segments["MSA"][1] == "AA"
    assert segments["ERR"][4] == "W" and segments["ERR"][2].startswith("PV1^1^19")
    assert record(store, "Patient", VISIT, "100777")["birthDate"] == "1975-03-14"
    with store.reader.connect() as conn:
        row = messages.get(conn, outcome.message_id or 0)
    assert row is not None and row.status == "processed"
    assert row.error is not None and row.error.startswith("warning: ") and row.error_location == "PV1-19"
    # a resend is answered from what was stored: the same AA with its warning
    again = await pipeline.process_hl7(raw, POLICY)
    assert again.ack == outcome.ack
