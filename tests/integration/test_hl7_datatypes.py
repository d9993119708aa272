"""Datatype-exact sources end to end (SQLite, and PostgreSQL when set): a v2.3 birth date with its
precision component and money amounts with their currency are stored, and a DFT^P03 without FT1-2
gets a derived key, so that its resend (a new control id, the same charges) changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from hms_ach.hl7v2.ack import msa_code
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.repository import Repository
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
POLICY = Hl7Policy("adt_in")
MRN = "urn:hms-ach:id:GENHOSP"


def message(kind: str, control_id: str, *segments: str, version: str = "2.5.1") -> bytes:
    msh = f"MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261127020000-0500||{kind}|{control_id}|P|{version}"
    return ("\r".join([msh, f"EVN|{kind[4:7]}|20261127020000-0500", *segments]) + "\r").encode()


PID = "PID|1||100001^^^GENHOSP^MR||Rivera^Maria||19750314^D|F"
PV1 = "PV1|1|I|4W^412^A^GENHOSP||||||||||||||||V5001^^^GENHOSP^VN"
FT1S = (
    "FT1|1|||20191122|20191122|CG|71045^Xray exam chest 1 view^C4|||2|100&USD|50&USD",
    "FT1|2|||20191122|20191122|CG|99213^Office visit^C4|||1|120&USD",
)


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


async def send(pipeline: Pipeline, raw: bytes) -> None:
    outcome = await pipeline.process_hl7(raw, POLICY)
    assert msa_code(outcome.ack) == "AA", outcome.ack


def versions(store: Store, resource_type: str) -> list[int]:
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        return sorted(int(v) for v in conn.execute(select(table.c.version_id)).scalars())


async def test_v23_precision_and_money_with_currency_are_read_by_datatype(
    pipeline: Pipeline, store: Store
) -> None:
    await send(pipeline, message("ADT^A04", "D-1", PID, PV1, version="2.3"))
    with store.reader.connect() as conn:
        found = Repository(conn).find_by_key("Patient", MRN, "100001")
    assert found is not None and found[1]["birthDate"] == "1975-03-14"
    await send(pipeline, message("DFT^P03", "D-2", PID, PV1, *FT1S))
    table = RECORD_TABLES["Charge"].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        count = conn.execute(select(func.count()).select_from(table)).scalar_one()
    assert count == 2
    with store.reader.connect() as conn:
        charge = Repository(conn).find_by_key(
            "Charge", "urn:hms-ach:charge-derived", "GENHOSP|V5001|1|20191122|71045"
        )
    assert charge is not None and (charge[1]["amount"], charge[1]["units"]) == (100.0, 2)
    # the same charges again under a new control id: the derived keys find them, nothing changes
    await send(pipeline, message("DFT^P03", "D-3", PID, PV1, *FT1S))
    assert versions(store, "Charge") == [1, 1]
    assert versions(store, "ChargeItem") == [1, 1]
