"""The mllp sink builds generated messages from the generate files of the loaded mappings: an edit
to mappings/hl7/adt_a01_generate.yaml changes what the receiver gets, with no code change."""

from __future__ import annotations

import shutil
from pathlib import Path

from hms_ach.store import outbox
from hms_ach.store.db import Store
from tests.integration.hl7_receiver import received_from, segments
from tests.integration.outbound_helpers import ROOT, make_engine


async def test_an_edited_generate_file_changes_the_generated_message(tmp_path: Path, store: Store) -> None:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    gen = tmp_path / "mappings" / "hl7" / "adt_a01_generate.yaml"
    gen.write_text(
        gen.read_text().replace(
            '    - {set: PV1-1, value: "1"}\n',
            '    - {set: PV1-1, value: "1"}\n    - {set: PV1-5, fhirpath: "\'PRE-\' + status"}\n',
        )
    )
    sink = (
        "  - name: adt_out\n    type: mllp\n    host: 127.0.0.1\n    port: {}\n"
        "    events: [encounter.admitted]\n    ack_timeout_seconds: 3\n    sending_facility: GENHOSP\n"
    )
    receiver = await received_from(
        lambda port: make_engine(tmp_path, store.url, sink.format(port)), ["adt_a01.hl7"], 1
    )
    got = segments(receiver.accepted[0])
    assert got["PV1"][5] == "PRE-in-progress"  # the added field, from the Encounter's status
    assert got["MSH"][2:4] == ["HMS-ACH", "GENHOSP"] and got["MSH"][9].startswith("HMS")  # MSH-3, 4, 10
    with store.read() as conn:
        rows = outbox.list_rows(conn, destination="adt_out")
    assert [r["status"] for r in rows] == ["delivered"]
