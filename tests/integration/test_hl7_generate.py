"""Messages generated from record events: a Practitioner onboarded over FHIR reaches a foreign MLLP
receiver (python-hl7's server) as an MFN^M02 that hl7apy validates; an update as MFE-1 MUP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hms_ach.store import outbox
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, nurse, start_engine
from tests.integration.hl7_receiver import Hl7Receiver, segments
from tests.integration.outbound_helpers import wait_for


def generating_sink(port: int) -> str:
    return (
        "sinks:\n  - name: staffing\n    type: mllp\n    host: 127.0.0.1\n"
        f"    port: {port}\n    events: [practitioner.onboarded, practitioner.updated]\n"
        "    sending_facility: GENHOSP\n    generate_transform: mfn_to_staffing\n"
        "    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.2\n    ack_timeout_seconds: 3\n"
    )


def strictly_valid(message: str) -> None:
    """hl7apy parses the message against the v2.5.1 MFN_M02 structure, strictly (raises if not)."""
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.name == "MFN_M02"
    parsed.validate()


async def test_a_practitioner_onboarded_over_fhir_reaches_the_receiver_as_a_valid_mfn_m02(
    tmp_path: Path, store: Store
) -> None:
    receiver = Hl7Receiver()
    port = await receiver.start()
    channels = "  - name: fhir_in\n    type: fhir_rest\n" + generating_sink(port)
    engine = await start_engine(tmp_path, store, channels)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{engine.http_port}/fhir", headers=auth_headers(engine)
        ) as http:
            created = await http.post("/Practitioner", json=nurse("E7001", "Okafor"))
            assert created.status_code == 201, created.text
            await wait_for(lambda: len(receiver.accepted) == 1)
            body = created.json()
            body["active"] = False
            updated = await http.put(f"/Practitioner/{body['id']}", json=body)
            assert updated.status_code == 200, updated.text
            await wait_for(lambda: len(receiver.accepted) == 2)
            await asyncio.sleep(0.3)
    finally:
        await engine.stop()
        await receiver.stop()
    for message in receiver.accepted:
        strictly_valid(message)
    onboarded, changed = (segments(m) for m in receiver.accepted)
    assert onboarded["MSH"][8] == "MFN^M02^MFN_M02"
    assert (onboarded["MSH"][4], onboarded["MSH"][5]) == ("STAFFING", "GENHOSP")  # the transform's
    assert onboarded["MFE"][1] == "MAD" and changed["MFE"][1] == "MUP"
    assert onboarded["STF"][1].startswith("E7001^^")
    assert onboarded["STF"][3] == "Okafor^Amara"
    assert (onboarded["STF"][7], changed["STF"][7]) == ("A", "I")
    with store.read() as conn:
        rows = outbox.list_rows(conn, destination="staffing")
    assert sorted(r["status"] for r in rows) == ["delivered", "delivered"]
    assert all("MSA|AA|HMS" in str(r["response"]) for r in rows)


async def test_admission_and_discharge_events_are_generated_as_valid_adt_a01_and_a03(
    tmp_path: Path, store: Store
) -> None:
    from tests.integration.engine_helpers import mllp_channel
    from tests.integration.outbound_helpers import make_engine, send_mllp

    receiver = Hl7Receiver()
    port = await receiver.start()
    sink = (
        f"  - name: adt_out\n    type: mllp\n    host: 127.0.0.1\n    port: {port}\n"
        "    events: [encounter.admitted, encounter.discharged]\n    ack_timeout_seconds: 3\n"
    )
    engine = make_engine(tmp_path, store.url, sink)
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA"]
        await wait_for(lambda: len(receiver.accepted) == 2)
    finally:
        await engine.stop()
        await receiver.stop()
    for message, structure in zip(receiver.accepted, ["ADT_A01", "ADT_A03"], strict=True):
        parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        assert parsed.name == structure
        parsed.validate()
    admitted, discharged = (segments(m) for m in receiver.accepted)
    assert admitted["EVN"][1] == "A01" and discharged["EVN"][1] == "A03"
    assert admitted["PID"][3].startswith("100001^^^^MR")
    assert admitted["PID"][5] == "Rivera^Maria^Elena" and admitted["PID"][8] == "F"
    assert admitted["PV1"][2] == "I" and admitted["PV1"][19] == "V5001"
    assert admitted["PV1"][3] == "4W^412^A^GENHOSP"
    assert discharged["PV1"][45]  # the discharge time
