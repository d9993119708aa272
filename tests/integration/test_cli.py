"""The operator's commands on a real store: messages, replay (dry run and apply), corpus-check, preview."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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


def test_messages_status_takes_only_known_values_and_the_table_fits_the_terminal(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = run(workdir, "messages", "--status", "errors")
    assert code == 2 and "errors" in out and "processed" in out  # the choices are named
    monkeypatch.setenv("COLUMNS", "80")
    code, out = run(workdir, "messages")
    assert code == 0 and all(len(line) <= 80 for line in out.splitlines()), out
    assert "B-SEX" in out.replace("\n", "")  # the error column folds, it is not cut


def test_messages_show_prints_the_raw_message_its_ack_and_its_records(workdir: Path) -> None:
    _, listed = run(workdir, "messages", "--type", "ADT^A01", "--status", "processed", "--json")
    message_id = listed.split('"id": ')[1].split(",")[0]
    code, out = run(workdir, "messages", "show", message_id)
    assert code == 0, out
    assert "status        processed" in out and "-- ACK\nMSH|" in out and "MSA|AA|" in out
    assert "\nPID|" in out  # one segment per line
    assert "Patient/" in out and "Encounter/" in out and "version 1" in out
    code, raw = run(workdir, "messages", "show", message_id, "--raw")
    assert code == 0 and raw.startswith("MSH|") and "-- ACK" not in raw
    code, ack = run(workdir, "messages", "show", message_id, "--ack")
    assert code == 0 and ack.startswith("MSH|") and "\nMSA|AA|" in ack
    code, records = run(workdir, "messages", "show", message_id, "--records")
    lines = [json.loads(line) for line in records.splitlines()]
    assert code == 0 and {ln["reference"].split("/")[0] for ln in lines} >= {"Patient", "Encounter"}
    assert all(ln["resource"]["resourceType"] == ln["reference"].split("/")[0] for ln in lines)
    code, out = run(workdir, "messages", "show", "999999")
    assert code == 1 and "no message with id 999999" in out


def test_commands_print_no_dependency_warnings() -> None:
    """asyncssh (the SFTP channel and sink import it when they start) warns on import that
    cryptography deprecates DSA; under every ``hms-ach`` command the user sees none of it."""

    def stderr_of(script: str) -> str:
        done = subprocess.run(
            [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=120
        )
        return done.stderr

    assert "DeprecationWarning" in stderr_of("import asyncssh")  # what users saw before
    quiet = (
        "from hms_ach.app.cli import quiet_dependency_warnings; quiet_dependency_warnings(); import asyncssh"
    )
    assert stderr_of(quiet) == ""


def _flat(text: str) -> str:
    """Typer's boxed error text as one line (the box may wrap a sentence)."""
    return " ".join(text.replace("│", " ").split())


def test_paths_that_do_not_exist_are_errors(workdir: Path) -> None:
    code, out = run(workdir, "corpus-check", str(workdir / "nope"))
    assert code == 2 and "does not exist" in _flat(out), out
    code, out = run(workdir, "mapping", "preview", str(workdir / "missing.hl7"))
    assert code == 2 and "does not exist" in _flat(out) and "Traceback" not in out
    code, out = run(workdir, "outbox", "--status", "bogus")
    assert code == 2 and "bogus" in out


def test_send_uses_the_port_run_listens_on(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing listening, the error names the address: HMS_ACH_MLLP_PORT, as for run."""
    monkeypatch.setenv("HMS_ACH_MLLP_PORT", "1")
    code, out = run(
        workdir, "send", str(SAMPLES / "adt_a01.hl7"), str(workdir / "unreadable.hl7"), "--timeout", "2"
    )
    assert code == 1
    assert "unreadable.hl7: cannot read" in out  # reported, and the other file was still sent
    assert "adt_a01.hl7 -> failed" in out and "127.0.0.1:1" in out, out


def test_long_commands_show_progress_on_a_terminal_only(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMS_ACH_PROGRESS", "1")  # as on a terminal
    code, out = run(workdir, "corpus-check", str(SAMPLES))
    files = len(list(SAMPLES.rglob("*.hl7")))
    assert code == 0 and "corpus-check" in out and f"{files}/{files}" in out, out
    code, out = run(workdir, "replay", "--since", "1h", "--dry-run")
    assert code == 0 and "replay" in out and "3/3" in out, out  # the duplicate is taken out first
    for args, bar in ((("reindex",), "reindex"), (("reindex", "--validate"), "validate")):
        code, out = run(workdir, *args)
        shown = re.findall(rf"{bar}\s[^\n]*?(\d+)/(\d+)", out)  # the bar's states, the last one at the end
        assert code == 0 and shown and shown[-1][0] == shown[-1][1] and int(shown[-1][0]) > 0, out
    monkeypatch.setenv("HMS_ACH_PROGRESS", "0")  # a pipe or a log
    code, out = run(workdir, "corpus-check", str(SAMPLES))
    assert code == 0 and f"{files}/{files}" not in out


def test_preview_takes_csv_rows_and_fhir_json(workdir: Path) -> None:
    roster = ROOT / "samples" / "csv" / "staff_roster.csv"
    code, out = run(workdir, "mapping", "preview", str(roster), "--dataset", "staff_roster", "--row", "2")
    assert code == 0, out
    assert "staff_roster.csv line 2" in out and "employee_id = E1001" in out
    assert '"resourceType": "Practitioner"' in out and "Chen" in out
    code, out = run(workdir, "mapping", "preview", str(roster), "--dataset", "staff_roster")
    assert code == 0 and out.count("== canonical records") == len(roster.read_text().splitlines()) - 1
    code, out = run(workdir, "mapping", "preview", str(roster), "--dataset", "no_such_dataset", "--row", "2")
    assert code == 1 and "no mapping handles csv input 'no_such_dataset'" in out and "Traceback" not in out
    bundle = ROOT / "samples" / "fhir" / "onboard_nurse_bundle.json"
    code, out = run(workdir, "mapping", "preview", str(bundle))
    assert code == 0, out
    assert "== canonical records" in out and "Practitioner key" in out
    bad = workdir / "bad.json"
    bad.write_text("{not json")
    code, out = run(workdir, "mapping", "preview", str(bad))
    assert code == 1 and "not JSON" in out and "Traceback" not in out


def test_mapping_test_update_accepts_the_new_output(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapping edit breaks a golden case: --update shows the diff, rewrites that case's expect (the
    file's comments and other cases kept), and the tests pass again."""
    monkeypatch.chdir(ROOT)  # the goldens' samples are relative to the repository
    mappings = workdir / "mappings"
    bed = mappings / "resources" / "location_bed.yaml"
    bed.write_text(bed.read_text().replace('args: {separator: " "}', 'args: {separator: "-"}'))
    golden = mappings / "messages" / "adt_a01_test.yaml"
    before = golden.read_text()
    args = ["mapping", "test", str(golden), "--mapping-dir", str(mappings)]
    code, out = run(workdir, *args)
    assert code == 1 and "FAIL" in out and "4W-412-A" in out
    code, out = run(workdir, *args, "--update")
    assert code == 0 and "UPDATED" in out and "4W-412-A" in out, out  # the diff is shown first
    after = golden.read_text()
    assert after.splitlines()[0] == before.splitlines()[0]  # the comment stays
    assert "name: 4W-412-A" in after and "name: 4W 412 A" not in after
    code, out = run(workdir, *args)
    assert code == 0 and "FAIL" not in out, out
