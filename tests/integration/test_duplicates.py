"""Duplicates by (MSH-3, MSH-4, MSH-10) and a content hash, and the per-channel policy for a control
id reused with different content (``on_reused_control_id``), on the real store (SQLite, and
PostgreSQL when set), through the pipeline, ``hms-ach replay`` and the real MLLP listener."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, func, select, text
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.client import send_messages
from hms_ach.hl7v2.policy import Hl7Policy, Hl7PolicySettings
from hms_ach.ingest.pipeline import Pipeline, content_hash
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.messages import StoredMessage
from hms_ach.store.models import RECORD_TABLES, MessageContentHash, ResourceHistory
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import mllp_channel, mllp_yaml, running_engine
from tests.integration.pipeline_helpers import process_sync

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
REJECT = Hl7Policy("adt_in")
PROCESS = Hl7Policy("adt_in", on_reused_control_id="process")
A01 = (SAMPLES / "adt_a01.hl7").read_bytes()
#: The discharge of the admitted patient, sent under the admission's control id (as in the corpus).
A03_REUSED = (SAMPLES / "adt_a03.hl7").read_bytes().replace(b"|S-A03-0001|", b"|S-A01-0001|")


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def _encounter_status(p: Pipeline) -> str:
    table = RECORD_TABLES["Encounter"].__table__  # type: ignore[attr-defined]
    with p.writer.store.reader.connect() as conn:
        rows = [orjson.loads(r.resource) for r in conn.execute(table.select())]
    assert len(rows) == 1
    return str(rows[0]["status"])


def _history_rows(p: Pipeline) -> int:
    with p.writer.store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(ResourceHistory)).scalar_one())


def _row(p: Pipeline, message_id: int | None) -> StoredMessage:
    assert message_id is not None
    with p.writer.store.reader.connect() as conn:
        row = messages.get(conn, message_id)
    assert row is not None
    return row


def _statuses(p: Pipeline) -> list[str]:
    with p.writer.store.reader.connect() as conn:
        return sorted(str(r.status) for r in messages.list_messages(conn))


def _segment(ack: str, name: str) -> list[str]:
    return next(s for s in ack.split("\r") if s.startswith(name)).split("|")


def test_content_hash_ignores_framing_and_line_endings_only() -> None:
    assert content_hash(b"\x0b" + A01 + b"\x1c\r") == content_hash(A01)
    assert content_hash(A01.replace(b"\r", b"\r\n")) == content_hash(A01)
    assert content_hash(A01.replace(b"\r", b"\n")) == content_hash(A01.rstrip(b"\r"))
    assert content_hash(A01.replace(b"20261126083000-0500||", b"20261126083001-0500||", 1)) != content_hash(
        A01
    )


def test_true_resend_gets_the_stored_ack_and_writes_nothing(pipeline: Pipeline) -> None:
    first = process_sync(pipeline, A01, REJECT)
    history = _history_rows(pipeline)
    again = process_sync(pipeline, A01.replace(b"\r", b"\r\n"), REJECT)  # other line endings: same content
    assert again.status == "duplicate" and again.ack == first.ack and again.writes == []
    assert _history_rows(pipeline) == history
    assert _row(pipeline, again.message_id).duplicate_of == first.message_id
    assert _statuses(pipeline) == ["duplicate", "processed"]


def test_reused_control_id_is_rejected_with_205_and_stored_raw(pipeline: Pipeline) -> None:
    first = process_sync(pipeline, A01, REJECT)
    history = _history_rows(pipeline)
    out = process_sync(pipeline, A03_REUSED, REJECT)
    assert out.status == "rejected" and out.ack_code == "AR" and out.writes == []
    assert _segment(out.ack, "MSA")[1:3] == ["AR", "S-A01-0001"]
    err = _segment(out.ack, "ERR")
    assert err[2].startswith("MSH^1^10") and err[3].startswith("205^Duplicate key identifier")
    assert "reused with different content" in err[8]
    row = _row(pipeline, out.message_id)
    assert row.status == "rejected" and row.raw == A03_REUSED and row.error_location == "MSH-10"
    assert row.ack == out.ack and row.message_type.startswith("ADT^A03")
    assert _history_rows(pipeline) == history and _encounter_status(pipeline) == "in-progress"
    # a resend of the rejected message is its duplicate (the stored AR); the original's, its own
    resend = process_sync(pipeline, A03_REUSED, REJECT)
    assert resend.status == "duplicate" and resend.ack == out.ack
    assert _row(pipeline, resend.message_id).duplicate_of == out.message_id
    original = process_sync(pipeline, A01, REJECT)
    assert original.status == "duplicate" and original.ack == first.ack
    assert _statuses(pipeline) == ["duplicate", "duplicate", "processed", "rejected"]
    assert _history_rows(pipeline) == history


def test_reused_control_id_is_processed_as_new_and_its_resend_is_a_duplicate(pipeline: Pipeline) -> None:
    first = process_sync(pipeline, A01, PROCESS)
    out = process_sync(pipeline, A03_REUSED, PROCESS)
    assert out.status == "processed" and out.ack_code == "AA" and out.writes
    assert _encounter_status(pipeline) == "finished"
    history = _history_rows(pipeline)
    resend = process_sync(pipeline, A03_REUSED, PROCESS)
    assert resend.status == "duplicate" and resend.ack == out.ack and resend.writes == []
    assert _row(pipeline, resend.message_id).duplicate_of == out.message_id
    original = process_sync(pipeline, A01, PROCESS)
    assert original.status == "duplicate" and original.ack == first.ack
    assert _history_rows(pipeline) == history and _encounter_status(pipeline) == "finished"


def test_a_message_stored_before_hashes_is_compared_by_its_raw_bytes(pipeline: Pipeline) -> None:
    first = process_sync(pipeline, A01, REJECT)
    with pipeline.writer.store.transaction() as tx:  # as a store from before this table had it
        tx.execute(delete(MessageContentHash))
    assert process_sync(pipeline, A01, REJECT).status == "duplicate"
    out = process_sync(pipeline, A03_REUSED, REJECT)
    assert out.status == "rejected" and first.status == "processed"


def test_replay_of_a_rejected_reused_id_follows_the_policy(pipeline: Pipeline) -> None:
    process_sync(pipeline, A01, REJECT)
    out = process_sync(pipeline, A03_REUSED, REJECT)
    assert out.message_id is not None
    still = pipeline.replay(out.message_id, {"adt_in": REJECT})
    assert still.status == "rejected" and "reused with different content" in (still.error or "")
    assert _encounter_status(pipeline) == "in-progress"
    done = pipeline.replay(out.message_id, {"adt_in": PROCESS})
    assert done.status == "processed" and done.ack_code == "AA"
    assert _encounter_status(pipeline) == "finished"
    row = _row(pipeline, out.message_id)
    assert row.status == "processed" and row.replay_count == 2
    # its resend is now answered with the replayed message's stored answer
    resend = process_sync(pipeline, A03_REUSED, REJECT)
    assert resend.status == "duplicate" and resend.ack == done.ack


def test_settings_default_to_reject_and_reach_the_policy() -> None:
    assert Hl7PolicySettings().hl7_policy("x").on_reused_control_id == "reject"
    settings = Hl7PolicySettings.model_validate({"on_reused_control_id": "process"})
    assert settings.hl7_policy("x").on_reused_control_id == "process"
    with pytest.raises(ValueError, match="on_reused_control_id"):
        Hl7PolicySettings.model_validate({"on_reused_control_id": "ignore"})


def test_cli_replay_under_process(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    config = (ROOT / "channels.yaml").read_text()
    reject, process = "    on_reused_control_id: reject\n", "    on_reused_control_id: process\n"
    assert reject in config  # the adt_in channel's (the first) is the one replay reads
    (tmp_path / "channels.yaml").write_text(config)
    monkeypatch.setenv("HMS_ACH_DATABASE_URL", store.url)
    writer = StoreWriter(store)
    p = Pipeline(writer, MappingEngine(load_mappings(tmp_path / "mappings")))
    process_sync(p, A01, REJECT)
    rejected = process_sync(p, A03_REUSED, REJECT)
    writer.stop()

    def replay() -> tuple[int, str]:
        args = ["replay", str(rejected.message_id), "--config", str(tmp_path / "channels.yaml")]
        result = CliRunner().invoke(app, args)
        return result.exit_code, result.output

    code, out = replay()  # under reject it stays rejected, and says why
    assert code == 1 and "rejected -> rejected AR" in out and "on_reused_control_id: reject" in out
    (tmp_path / "channels.yaml").write_text(config.replace(reject, process, 1))
    code, out = replay()
    assert code == 0 and "rejected -> processed AA" in out, out
    with store.read() as conn:
        row = messages.get(conn, int(rejected.message_id or 0))
    assert row is not None and row.status == "processed"
    # the records the replay wrote name who replayed, not the original sender
    with store.read() as conn:
        actors = (
            conn.execute(
                text("SELECT actor FROM audit_entry WHERE message_id = :m"), {"m": rejected.message_id}
            )
            .scalars()
            .all()
        )
    assert actors and all(orjson.loads(a)["kind"] == "replay" for a in actors)
    assert orjson.loads(actors[0])["command"] == "hms-ach replay"


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    channels = mllp_yaml("adt_in", "idle_timeout_seconds: 5") + mllp_yaml(
        "adt_open", "idle_timeout_seconds: 5", "on_reused_control_id: process"
    )
    async with running_engine(tmp_path, store, channels) as eng:
        yield eng


def _msa(ack: bytes) -> list[str]:
    return _segment(ack.decode(), "MSA")


async def test_over_mllp_each_channel_follows_its_policy(engine: Engine) -> None:
    strict, open_ = (int(mllp_channel(engine, name).port) for name in ("adt_in", "adt_open"))
    acks = await send_messages("127.0.0.1", strict, [A01, A01, A03_REUSED], timeout=10)
    assert [_msa(a)[1] for a in acks] == ["AA", "AA", "AR"]
    assert acks[1] == acks[0]  # the stored ACK, byte for byte
    assert b"|205^Duplicate key identifier^HL70357|" in acks[2]
    other, discharge = (m.replace(b"|S-A01-0001|", b"|S-A01-0002|") for m in (A01, A03_REUSED))
    acks = await send_messages("127.0.0.1", open_, [other, other, discharge, discharge], timeout=10)
    assert [_msa(a)[1] for a in acks] == ["AA", "AA", "AA", "AA"]
    assert acks[1] == acks[0] and acks[3] == acks[2]
    with engine.store.read() as conn:
        stored: list[Any] = messages.list_messages(conn)
    statuses = sorted((r.channel, r.status) for r in stored)
    assert statuses == [
        ("adt_in", "duplicate"),
        ("adt_in", "processed"),
        ("adt_in", "rejected"),
        ("adt_open", "duplicate"),
        ("adt_open", "duplicate"),
        ("adt_open", "processed"),
        ("adt_open", "processed"),
    ]
