"""One staff record from many sources (issue 17, survivorship), on SQLite and PostgreSQL.

The three samples of nurse Amara Osei arrive through real channels of one engine: the staff master
file (``samples/hl7/mfn_m02.hl7``) over MLLP, the FHIR onboarding Bundle
(``samples/fhir/onboard_nurse_bundle.json``) over HTTP and the HR roster
(``samples/csv/staff_roster.csv``) dropped in a directory. In each of the six orders she is one
Practitioner with the union of her credentials, each element set by the source the
``workforce.survivorship`` rules declare, and no write is refused (no 409).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import orjson
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.channels.file_drop import FileDropChannel
from hms_ach.store.db import Store
from hms_ach.workforce.survivorship import CONFLICT_EVENT, SOURCE_EXT, conflicts_of, sources_of
from tests.integration.engine_helpers import FHIR_JSON, STAFF, auth_headers, mllp_channel, start_engine

ROOT = Path(__file__).resolve().parents[2]
MFN = (ROOT / "samples" / "hl7" / "mfn_m02.hl7").read_bytes()
BUNDLE = (ROOT / "samples" / "fhir" / "onboard_nurse_bundle.json").read_bytes()
ROSTER = (ROOT / "samples" / "csv" / "staff_roster.csv").read_bytes()
NPI = "http://hl7.org/fhir/sid/us-npi"
NURSE_NPI = "1356702989"

#: The rules of the shipped channels.yaml, for this engine's channel names.
RULES = """\
workforce:
  survivorship:
    match_systems: [http://hl7.org/fhir/sid/us-npi, urn:hms-ach:id:staff]
    elements:
      name: [roster_drop, adt_in, fhir_in]
      telecom: [roster_drop, adt_in, fhir_in]
      address: [roster_drop, adt_in, fhir_in]
      birthDate: [roster_drop, adt_in, fhir_in]
      gender: [roster_drop, adt_in, fhir_in]
      extension: [roster_drop, fhir_in, adt_in]
      identifier: [adt_in, roster_drop, fhir_in]
      qualification: [adt_in, fhir_in, roster_drop]
      qualification.verification: [fhir_in]
"""


async def _engine(tmp_path: Path, store: Store, rules: str = RULES) -> Engine:
    """The engine with the three channels (MLLP, FHIR, a CSV roster drop), then ``rules`` (a
    top-level ``workforce:`` section after the channel list)."""
    (tmp_path / "drop").mkdir()
    return await start_engine(
        tmp_path,
        store,
        "  - {name: adt_in, type: mllp, host: 127.0.0.1, port: 0}\n"
        "  - {name: fhir_in, type: fhir_rest, max_body_bytes: 262144}\n"
        "  - name: roster_drop\n    type: file_drop\n"
        f"    directory: {tmp_path / 'drop'}\n    work_dir: {tmp_path / 'work'}\n"
        "    csv: {dataset: staff_roster}\n    min_file_age_seconds: 0\n    stable_seconds: 0\n"
        "    poll_interval_seconds: 3600\n" + rules,
    )


async def _mfn(eng: Engine, raw: bytes = MFN) -> str:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", mllp_channel(eng).port, limit=1 << 20)
    try:
        writer.writemessage(hl7.parse(raw.decode("latin-1")))
        await writer.drain()
        ack = str(await asyncio.wait_for(reader.readmessage(), 20))
    finally:
        writer.close()
    return ack.replace("\n", "\r").split("\r")[1].split("|")[1]  # MSA-1


async def _bundle(eng: Engine, body: bytes = BUNDLE) -> int:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"http://127.0.0.1:{eng.http_port}/fhir", content=body, headers={**auth_headers(eng), **FHIR_JSON}
        )
    assert answer.status_code == 200, answer.text
    return answer.status_code


async def _roster(eng: Engine, tmp_path: Path, data: bytes = ROSTER, name: str = "staff_roster.csv") -> str:
    path = tmp_path / "drop" / name
    path.write_bytes(data)
    then = time.time() - 60
    os.utime(path, (then, then))
    channel = eng.channels["roster_drop"]
    assert isinstance(channel, FileDropChannel)
    result = await channel.poll()
    assert not result.error, result.error
    return "processed" if (tmp_path / "drop" / "processed" / name).exists() else "error"


async def _nurses(eng: Engine) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30, headers=auth_headers(eng)) as client:
        found = await client.get(f"http://127.0.0.1:{eng.http_port}/fhir/Practitioner?family=Osei")
    assert found.status_code == 200, found.text
    return [e["resource"] for e in found.json().get("entry", [])]


def _by(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


ORDERS = list(itertools.permutations(("mfn", "bundle", "roster")))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
async def test_three_sources_in_any_order_make_one_nurse(
    order: tuple[str, ...], tmp_path: Path, store: Store
) -> None:
    """MFN^M02, FHIR onboarding Bundle and CSV roster for the same nurse, in each of the six orders:
    one Practitioner, the union of her credentials, each element from the declared source, no 409."""
    eng = await _engine(tmp_path, store)
    try:
        for step in order:
            if step == "mfn":
                assert await _mfn(eng) == "AA"
            elif step == "bundle":
                await _bundle(eng)  # 200, never 409
            else:
                assert await _roster(eng, tmp_path) == "processed"
        nurses = await _nurses(eng)
    finally:
        await eng.stop()
    assert len(nurses) == 1, [n.get("identifier") for n in nurses]
    nurse = nurses[0]
    # the union of her credentials: the RN licence (MFN, roster, FHIR) and the BLS certificate (FHIR)
    quals = {q["identifier"][0]["value"]: q for q in nurse["qualification"]}
    assert sorted(quals) == ["BLS-20934", "RN-884213"]
    rn = {e["url"]: e for e in quals["RN-884213"].get("extension", [])}
    assert rn["urn:hms-ach:fhir:StructureDefinition/verification-status"]["valueCode"] == "verified"
    bls = {e["url"]: e for e in quals["BLS-20934"]["extension"]}
    assert bls["urn:hms-ach:fhir:StructureDefinition/verification-status"]["valueCode"] == "pending"
    # the licence's fields are the staff master file's (its declared source), gaps filled by the others
    assert quals["RN-884213"]["code"]["coding"][0]["code"] == "SL"
    assert quals["RN-884213"]["period"] == {"start": "2025-01-01", "end": "2027-12-31"}
    # one identifier per system: her staff number is the same in all three samples
    ids = {i["system"]: i["value"] for i in nurse["identifier"]}
    assert ids == {NPI: NURSE_NPI, STAFF: "E2001"}, nurse["identifier"]
    assert len(nurse["identifier"]) == 2
    # each element from its declared source
    src = sources_of(nurse)
    assert src["name"] == "roster_drop"
    assert src["birthDate"] == "roster_drop"
    assert src["telecom[phone|work]"] == "roster_drop"
    assert src["telecom[email|work]"] == "roster_drop"
    assert src[f"identifier[{NPI}]"] == "adt_in"
    assert src[f"identifier[{STAFF}]"] == "adt_in"
    assert src["qualification[RN-884213]"] == "adt_in"
    assert src["qualification[BLS-20934]"] == "fhir_in"
    assert src["qualification[RN-884213].verification"] == "fhir_in"
    assert nurse["name"] == [{"family": "Osei", "given": ["Amara"]}]
    assert _by(nurse["telecom"], system="phone", use="work")["value"] == "614-555-0177"
    assert nurse["birthDate"] == "1988-07-09"
    assert conflicts_of(nurse) == []


@pytest.mark.timeout(120)
async def test_a_conflict_the_rules_cannot_settle_is_stored_with_an_event(
    tmp_path: Path, store: Store
) -> None:
    """Two sources that the gender rule does not rank disagree: the first value is kept, the refused
    one is stored on the record, and practitioner.conflict is in the outbox; no value is lost."""
    rules = "workforce:\n  survivorship:\n    elements:\n      gender: [some_other_feed]\n"
    eng = await _engine(tmp_path, store, rules)
    try:
        assert await _mfn(eng) == "AA"
        male = ROSTER.replace(b"Osei,Amara,F,", b"Osei,Amara,M,")
        assert await _roster(eng, tmp_path, male) == "processed"
        [nurse] = await _nurses(eng)
        with store.reader.connect() as conn:
            from hms_ach.store.outbox import EVENTS  # noqa: PLC0415

            events = [
                orjson.loads(r.payload) for r in conn.execute(EVENTS.select()) if r.event == CONFLICT_EVENT
            ]
    finally:
        await eng.stop()
    assert nurse["gender"] == "female"
    assert conflicts_of(nurse) == [
        {"element": "gender", "kept": "adt_in", "refused": "roster_drop", "value": '"male"'}
    ]
    assert [(e["element"], e["keptSource"], e["refusedSource"]) for e in events] == [
        ("gender", "adt_in", "roster_drop")
    ]
    assert any(e["url"] == SOURCE_EXT for e in nurse["extension"])
