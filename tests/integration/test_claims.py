"""Claims end to end: admit, charge (DFT^P03), discharge -> Claim -> 837P file that pyx12 accepts."""

from __future__ import annotations

from pathlib import Path

from outbound_helpers import SECRET, Receiver, make_engine, send_mllp, wait_for

from hms_ach.outbound.x12_837 import validate_with_pyx12
from hms_ach.store.db import Store


def _sinks(url: str, directory: Path, payers: str | None = None) -> str:
    payers = payers if payers is not None else (
        "      - {id: BCBSOH01, name: Blue Cross Blue Shield of Ohio, payer_id: '00834'}\n")
    return (
        f"  - name: finance\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        "    events: ['claim.*', 'encounter.discharged']\n    retry_initial_seconds: 0.05\n"
        f"  - name: claims_837\n    type: x12_837\n    directory: {directory}\n"
        "    sender_id: GENHOSP\n    receiver_id: CLEARHOUSE\n    submitter_name: General Hospital\n"
        "    submitter_phone: '6145550100'\n    receiver_name: Ohio Clearing House\n"
        "    billing_provider:\n      name: General Hospital Physicians\n      npi: '1245319599'\n"
        "      tax_id: '311234567'\n      address: 100 Main St\n      city: Columbus\n      state: OH\n"
        "      zip: '432151234'\n"
        "    payers:\n" + payers + ("" if payers else "      []\n"))


async def test_discharge_makes_a_claim_and_an_837p_that_pyx12_accepts(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    engine = make_engine(tmp_path, store.url, _sinks(url, out))
    await engine.start()
    try:
        codes = await send_mllp(engine.channels["adt_in"].port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(lambda: "claim.file_written" in receiver.names() or "claim.file_rejected" in receiver.names()
                       or "claim.error" in receiver.names())
    finally:
        await engine.stop()
        await receiver.stop()
    names = receiver.names()
    assert "claim.file_written" in names, receiver.events
    assert names.index("encounter.discharged") < names.index("claim.created") < names.index("claim.file_written")
    files = sorted(out.glob("*.x12"))
    assert len(files) == 1
    text = files[0].read_text()
    report, ok, errors = validate_with_pyx12(text)
    assert ok and errors == [], errors
    assert "CLM*" in text and "*475*" in text  # 350 + 125
    assert "SV1*HC:99223*350*UN*1" in text and "HI*ABK:J189" in text
    assert "NM1*PR*2*BLUE CROSS BLUE SHIELD OF OHIO*****PI*00834" in text
    assert "NM1*IL*1*RIVERA*MARIA*ELENA***MI*XOH884512001" in text


async def test_a_payer_missing_from_configuration_is_a_claim_error_and_no_file(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    engine = make_engine(tmp_path, store.url, _sinks(url, out, payers=""))
    await engine.start()
    try:
        codes = await send_mllp(engine.channels["adt_in"].port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(lambda: "claim.error" in receiver.names())
    finally:
        await engine.stop()
        await receiver.stop()
    error = receiver.events[receiver.names().index("claim.error")]
    assert "BCBSOH01" in error["data"]["reason"] and "not configured" in error["data"]["reason"]
    assert not list(out.rglob("*.x12"))


async def test_control_numbers_are_unique_and_persisted(store: Store) -> None:
    from hms_ach.outbound.x12_837 import next_number

    seen = []
    for _ in range(3):
        with store.writer.begin() as conn:
            seen.append(next_number(conn, "x12.isa13"))
    assert seen == [1, 2, 3]


def test_pyx12_reports_a_wrong_segment_count() -> None:
    good = (Path(__file__).parent / "data" / "claim_837p.x12").read_text()
    assert validate_with_pyx12(good)[1]
    report, ok, errors = validate_with_pyx12(good.replace("SE*27*0001", "SE*26*0001"))
    assert not ok and errors
    assert "IK5*R" in report or "IK5*E" in report


async def test_claim_is_served_as_fhir_claim(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    engine = make_engine(tmp_path, store.url, _sinks(url, tmp_path / "x12"))
    await engine.start()
    try:
        await send_mllp(engine.channels["adt_in"].port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        await wait_for(lambda: "claim.created" in receiver.names())
    finally:
        await engine.stop()
        await receiver.stop()
    claim_ref = receiver.events[receiver.names().index("claim.created")]["data"]["resource"]
    from hms_ach.store.repository import Repository

    with store.reader.connect() as conn:
        claim = Repository(conn).get("Claim", claim_ref.split("/")[1])
    assert claim is not None and claim["total"] == {"value": 475.0, "currency": "USD"}
    assert [i["productOrService"]["coding"][0]["code"] for i in claim["item"]] == ["71046", "99223"]
