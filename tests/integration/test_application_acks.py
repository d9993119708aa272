"""Application ACKs as MSH-15 and MSH-16 ask (HL7 table 0155: AL, NE, ER, SU), over the real MLLP
listener with python-hl7's client as the foreign sender, on SQLite (and PostgreSQL when set): every
combination for a processed message, one with a content error and one refused before processing;
original mode; resends answered with both stored ACKs; ``hms-ach send``; and the file_drop channel."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hl7
import hl7.mllp
import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.runtime import Engine
from hms_ach.channels.file_drop import FileDropChannel, FileDropConfig
from hms_ach.channels.mllp import unavailable_ack
from hms_ach.hl7v2.ack import msa_code, split_acks
from hms_ach.hl7v2.client import send_each
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import mllp_channel, mllp_yaml, running_engine

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
#: One message per outcome: processed (AA), a content error (AE: PID-8 Q is not a sex code) and
#: refused before processing (AR: processing id Q is not accepted).
OUTCOMES = {
    "ok": (SAMPLES / "adt_a01.hl7").read_bytes(),
    "error": (SAMPLES / "bad" / "bad_sex_code.hl7").read_bytes(),
    "refused": (SAMPLES / "adt_a01.hl7").read_bytes().replace(b"|P|2.5.1", b"|Q|2.5.1", 1),
}
CONDITIONS = ["AL", "NE", "ER", "SU"]


def with_msh(raw: bytes, control_id: str, accept: str = "", application: str = "") -> bytes:
    """``raw`` with MSH-10, MSH-15 and MSH-16 set (MSH-15/16 empty: original mode)."""
    first, rest = raw.replace(b"\n", b"\r").split(b"\r", 1)
    fields = first.decode().split("|")
    fields += [""] * (17 - len(fields))
    fields[9], fields[14], fields[15] = control_id, accept, application
    return ("|".join(fields).rstrip("|") + "\r").encode() + rest


def expected(accept: str, application: str, outcome: str) -> list[str]:
    """MSA-1 of each ACK the sender should get, in order, as HL7 v2.5 chapter 2 says."""
    result = {"ok": "AA", "error": "AE", "refused": "AR"}[outcome]
    if not accept and not application:
        return [result]  # original mode: one ACK, the application ACK
    # commit: a message refused before processing is CR; any other was committed (CA)
    commit = "CR" if outcome == "refused" else "CA"
    sent = []
    if accept == "AL" or (accept == "ER" and commit == "CR") or (accept == "SU" and commit == "CA"):
        sent.append(commit)
    if outcome != "refused" and (
        application == "AL"
        or (application == "ER" and result == "AE")
        or (application == "SU" and result == "AA")
    ):
        sent.append(result)
    # refused, and MSH-15 wants no CR: the application ACK the sender asked for says AR, so that the
    # refusal is never silent (the standard would send nothing at all)
    if outcome == "refused" and not sent and application in ("AL", "ER"):
        sent.append("AR")
    return sent


def stored(store: Store, control_id: str) -> messages.StoredMessage:
    """The stored message (not a duplicate row) with MSH-10 ``control_id``."""
    with store.read() as conn:
        ids = [r.id for r in messages.list_messages(conn, limit=1000) if r.control_id == control_id]
        rows = [row for row in (messages.get(conn, int(i)) for i in ids) if row and row.status != "duplicate"]
    assert len(rows) == 1, (control_id, rows)
    return rows[0]


def fields(ack: str, segment: str) -> list[str]:
    return next(s for s in ack.replace("\n", "\r").split("\r") if s.startswith(segment)).split("|")


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 30")) as eng:
        yield eng


class Hl7Sender:
    """python-hl7's asyncio MLLP client on one connection. After each message it sends a probe in
    original mode and reads up to the probe's ACK: what came before it is all the message got."""

    def __init__(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter):
        self.reader, self.writer = reader, writer
        self.probes = itertools.count(1)

    async def send(self, raw: bytes) -> list[str]:
        probe = f"PROBE-{next(self.probes)}"
        got: list[str] = []
        for message in (raw, with_msh(OUTCOMES["ok"], probe)):
            self.writer.writemessage(hl7.parse(message.decode("latin-1")))
        await self.writer.drain()
        while True:
            ack = str(await asyncio.wait_for(self.reader.readmessage(), 20))
            if fields(ack, "MSA")[2] == probe:
                assert msa_code(ack.replace("\n", "\r")) == "AA", ack
                return got
            got.append(ack)


@pytest.mark.timeout(180)
async def test_every_msh_15_and_16_combination_gets_exactly_the_acks_it_asks_for(engine: Engine) -> None:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", mllp_channel(engine).port, limit=1 << 20)
    sender = Hl7Sender(reader, writer)
    cases = [("", "")] + list(itertools.product(CONDITIONS, CONDITIONS))
    try:
        for (accept, application), outcome in itertools.product(cases, OUTCOMES):
            control_id = f"{outcome}-{accept or 'O'}-{application or 'O'}"
            acks = await sender.send(with_msh(OUTCOMES[outcome], control_id, accept, application))
            where = (accept, application, outcome, acks)
            assert [fields(a, "MSA")[1] for a in acks] == expected(accept, application, outcome), where
            for ack in acks:
                msh, msa = fields(ack, "MSH"), fields(ack, "MSA")
                assert msa[2] == control_id, where  # MSA-2 is the message's control id
                assert msh[8] == "ACK^A01^ACK", where
                if msa[1] in ("AE", "AR", "CR"):
                    assert fields(ack, "ERR")[3].split("^")[0] in ("103", "202"), where
                if accept or application:
                    application_ack = msa[1] in ("AA", "AE", "AR")  # enhanced mode: the commit ACK says CA/CR
                    # the application ACK asks for no ACK back; the commit ACK is an ordinary ACK
                    assert (msh[14:16] == ["NE", "NE"]) is application_ack, where
            if len(acks) == 2:  # the commit ACK, then the application ACK: two messages of their own
                assert fields(acks[0], "MSH")[9] != fields(acks[1], "MSH")[9]
    finally:
        writer.close()
    # what is stored: the outcome's code, and both ACKs (a resend is answered from them)
    row = stored(engine.store, "error-AL-ER")
    assert (row.status, row.ack_code) == ("error", "AE")
    assert [msa_code(a) for a in split_acks(row.ack or "")] == ["CA", "AE"]
    row = stored(engine.store, "refused-AL-AL")
    assert (row.status, row.ack_code, [msa_code(a) for a in split_acks(row.ack or "")]) == (
        "rejected",
        "CR",
        ["CR"],
    )
    assert stored(engine.store, "ok-NE-NE").status == "processed"  # processed, though nothing was sent


@pytest.mark.timeout(120)
async def test_resends_get_both_stored_acks_and_hms_ach_send_reads_them(
    engine: Engine, tmp_path: Path
) -> None:
    port = mllp_channel(engine).port
    ok_al_al = with_msh(OUTCOMES["ok"], "R-1", "AL", "AL")
    error_al_er = with_msh(OUTCOMES["error"], "R-2", "AL", "ER")
    ok_al_er = with_msh(OUTCOMES["ok"], "R-3", "AL", "ER")
    ok_ne_al = with_msh(OUTCOMES["ok"], "R-4", "NE", "AL")
    refused = with_msh(OUTCOMES["refused"], "R-5", "AL", "AL")
    ok_ne_ne = with_msh(OUTCOMES["ok"], "R-6", "NE", "NE")
    batch = [ok_al_al, ok_al_al, error_al_er, error_al_er, ok_al_er, ok_ne_al, refused, ok_ne_ne, ok_al_al]
    started = time.monotonic()
    sent = await send_each("127.0.0.1", port, batch, timeout=20, conditional_wait=0.5)
    took = time.monotonic() - started
    codes = [[msa_code(a.decode()) for a in s.acks] for s in sent]
    assert [s.error for s in sent] == [None] * len(batch)
    assert codes == [
        ["CA", "AA"],
        ["CA", "AA"],
        ["CA", "AE"],
        ["CA", "AE"],
        ["CA"],
        ["AA"],
        ["CR"],
        [],
        ["CA", "AA"],
    ]
    # a resend is answered with the stored ACKs, byte for byte, the application ACK included
    assert sent[1].acks == sent[0].acks and sent[3].acks == sent[2].acks and sent[8].acks == sent[0].acks
    assert sent[5].ack is None and sent[5].app_ack is not None  # MSH-15 NE: only the application ACK
    assert not sent[7].ack_expected
    assert took < 15  # one conditional wait (R-3: AE only on error) of 0.5 s, no timeouts
    with engine.store.read() as conn:
        statuses = sorted(str(r.status) for r in messages.list_messages(conn, limit=100))
    assert statuses.count("duplicate") == 3

    files = []
    for name, raw in (("both.hl7", with_msh(OUTCOMES["ok"], "CLI-1", "AL", "AL")), ("bad.hl7", error_al_er)):
        files.append(tmp_path / name)
        files[-1].write_bytes(raw)
    args = ["send", *map(str, files), "--port", str(port), "--timeout", "20", "--conditional-ack-wait", "0.5"]
    run = await asyncio.to_thread(CliRunner().invoke, app, args)
    assert run.exit_code == 1, run.output  # the AE fails the run
    out = run.output.replace("\n", "\r")
    assert "both.hl7 -> ACK CA" in run.output and "both.hl7 -> application ACK AA" in run.output
    assert "bad.hl7 -> application ACK AE" in run.output and "MSA|AE|R-2" in out


@pytest.mark.timeout(60)
async def test_send_to_a_receiver_that_ignores_msh_16() -> None:
    """A python-hl7 receiver that answers every message with one commit ACK CA, and before that a
    stray ACK for a message never sent: ``send_each`` skips the stray one, keeps the commit ACK and
    reports the missing application ACK (MSH-16 AL) after its deadline, then goes on."""

    async def answer(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                received = await reader.readmessage()
                stray = hl7.parse(str(received.create_ack("AA")).replace("|S-", "|OLD-"))
                writer.writemessage(stray)
                writer.writemessage(received.create_ack("CA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await hl7.mllp.start_hl7_server(answer, "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    try:
        batch = [with_msh(OUTCOMES["ok"], "S-1", "AL", "AL"), with_msh(OUTCOMES["ok"], "S-2", "AL", "NE")]
        sent = await send_each("127.0.0.1", port, batch, timeout=1.0)
    finally:
        server.close()
        await server.wait_closed()
    assert sent[0].ack is not None and msa_code(sent[0].ack.decode()) == "CA" and sent[0].app_ack is None
    assert sent[0].error is not None and "but no application ACK (MSH-16 AL)" in sent[0].error
    assert sent[1].error is None and sent[1].ack is not None and b"|CA|S-2" in sent[1].ack


def test_a_store_that_cannot_commit_answers_ce_and_no_application_ack() -> None:
    policy = Hl7Policy("adt_in")
    ack = unavailable_ack(with_msh(OUTCOMES["ok"], "U-1", "AL", "AL"), policy)
    assert ack is not None and msa_code(ack.decode()) == "CE"  # not stored: send it again
    assert unavailable_ack(with_msh(OUTCOMES["ok"], "U-2", "SU", "AL"), policy) is None  # SU: no error ACK


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def _drop(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "drop" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    then = time.time() - 60
    os.utime(path, (then, then))


async def test_file_drop_stores_both_acks_and_judges_a_resend_by_the_application_ack(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """A file sends no ACK: the channel stores what it would have sent, both ACKs in enhanced mode,
    and a resend of a message whose application ACK was AE (its commit ACK CA) is still an error."""
    config = FileDropConfig.model_validate(
        dict(
            name="drop_in",
            type="file_drop",
            directory=str(tmp_path / "drop"),
            min_file_age_seconds=0,
            stable_seconds=0,
            work_dir=str(tmp_path / "work"),
        )
    )
    (tmp_path / "drop").mkdir()
    channel = FileDropChannel(config, pipeline)
    await channel.start()
    error, ok = with_msh(OUTCOMES["error"], "F-1", "AL", "AL"), with_msh(OUTCOMES["ok"], "F-2", "AL", "AL")
    _drop(tmp_path, "error.hl7", error)
    _drop(tmp_path, "ok.hl7", ok)
    first = await channel.poll()
    assert sorted((f.name, f.status) for f in first.files) == [
        ("error.hl7", "error"),
        ("ok.hl7", "processed"),
    ]
    _drop(tmp_path, "error_again.hl7", error)
    _drop(tmp_path, "ok_again.hl7", ok)
    second = await channel.poll()
    assert sorted((f.name, f.status) for f in second.files) == [
        ("error_again.hl7", "error"),
        ("ok_again.hl7", "processed"),
    ], second.summary()
    assert [msa_code(a) for a in split_acks(stored(pipeline.writer.store, "F-1").ack or "")] == ["CA", "AE"]
    assert [msa_code(a) for a in split_acks(stored(pipeline.writer.store, "F-2").ack or "")] == ["CA", "AA"]
