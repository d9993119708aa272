"""The delivery contract through the pipeline and the real store (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Outcome, Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.writer import StoreWriter
from tests.integration.pipeline_helpers import process_sync

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


POLICY = Hl7Policy("test")


def _send(p: Pipeline, name: str, **replace: str) -> Outcome:
    raw = (SAMPLES / name).read_bytes()
    for old, new in replace.items():
        raw = raw.replace(old.encode(), new.encode())
    return process_sync(p, raw, POLICY)


def _resources(p: Pipeline, rtype: str) -> list[dict[str, Any]]:
    table = RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]
    with p.writer.store.reader.connect() as conn:
        return [orjson.loads(r.resource) for r in conn.execute(table.select())]


def test_admit_is_acked_after_commit_and_stored(pipeline: Pipeline) -> None:
    out = _send(pipeline, "adt_a01.hl7")
    assert out.status == "processed" and out.ack_code == "AA"
    assert "MSA|AA|" in out.ack
    assert out.message_id is not None
    with pipeline.writer.store.reader.connect() as conn:
        row = messages.get(conn, out.message_id)
        assert row is not None
    assert row.status == "processed" and row.ack == out.ack and bytes(row.raw).startswith(b"MSH|")
    patients = _resources(pipeline, "Patient")
    assert [p["name"][0]["family"] for p in patients] == ["Rivera"]
    beds = [
        loc for loc in _resources(pipeline, "Location") if loc["physicalType"]["coding"][0]["code"] == "bd"
    ]
    assert beds and beds[0]["operationalStatus"]["code"] == "O"
    enc = _resources(pipeline, "Encounter")[0]
    assert enc["status"] == "in-progress" and enc["class"]["code"] == "IMP"
    assert enc["subject"]["reference"] == f"Patient/{patients[0]['id']}"
    assert enc["period"]["start"].endswith("-05:00")


def test_duplicate_gets_stored_ack_and_is_not_processed_again(pipeline: Pipeline) -> None:
    first = _send(pipeline, "adt_a01.hl7")
    second = _send(pipeline, "adt_a01.hl7")
    assert second.status == "duplicate"
    assert second.ack == first.ack
    assert second.writes == []
    assert len(_resources(pipeline, "Patient")) == 1
    with pipeline.writer.store.reader.connect() as conn:
        rows = messages.list_messages(conn)
    assert sorted(r.status for r in rows) == ["duplicate", "processed"]


def test_content_error_gets_ae_with_err_and_is_stored_for_replay(pipeline: Pipeline) -> None:
    out = _send(pipeline, "bad/bad_sex_code.hl7")
    assert out.status == "error" and out.ack_code == "AE"
    err = [seg for seg in out.ack.split("\r") if seg.startswith("ERR")][0].split("|")
    assert err[2].startswith("PID^1^8") and err[3].startswith("103^") and err[4] == "E"
    assert out.message_id is not None
    with pipeline.writer.store.reader.connect() as conn:
        row = messages.get(conn, out.message_id)
        assert row is not None
    assert (
        row.status == "error" and "administrative_sex" in (row.error or "") and row.error_location == "PID-8"
    )
    assert _resources(pipeline, "Patient") == []


def test_reject_and_fallback_ack(pipeline: Pipeline) -> None:
    for name, code in [
        ("bad/unsupported_type.hl7", "200"),
        ("bad/unsupported_version.hl7", "203"),
        ("bad/missing_msh10.hl7", "101"),
        ("bad/missing_msh9.hl7", "101"),
    ]:
        out = _send(pipeline, name)
        assert out.ack_code == "AR", name
        assert f"|{code}^" in out.ack, (name, out.ack)
    for name in ["bad/no_msh.hl7", "bad/truncated_msh.hl7", "bad/bad_encoding_chars.hl7"]:
        out = _send(pipeline, name)
        assert out.status == "rejected" and out.ack_code == "AR", name
        assert out.ack.startswith("MSH|^~\\&|") and "\rMSA|AR|" in out.ack and "\rERR|" in out.ack


def test_charsets(pipeline: Pipeline) -> None:
    out = _send(pipeline, "bad/latin1.hl7")
    assert out.status == "processed", out.error
    out = _send(pipeline, "bad/invalid_utf8.hl7")
    assert out.status == "error" and out.ack_code == "AE" and "|102^" in out.ack


def test_enhanced_mode_commit_ack(pipeline: Pipeline) -> None:
    out = _send(pipeline, "adt_a01_enhanced.hl7")
    assert out.ack_code == "CA" and "MSA|CA|" in out.ack and out.send
    # MSH-15 NE: the message is processed but no accept ACK is sent
    raw = (SAMPLES / "adt_a01_enhanced.hl7").read_bytes().replace(b"|AL|NE\r", b"|NE|NE\r", 1)
    assert b"|NE|NE\r" in raw
    header_ctrl = raw.split(b"\r")[0].split(b"|")[9]
    out = process_sync(pipeline, raw.replace(header_ctrl, header_ctrl + b"X", 1), POLICY)
    assert out.status == "processed" and out.send is False


def test_replay_after_fix(pipeline: Pipeline, tmp_path: Path) -> None:
    out = _send(pipeline, "bad/bad_sex_code.hl7")
    assert out.status == "error" and out.message_id is not None
    # fix the code table the way an analyst would, then replay the stored message
    fixed = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", fixed)
    table = fixed / "tables" / "administrative_sex.yaml"
    table.write_text(table.read_text().replace("  X: other", "  X: other\n  Q: unknown"))
    pipeline.engine = MappingEngine(load_mappings(fixed))
    again = pipeline.replay(out.message_id, {})
    assert again.status == "processed" and again.ack_code == "AA"
    with pipeline.writer.store.reader.connect() as conn:
        replayed = messages.get(conn, out.message_id)
        assert replayed is not None and replayed.replay_count == 1
    assert len(_resources(pipeline, "Patient")) == 1


def test_concurrent_writers_never_duplicate_a_business_key(pipeline: Pipeline) -> None:
    """Several pipelines (as several engine instances would) write one patient at once."""
    raws = [
        (SAMPLES / "adt_a08.hl7").read_bytes().replace(b"|P|2.5.1", f"X{i}|P|2.5.1".encode(), 1)
        for i in range(8)
    ]
    errors: list[BaseException] = []
    store = pipeline.writer.store
    writers = [StoreWriter(store, max_batch=1) for _ in range(4)]
    pipes = [Pipeline(w, pipeline.engine) for w in writers]

    def send(i: int) -> None:
        try:
            process_sync(pipes[i % 4], raws[i], POLICY)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.stop()
    if store.dialect == "sqlite":
        assert not errors
    assert len(_resources(pipeline, "Patient")) == 1


def test_a_charge_after_a_transfer_does_not_move_the_patient_back(pipeline: Pipeline) -> None:
    """Regression: the DFT^P03 sample's PV1-3 still names the admission bed; posting it after the
    A02 moved the Encounter back to that bed. A DFT only fills what the visit lacks."""
    for name in ("adt_a01.hl7", "adt_a02.hl7", "dft_p03.hl7"):
        out = _send(pipeline, name)
        assert out.ack_code == "AA", (name, out.ack)
    beds = {
        b["id"]: b for b in _resources(pipeline, "Location") if b["physicalType"]["coding"][0]["code"] == "bd"
    }
    enc = _resources(pipeline, "Encounter")[0]
    current = [loc for loc in enc["location"] if loc.get("status") == "active"]
    assert len(current) == 1
    bed = beds[current[0]["location"]["reference"].split("/", 1)[1]]
    assert bed["identifier"][0]["value"] == "GENHOSP/4W/414/B"
    status = {b["identifier"][0]["value"]: b["operationalStatus"]["code"] for b in beds.values()}
    assert status == {
        "GENHOSP/4W/412/A": "H",
        "GENHOSP/4W/414/B": "O",
    }  # old bed to housekeeping, new occupied
