"""Kiosk clock events over CSV (dataset ``clock_events``) through the file_drop channel, on SQLite and
PostgreSQL: each ``in`` opens a Timecard and each ``out`` closes the open one, by the same rules as
/api/v1's clock-in and clock-out; an ``out`` without an open ``in``, an ``in`` while one is open and an
unknown employee are error rows with their codes."""

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

from hms_ach.channels.file_drop import FileDropChannel, FileDropConfig
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "samples" / "csv"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def channel(pipeline: Pipeline, tmp_path: Path, dataset: str) -> FileDropChannel:
    drop = tmp_path / dataset
    drop.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "name": f"{dataset}_drop",
        "type": "file_drop",
        "directory": str(drop),
        "csv": {"dataset": dataset},
        "min_file_age_seconds": 0,
        "stable_seconds": 0,
        "work_dir": str(tmp_path / "work"),
    }
    return FileDropChannel(FileDropConfig.model_validate(settings), pipeline)


def drop(tmp_path: Path, dataset: str, name: str, data: bytes) -> None:
    path = tmp_path / dataset / name
    path.write_bytes(data)
    then = time.time() - 60
    os.utime(path, (then, then))


def timecards(p: Pipeline) -> list[dict[str, Any]]:
    table = RECORD_TABLES["Timecard"].__table__  # type: ignore[attr-defined]
    with p.writer.store.reader.connect() as conn:
        return [orjson.loads(r.resource) for r in conn.execute(table.select())]


async def test_clock_events_open_and_close_timecards(pipeline: Pipeline, tmp_path: Path) -> None:
    roster = channel(pipeline, tmp_path, "staff_roster")
    drop(tmp_path, "staff_roster", "staff_roster.csv", (CSV / "staff_roster.csv").read_bytes())
    assert [(f.name, f.status) for f in (await roster.poll()).files] == [("staff_roster.csv", "processed")]

    kiosk = channel(pipeline, tmp_path, "clock_events")
    drop(tmp_path, "clock_events", "clock_events.csv", (CSV / "clock_events.csv").read_bytes())
    out = await kiosk.poll()
    assert [(f.name, f.status) for f in out.files] == [("clock_events.csv", "processed")], out.files[0].errors
    cards = sorted(timecards(pipeline), key=lambda tc: str(tc["clockIn"]))
    assert [(tc["clockIn"], tc["clockOut"], tc["workedMinutes"]) for tc in cards] == [
        ("2026-12-08T12:56:00Z", "2026-12-09T01:04:00Z", 728),
        ("2026-12-09T12:58:00Z", "2026-12-09T21:01:00Z", 483),
    ]
    assert [(tc["clockInDevice"], tc["clockOutDevice"], tc["department"]) for tc in cards] == [
        ("KIOSK-ED-1", "KIOSK-ED-1", "ED"),  # the employee's department, from the roster
        ("KIOSK-ED-2", "KIOSK-ED-1", "ED"),
    ]

    bad = (
        "employee_id,event,time,device\n"
        "E2001,out,2026-12-05T06:00:00-05:00,K1\n"  # no open in: not clocked in
        "E2001,in,2026-12-05T07:00:00-05:00,K1\n"  # opens one
        "E2001,in,2026-12-05T08:00:00-05:00,K1\n"  # while it is open
        "E9999,in,2026-12-05T07:00:00-05:00,K1\n"  # not on the roster
        "E2001,out,2026-12-05T15:00:00-05:00,K1\n"  # closes the 07:00 one
    )
    drop(tmp_path, "clock_events", "bad_events.csv", bad.encode())
    out = await kiosk.poll()
    assert [(f.name, f.status) for f in out.files] == [("bad_events.csv", "error")], out.summary()
    report = list(
        csv.reader(io.StringIO((tmp_path / "clock_events" / "error" / "bad_events.csv.err.csv").read_text()))
    )
    reasons = {(row[1], row[2]): row[3].split("]")[0] + "]" for row in report[1:]}
    assert reasons == {
        ("2", "time"): "[timecard.not_clocked_in]",
        ("4", "time"): "[timecard.already_clocked_in]",
        ("5", "employee_id"): "[timecard.unknown_employee]",
    }, report
    third = [tc for tc in timecards(pipeline) if str(tc["clockIn"]).startswith("2026-12-05")]
    assert [(tc["clockIn"], tc.get("clockOut"), tc.get("workedMinutes")) for tc in third] == [
        ("2026-12-05T12:00:00Z", "2026-12-05T20:00:00Z", 480)
    ]

    # the same events read again (a re-sent file under another name) change nothing
    before = timecards(pipeline)
    drop(tmp_path, "clock_events", "again.csv", (CSV / "clock_events.csv").read_bytes())
    out = await kiosk.poll()
    assert [(f.name, f.status) for f in out.files] == [("again.csv", "processed")], out.summary()
    assert sorted(map(orjson.dumps, timecards(pipeline))) == sorted(map(orjson.dumps, before))
