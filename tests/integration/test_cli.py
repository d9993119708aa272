"""The operator's commands on a real store: messages, replay (dry run and apply), corpus-check, preview."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter
from tests.integration.pipeline_helpers import process_sync

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"


@pytest.fixture
def workdir(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    monkeypatch.setenv("HMS_ACH_DATABASE_URL", store.url)
    writer = StoreWriter(store)
    pipeline = Pipeline(writer, MappingEngine(load_mappings(tmp_path / "mappings")))
    for name in ["adt_a01.hl7", "adt_a02.hl7", "bad/bad_sex_code.hl7", "adt_a01.hl7"]:
        process_sync(pipeline, (SAMPLES / name).read_bytes(), Hl7Policy("adt_in"))
    writer.stop()
    return tmp_path


def run(workdir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--config", str(workdir / "channels.yaml")])
    return result.exit_code, result.output


def test_messages_filters(workdir: Path) -> None:
    code, out = run(workdir, "messages")
    assert code == 0 and out.count("ADT^A0") == 4
    _, errors = run(workdir, "messages", "--status", "error")
    assert "B-SEX" in errors or "error" in errors
    assert "processed" not in errors.split("\n", 1)[1]
    _, a02 = run(workdir, "messages", "--type", "ADT^A02")
    assert "S-A02-0001" in a02 and "S-A01-0001" not in a02
    _, recent = run(workdir, "messages", "--since", "1h", "--status", "duplicate")
    assert "duplicate" in recent


def test_replay_dry_run_shows_the_diff_and_writes_nothing(workdir: Path) -> None:
    bed = workdir / "mappings" / "resources" / "location_bed.yaml"
    bed.write_text(bed.read_text().replace('args: {separator: " "}', 'args: {separator: "-"}'))
    code, out = run(workdir, "replay", "--since", "1h", "--dry-run")
    assert code == 0, out
    assert '-  "name": "4W 412 A"' in out and '+  "name": "4W-412-A"' in out
    assert "dry run: nothing written" in out
    code, again = run(workdir, "replay", "--since", "1h", "--dry-run")
    assert '+  "name": "4W-412-A"' in again  # still not applied
    code, applied = run(workdir, "replay", "--since", "1h", "--status", "processed", "--apply")
    assert code == 0, applied
    code, after = run(workdir, "replay", "--since", "1h", "--status", "processed", "--dry-run")
    assert '+  "name": "4W-412-A"' not in after


def test_replay_of_a_fixed_error(workdir: Path) -> None:
    _, errors = run(workdir, "messages", "--status", "error", "--json")
    message_id = errors.split('"id": ')[1].split(",")[0]
    table = workdir / "mappings" / "tables" / "administrative_sex.yaml"
    table.write_text(table.read_text().replace("  X: other", "  X: other\n  Q: unknown"))
    code, out = run(workdir, "replay", message_id)
    assert code == 0 and "error -> processed AA" in out, out
    _, left = run(workdir, "messages", "--status", "error")
    assert len(left.strip().splitlines()) == 1  # only the header line


def test_corpus_check_and_preview(workdir: Path) -> None:
    code, out = run(workdir, "corpus-check", str(SAMPLES))
    assert code == 0 and "crashes: 0" in out and "ADT^A01" in out
    code, out = run(workdir, "mapping", "preview", str(SAMPLES / "adt_a01.hl7"))
    assert code == 0
    assert "Encounter.location[0].location <- record location_bed from PV1-3" in out
    assert "PID-5 (XPN patient name) = Rivera^Maria" in out
