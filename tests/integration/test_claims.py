"""Claims end to end: admit, charge (DFT^P03), discharge -> Claim -> 837P file that pyx12 accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hms_ach.billing.x12_837 import validate_with_pyx12
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, local_authenticator, mllp_channel
from tests.integration.outbound_helpers import SAMPLES, SECRET, Receiver, make_engine, send_mllp, wait_for


def _sinks(url: str, directory: Path, payers: str | None = None) -> str:
    payers = (
        payers
        if payers is not None
        else ("      - {id: BCBSOH01, name: Blue Cross Blue Shield of Ohio, payer_id: '00834'}\n")
    )
    return (
        f"  - name: finance\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        "    events: ['claim.*', 'encounter.discharged']\n    retry_initial_seconds: 0.05\n"
        f"  - name: claims_837\n    type: x12_837\n    directory: {directory}\n"
        "    sender_id: GENHOSP\n    receiver_id: CLEARHOUSE\n    submitter_name: General Hospital\n"
        "    submitter_phone: '6145550100'\n    receiver_name: Ohio Clearing House\n"
        "    billing_provider:\n      name: General Hospital Physicians\n      npi: '1245319599'\n"
        "      tax_id: '311234567'\n      address: 100 Main St\n      city: Columbus\n      state: OH\n"
        "      zip: '432151234'\n"
        "    revenue_codes: {'99223': '0987', '71046': '0324'}\n"
        "    payers:\n" + payers + ("" if payers else "      []\n")
    )


def _outpatient(tmp_path: Path) -> list[str]:
    """The admit, charge and discharge samples with PV1-2 O (outpatient): a professional claim, 837P."""
    names = []
    for name in ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"]:
        text = (SAMPLES / name).read_text().replace("PV1|1|I|", "PV1|1|O|")
        assert "PV1|1|O|" in text
        (tmp_path / f"op_{name}").write_text(text)
        names.append(str(tmp_path / f"op_{name}"))  # an absolute path: SAMPLES / it is itself
    return names


async def test_discharge_makes_a_claim_and_an_837p_that_pyx12_accepts(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    engine = make_engine(tmp_path, store.url, _sinks(url, out))
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, _outpatient(tmp_path))
        assert codes == ["AA", "AA", "AA"]
        await wait_for(
            lambda: (
                "claim.file_written" in receiver.names()
                or "claim.file_rejected" in receiver.names()
                or "claim.error" in receiver.names()
            )
        )
    finally:
        await engine.stop()
        await receiver.stop()
    names = receiver.names()
    assert "claim.file_written" in names, receiver.events
    assert (
        names.index("encounter.discharged") < names.index("claim.created") < names.index("claim.file_written")
    )
    files = sorted(out.glob("*.x12"))
    assert len(files) == 1
    text = files[0].read_text()
    report, ok, errors = validate_with_pyx12(text)
    assert ok and errors == [], errors
    assert "CLM*" in text and "*475*" in text  # 350 + 125
    assert "SV1*HC:99223*350*UN*1" in text and "HI*ABK:J189" in text
    assert "NM1*PR*2*BLUE CROSS BLUE SHIELD OF OHIO*****PI*00834" in text
    assert "NM1*IL*1*RIVERA*MARIA*ELENA***MI*XOH884512001" in text


async def test_a_payer_missing_from_configuration_is_a_claim_error_and_no_file(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    engine = make_engine(tmp_path, store.url, _sinks(url, out, payers=""))
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(lambda: "claim.error" in receiver.names())
    finally:
        await engine.stop()
        await receiver.stop()
    error = receiver.events[receiver.names().index("claim.error")]
    assert "BCBSOH01" in error["data"]["reason"] and "not configured" in error["data"]["reason"]
    assert not list(out.rglob("*.x12"))


async def test_control_numbers_are_unique_and_persisted(store: Store) -> None:
    from hms_ach.store.control_numbers import next_number

    seen = []
    for _ in range(3):
        with store.writer.begin() as conn:
            seen.append(next_number(conn, "x12.isa13"))
    assert seen == [1, 2, 3]


async def test_an_inpatient_discharge_makes_an_837i_that_pyx12_accepts(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    engine = make_engine(tmp_path, store.url, _sinks(url, out))
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(
            lambda: (
                "claim.file_written" in receiver.names()
                or "claim.file_rejected" in receiver.names()
                or "claim.error" in receiver.names()
            )
        )
    finally:
        await engine.stop()
        await receiver.stop()
    assert "claim.file_written" in receiver.names(), receiver.events
    files = sorted(out.glob("*.x12"))
    assert [f.name[:5] for f in files] == ["837I-"]
    text = files[0].read_text()
    report, ok, errors = validate_with_pyx12(text)
    assert ok and errors == [], errors
    segments = [s.strip() for s in text.split("~") if s.strip()]
    assert "ST*837*0001*005010X223A2" in segments
    clm = next(s for s in segments if s.startswith("CLM*")).split("*")
    lines = [s.split("*") for s in segments if s.startswith("SV2*")]
    assert clm[2] == "475" and sum(float(x[3]) for x in lines) == 475  # CLM02 = sum of SV203
    assert clm[5] == "11:A:1"
    assert ["SV2", "0324", "HC:71046", "125", "UN", "1"] in lines and [
        "SV2",
        "0987",
        "HC:99223",
        "350",
        "UN",
        "1",
    ] in lines
    assert "HI*ABK:J189" in segments and "HI*ABJ:J189" in segments
    assert any(s.startswith("NM1*71*1*CHEN*LISA****XX*1234567893") for s in segments)  # attending, PV1-7
    assert any(s.startswith("DTP*435*DT*20261126") for s in segments)
    assert any(s.startswith("CL1*1*") for s in segments)


async def test_an_837i_without_a_revenue_code_is_rejected_with_the_reason(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    sinks = _sinks(url, out).replace(
        "    revenue_codes: {'99223': '0987', '71046': '0324'}\n", "    revenue_codes: {'99223': '0987'}\n"
    )
    engine = make_engine(tmp_path, store.url, sinks)
    await engine.start()
    try:
        await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        await wait_for(
            lambda: "claim.file_rejected" in receiver.names() or "claim.file_written" in receiver.names()
        )
    finally:
        await engine.stop()
        await receiver.stop()
    rejected = receiver.events[receiver.names().index("claim.file_rejected")]["data"]
    assert any("no revenue code for procedure '71046'" in p for p in rejected["problems"]), rejected
    assert not list(out.glob("*.x12")) and list((out / "rejected").glob("837I-*.x12"))


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
        await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
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


async def test_837_files_are_uploaded_by_sftp_with_a_pinned_host_key(tmp_path: Path, store: Store) -> None:
    import asyncssh

    from hms_ach.store.models import OutboxRow
    from tests.integration.sftp_server import PASSWORD, USER, SftpServer

    root = tmp_path / "sftp_root"
    (root / "claims").mkdir(parents=True)
    real_key, wrong_key = (
        asyncssh.generate_private_key("ssh-ed25519"),
        asyncssh.generate_private_key("ssh-ed25519"),
    )
    server = await SftpServer(root, real_key).start()
    known_hosts = server.known_hosts(tmp_path / "known_hosts", wrong_key)  # pinned to the wrong key first
    receiver = Receiver()
    url = await receiver.start()
    out = tmp_path / "x12"
    sinks = _sinks(url, out) + (
        f"    sftp:\n      host: 127.0.0.1\n      port: {server.port}\n      username: {USER}\n"
        f"      password: {PASSWORD}\n      known_hosts: {known_hosts}\n      remote_directory: /claims\n"
    )
    engine = make_engine(
        tmp_path,
        store.url,
        sinks.replace(
            "retry_initial_seconds: 0.05", "retry_initial_seconds: 0.05\n    retry_max_seconds: 0.2"
        ),
    )
    table = OutboxRow.__table__  # type: ignore[attr-defined]

    def row() -> Any:
        with store.reader.connect() as conn:
            return conn.execute(
                table.select().where(table.c.destination == "claims_837", table.c.event == "claim.created")
            ).first()

    await engine.start()
    try:
        await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        await wait_for(lambda: row() is not None and row().attempts >= 1)
        first = row()
        assert first.status == "pending" and "host key does not match" in first.last_error
        assert list(out.glob("837I-*.x12")) and not list((root / "claims").iterdir())
        assert "claim.file_written" not in receiver.names()
        server.known_hosts(known_hosts)  # the right key: the next attempt uploads the file written before
        await wait_for(lambda: "claim.file_written" in receiver.names())
    finally:
        await engine.stop()
        await receiver.stop()
        await server.close()
    local = sorted(out.glob("837I-*.x12"))
    remote = sorted((root / "claims").iterdir())
    assert [p.name for p in remote] == [p.name for p in local] and len(local) == 1  # no .part left, one file
    assert remote[0].read_bytes() == local[0].read_bytes()
    written = receiver.events[receiver.names().index("claim.file_written")]["data"]
    assert written["sftp"] == f"/claims/{local[0].name}" and written["total"] == 475.0
    assert receiver.names().count("claim.file_written") == 1


async def test_claims_and_coverage_are_read_and_searched_under_fhir(tmp_path: Path, store: Store) -> None:
    import httpx
    from fhir.resources.R4B.claim import Claim as R4BClaim

    from hms_ach.app.http import create_app

    engine = make_engine(tmp_path, store.url, "  []\n")
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
    finally:
        await engine.stop()
    auth = local_authenticator(tmp_path / "data")
    transport = httpx.ASGITransport(app=create_app(store, authenticator=auth))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost/fhir", headers=auth_headers(auth)
    ) as http:
        found = (await http.get("/Claim", params={"status": "active"})).json()
        assert found["resourceType"] == "Bundle" and len(found["entry"]) == 1
        claim = found["entry"][0]["resource"]
        R4BClaim.model_validate(claim)  # a valid R4 Claim
        assert claim["type"]["coding"][0]["code"] == "institutional"  # PV1-2 I
        read = await http.get(f"/Claim/{claim['id']}")
        assert read.status_code == 200 and read.json()["total"]["value"] == 475.0
        encounter = claim["item"][0]["encounter"][0]["reference"]
        by_encounter = (await http.get("/Claim", params={"encounter": encounter})).json()
        assert [e["resource"]["id"] for e in by_encounter["entry"]] == [claim["id"]]
        coverage = (await http.get("/Coverage", params={"patient": claim["patient"]["reference"]})).json()
        assert len(coverage["entry"]) == 1
        declared = {r["type"]: r for r in (await http.get("/metadata")).json()["rest"][0]["resource"]}
        assert {i["code"] for i in declared["Claim"]["interaction"]} == {
            "read",
            "vread",
            "history-instance",
            "history-type",
            "search-type",
        }
        refused = await http.post("/Claim", json={"resourceType": "Claim"})
        assert refused.status_code in (404, 405)
