"""The file_drop channel: HL7 v2 and CSV files dropped in a local directory, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from hms_ach.app.config import load_config
from hms_ach.app.scheduler import build_jobs
from hms_ach.channels import CHANNEL_TYPES
from hms_ach.channels.file_drop import FileDropChannel, FileDropConfig
from hms_ach.hl7v2.client import split_messages
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
HL7 = ROOT / "samples" / "hl7"
CSV = ROOT / "samples" / "csv"


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def _channel(pipeline: Pipeline, tmp_path: Path, **over: Any) -> FileDropChannel:
    settings: dict[str, Any] = dict(
        name="drop_in",
        type="file_drop",
        directory=str(tmp_path / "drop"),
        csv={"dataset": "staff_roster"},
        min_file_age_seconds=0,
        stable_seconds=0,
        work_dir=str(tmp_path / "work"),
    )
    settings.update(over)
    (tmp_path / "drop").mkdir(exist_ok=True)
    return FileDropChannel(FileDropConfig.model_validate(settings), pipeline)


def _drop(tmp_path: Path, name: str, data: bytes, age: float = 60) -> Path:
    path = tmp_path / "drop" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _records(p: Pipeline, rtype: str) -> list[dict[str, Any]]:
    table = RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]
    with p.writer.store.reader.connect() as conn:
        return [orjson.loads(r.resource) for r in conn.execute(table.select())]


def _messages(p: Pipeline) -> list[Any]:
    with p.writer.store.reader.connect() as conn:
        return list(conn.execute(select(messages.T).order_by(messages.T.c.id)).all())


async def test_hl7_and_csv_files_arrive_and_move(pipeline: Pipeline, tmp_path: Path) -> None:
    # one HL7 file with two messages (an admit, then the staff master file), CRLF line ends
    two = (HL7 / "adt_a01.hl7").read_bytes() + (HL7 / "mfn_m02.hl7").read_bytes().replace(b"\r", b"\r\n")
    assert len(split_messages(two)) == 2
    _drop(tmp_path, "admit_and_staff.hl7", two)
    _drop(tmp_path, "staff_roster.csv", (CSV / "staff_roster.csv").read_bytes())
    _drop(tmp_path, "notes.txt", b"left alone")  # matches neither glob
    _drop(tmp_path, "fresh.hl7", (HL7 / "adt_a02.hl7").read_bytes(), age=0)  # too young for this poll
    channel = _channel(pipeline, tmp_path, min_file_age_seconds=5)
    await channel.start()

    out = await channel.poll()
    assert sorted((f.name, f.status) for f in out.files) == [
        ("admit_and_staff.hl7", "processed"),
        ("staff_roster.csv", "processed"),
    ], out.summary()
    assert "fresh.hl7" in out.skipped
    drop = tmp_path / "drop"
    assert sorted(p.name for p in (drop / "processed").iterdir()) == [
        "admit_and_staff.hl7",
        "staff_roster.csv",
    ]
    assert sorted(p.name for p in drop.iterdir() if p.is_file()) == ["fresh.hl7", "notes.txt"]
    assert not (drop / "error").exists()

    encounters = _records(pipeline, "Encounter")
    assert len(encounters) == 1 and encounters[0]["status"] == "in-progress"
    npis = {i["value"] for p in _records(pipeline, "Practitioner") for i in p.get("identifier", [])}
    assert "1234567893" in npis  # a row of the CSV roster
    rows = _messages(pipeline)
    hl7 = [m for m in rows if m.content_type == "hl7v2"]
    assert [m.message_type for m in hl7] == ["ADT^A01", "MFN^M02"]
    assert all(m.status == "processed" and m.channel == "drop_in" and "MSA|AA|" in m.ack for m in hl7)
    files = {m.control_id: m for m in rows if m.content_type in ("file", "csv")}
    assert (
        files["admit_and_staff.hl7"].status == "processed" and files["staff_roster.csv"].status == "processed"
    )

    # a file put back unchanged is recognised by (name, size, mtime, sha256): moved only, nothing stored
    before = len(_messages(pipeline))
    again = drop / "staff_roster.csv"
    (drop / "processed" / "staff_roster.csv").rename(again)  # keeps its mtime
    out = await channel.poll()
    assert [(f.name, f.status, f.note) for f in out.files] == [
        ("staff_roster.csv", "processed", "already committed; moved only")
    ]
    assert len(_messages(pipeline)) == before
    assert (drop / "processed" / "staff_roster.csv").exists() and not again.exists()


async def test_bad_files_go_to_error_with_their_reason(pipeline: Pipeline, tmp_path: Path) -> None:
    _drop(tmp_path, "garbage.hl7", b"this is not HL7\rPID|1||X\r")
    _drop(tmp_path, "bad_sex.hl7", (HL7 / "bad" / "bad_sex_code.hl7").read_bytes())
    text = (CSV / "staff_roster.csv").read_text()
    header, *lines = text.splitlines()
    buf = io.StringIO()
    rows = list(csv.reader([header, lines[0]]))
    bad = dict(zip(rows[0], rows[1], strict=True)) | {"employee_id": "E9", "npi": "123", "gender": "Q"}
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerow(list(bad.values()))
    _drop(
        tmp_path,
        "roster_bad.csv",
        (header + "\n" + lines[0] + "\n" + buf.getvalue().splitlines()[1] + "\n").encode(),
    )
    link = tmp_path / "drop" / "link.hl7"
    link.symlink_to(HL7 / "adt_a01.hl7")
    channel = _channel(pipeline, tmp_path)

    out = await channel.poll()
    assert sorted((f.name, f.status) for f in out.files) == [
        ("bad_sex.hl7", "error"),
        ("garbage.hl7", "error"),
        ("roster_bad.csv", "error"),
    ], out.summary()
    assert out.skipped == ["link.hl7"] and link.is_symlink()  # never followed, left where it is
    error = tmp_path / "drop" / "error"
    assert sorted(p.name for p in error.iterdir()) == [
        "bad_sex.hl7",
        "bad_sex.hl7.err.csv",
        "garbage.hl7",
        "garbage.hl7.err.csv",
        "roster_bad.csv",
        "roster_bad.csv.err.csv",
    ]
    report: list[list[str]] = list(csv.reader(io.StringIO((error / "roster_bad.csv.err.csv").read_text())))
    assert report[0] == ["file", "line", "column", "reason"] and report[1][:2] == ["roster_bad.csv", "3"]

    by_id = {m.control_id: m for m in _messages(pipeline)}
    garbage = by_id["garbage.hl7"]
    assert garbage.status == "error" and "before the first MSH" in garbage.error  # the reason is stored
    assert by_id["bad_sex.hl7"].status == "error" and "1 of 1 messages" in by_id["bad_sex.hl7"].error
    ae = [m for m in _messages(pipeline) if m.content_type == "hl7v2"]
    assert len(ae) == 1 and ae[0].status == "error" and ae[0].ack_code == "AE"  # stored with its ACK
    assert by_id["roster_bad.csv"].status == "error"
    assert any(m.status == "error" and m.control_id == "roster_bad.csv:3" for m in _messages(pipeline))
    assert "symlink" in by_id and by_id["symlink"].status == "error"
    assert len(_records(pipeline, "Practitioner")) >= 1  # the good row of the CSV went in


async def test_file_drop_is_a_registered_channel_the_scheduler_polls(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    assert CHANNEL_TYPES.load("file_drop") is FileDropChannel
    config = load_config(ROOT / "channels.yaml")
    (drop,) = [c for c in config.channels if c.type == "file_drop"]
    assert isinstance(drop, FileDropConfig) and drop.enabled is False and drop.csv is not None

    channel = _channel(pipeline, tmp_path, poll_interval_seconds=30)
    _drop(tmp_path, "a01.hl7", (HL7 / "adt_a01.hl7").read_bytes())
    (job,) = [
        j for j in build_jobs(config.jobs, pipeline.writer, {"drop_in": channel}) if j.name == "poll:drop_in"
    ]
    summary = await job.run()
    assert summary == "a01.hl7: processed (1/1 rows)"
    assert (tmp_path / "drop" / "processed" / "a01.hl7").exists()


async def test_a_resent_message_is_judged_by_its_stored_answer(pipeline: Pipeline, tmp_path: Path) -> None:
    """A file whose message was sent before is processed when that message was stored (AA), and
    goes to error/ when it was refused (AR): a resend of a refused message is still not stored."""
    admit = (HL7 / "adt_a01.hl7").read_bytes()
    refused = admit.replace(b"|P|2.5.1", b"|Q|2.5.1", 1)  # processing id Q: answered AR
    assert refused != admit
    channel = _channel(pipeline, tmp_path)
    await channel.start()
    _drop(tmp_path, "first.hl7", refused)
    _drop(tmp_path, "admit.hl7", admit.replace(b"S-A01-0001", b"S-A01-0002"))
    first = await channel.poll()
    assert sorted((f.name, f.status) for f in first.files) == [
        ("admit.hl7", "processed"),
        ("first.hl7", "error"),
    ]

    _drop(tmp_path, "again.hl7", refused)  # the same message (same MSH-3/4/10), another file
    _drop(tmp_path, "admit_again.hl7", admit.replace(b"S-A01-0001", b"S-A01-0002"))
    second = await channel.poll()
    assert sorted((f.name, f.status) for f in second.files) == [
        ("admit_again.hl7", "processed"),
        ("again.hl7", "error"),
    ], second.summary()
    assert (tmp_path / "drop" / "error" / "again.hl7").exists()
    assert (tmp_path / "drop" / "processed" / "admit_again.hl7").exists()
