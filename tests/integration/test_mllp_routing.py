"""Inbound ADT routed through a kind: hl7 transform to a foreign MLLP receiver (python-hl7's server):
each message arrives once, in order, transformed, although the receiver answers AE once and drops
the connection once; the ACKs are kept on the outbox rows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.store import outbox
from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.hl7_receiver import Hl7Receiver, segments
from tests.integration.outbound_helpers import make_engine, send_mllp, wait_for


def routed_sink(port: int, extra: str = "", policy: str = "retry") -> str:
    return (
        f"  - name: downstream\n    type: mllp\n    host: 127.0.0.1\n    port: {port}\n"
        f"    on_negative_ack: {policy}\n    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.2\n"
        "    ack_timeout_seconds: 3\n"
        "    routes:\n      - channel: adt_in\n        message_types: [ADT^A01, ADT^A08, ADT^A03]\n"
        "        transform: adt_to_downstream\n" + extra
    )


def _rows(store: Store, sink: str = "downstream") -> list[dict[str, object]]:
    with store.read() as conn:
        return sorted(outbox.list_rows(conn, destination=sink), key=lambda r: int(str(r["id"])))


async def test_a01_a08_a03_arrive_once_in_order_transformed_despite_an_ae_and_a_drop(
    tmp_path: Path, store: Store
) -> None:
    # 2nd read message (A08): AE; 4th (A03, first try): connection dropped without an answer
    receiver = Hl7Receiver(script=lambda n: {2: "AE", 4: "drop"}.get(n, "AA"))
    port = await receiver.start()
    engine = make_engine(tmp_path, store.url, routed_sink(port))
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(lambda: len(receiver.accepted) == 3)
        await asyncio.sleep(0.3)  # nothing more may come
    finally:
        await engine.stop()
        await receiver.stop()
    assert receiver.answers == ["AA", "AE", "AA", "drop", "AA"]
    assert receiver.connections == 2  # one connection, reopened once after the drop
    got = [segments(m) for m in receiver.accepted]
    assert [g["MSH"][8] for g in got] == ["ADT^A01^ADT_A01", "ADT^A08^ADT_A01", "ADT^A03^ADT_A03"]
    assert [g["MSH"][9] for g in got] == ["S-A01-0001", "S-A08-0001", "S-A03-0001"]
    for g in got:
        assert (g["MSH"][4], g["MSH"][5]) == ("DOWNSTREAM", "DOWNFAC")  # MSH-5/6 rewritten
        assert g["PV1"][2] == "IN"  # PV1-2 I mapped through patient_class_downstream
        assert "NK1" not in g  # dropped
    rows = _rows(store)
    assert [r["status"] for r in rows] == ["delivered"] * 3
    assert [r["attempts"] for r in rows] == [1, 2, 2]
    for row, control_id in zip(rows, ["S-A01-0001", "S-A08-0001", "S-A03-0001"], strict=True):
        answer = str(row["response"])
        assert answer.startswith("ack:\nMSH|")
        assert f"MSA|AA|{control_id}" in answer
        assert "sent:\nMSH|^~\\&|ADTSYS|GENHOSP|DOWNSTREAM|DOWNFAC|" in answer


async def test_an_ae_dead_letters_under_the_default_policy_and_a_filter_skips(
    tmp_path: Path, store: Store
) -> None:
    receiver = Hl7Receiver(script=lambda n: "AE" if n == 1 else "AA")
    port = await receiver.start()
    extra = "      - channel: adt_in\n        message_types: [ADT^A03]\n        filter: PV1-2 = O\n"
    sink = routed_sink(port, policy="dead-letter").replace("[ADT^A01, ADT^A08, ADT^A03]", "[ADT^A01]") + extra
    engine = make_engine(tmp_path, store.url, sink)
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(lambda: len(_rows(store)) == 2 and all(r["status"] != "pending" for r in _rows(store)))
    finally:
        await engine.stop()
        await receiver.stop()
    rows = _rows(store)  # A08 has no route: no row; A03 is inpatient: the filter refuses it
    assert [r["status"] for r in rows] == ["dead", "delivered"]
    assert "MSA|AE|S-A01-0001" in str(rows[0]["response"])
    assert "answered AE" in str(rows[0]["last_error"])
    assert str(rows[1]["response"]).startswith("not routed")
    assert len(receiver.received) == 1
    shown = CliRunner().invoke(app, ["outbox", "show", str(rows[0]["id"]), "--database", store.url])
    assert shown.exit_code == 0, shown.output
    assert "dead" in shown.output and "MSA|AE|S-A01-0001" in shown.output
    assert "sent:\nMSH|^~\\&|ADTSYS|GENHOSP|DOWNSTREAM|DOWNFAC|" in shown.output


async def test_routed_over_tls_to_a_receiver_whose_certificate_is_checked(
    tmp_path: Path, store: Store
) -> None:
    from hms_ach.core.tls import server_context
    from tests.integration.test_tls import Authority

    ca = Authority(tmp_path, "downstream-ca")
    issued = ca.issue("downstream", server=True)
    other = Authority(tmp_path, "other-ca")
    receiver = Hl7Receiver()
    port = await receiver.start(server_context(str(issued.cert), str(issued.key)))
    trusted = routed_sink(port, "    tls: {cafile: " + str(ca.cert) + "}\n")
    untrusted = trusted.replace("name: downstream", "name: untrusted").replace(str(ca.cert), str(other.cert))
    engine = make_engine(tmp_path, store.url, trusted + untrusted)
    await engine.start()
    try:
        assert await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7"]) == ["AA"]
        await wait_for(lambda: len(receiver.accepted) == 1)
        await wait_for(
            lambda: bool(_rows(store, "untrusted")) and bool(_rows(store, "untrusted")[0]["last_error"])
        )
        refused = _rows(store, "untrusted")[0]
    finally:
        await engine.stop()
        await receiver.stop()
    assert segments(receiver.accepted[0])["MSH"][4] == "DOWNSTREAM"
    assert refused["status"] == "pending" and "certificate not trusted" in str(refused["last_error"])
    assert len(receiver.accepted) == 1


async def test_a_fhirpath_filter_routes_by_the_records_the_message_produced(
    tmp_path: Path, store: Store
) -> None:
    receiver = Hl7Receiver()
    port = await receiver.start()
    sink = routed_sink(port).replace(
        "        transform: adt_to_downstream\n",
        "        transform: adt_to_downstream\n"
        "        fhirpath: \"Encounter.status = 'finished' and Encounter.class.code = 'IMP'\"\n",
    )
    engine = make_engine(tmp_path, store.url, sink)
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        await wait_for(
            lambda: len(_rows(store)) == 3 and all(r["status"] == "delivered" for r in _rows(store))
        )
    finally:
        await engine.stop()
        await receiver.stop()
    rows = _rows(store)  # the outcome was decided in the inbound transaction and kept on the event
    expression = "Encounter.status = 'finished' and Encounter.class.code = 'IMP'"
    with store.read() as conn:
        payloads = [
            orjson.loads(str((outbox.get_row(conn, int(str(r["id"]))) or {})["payload"])) for r in rows
        ]
    assert [p["fhirpath"] for p in payloads] == [{expression: False}, {expression: False}, {expression: True}]
    assert [str(r["response"]).startswith("not routed") for r in rows] == [True, True, False]
    assert [segments(m)["MSH"][9] for m in receiver.accepted] == ["S-A03-0001"]  # only the discharge
