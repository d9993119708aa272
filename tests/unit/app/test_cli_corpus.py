"""``hms-ach corpus-check``: each rejection is classed as unsupported (by design) or content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.cli_corpus import rejection_class
from hms_ach.core.errors import Err0357

ROOT = Path(__file__).resolve().parents[3]
MAPPED = frozenset({"ADT", "DFT", "MFN"})


def test_the_class_follows_the_err3_code_and_the_mapped_types() -> None:
    assert rejection_class(Err0357.UNSUPPORTED_MESSAGE_TYPE, "VXU", MAPPED) == "unsupported"
    assert rejection_class(Err0357.UNSUPPORTED_EVENT, "ADT", MAPPED) == "unsupported"
    assert rejection_class(Err0357.UNSUPPORTED_VERSION, "ADT", MAPPED) == "unsupported"
    # a type no mapping takes stays unsupported whatever else is wrong with it
    assert rejection_class(Err0357.REQUIRED_FIELD_MISSING, "ORU", MAPPED) == "unsupported"
    assert rejection_class(Err0357.REQUIRED_FIELD_MISSING, "ADT", MAPPED) == "content"
    assert rejection_class(Err0357.TABLE_VALUE_NOT_FOUND, "ADT", MAPPED) == "content"
    assert rejection_class(Err0357.REQUIRED_FIELD_MISSING, "", MAPPED) == "content"  # no usable MSH


def _corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(ROOT / "samples" / "hl7" / "adt_a01.hl7", folder / "good.hl7")
    a01 = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_text(encoding="utf-8")
    (folder / "oru.hl7").write_text(a01.replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01"), encoding="utf-8")
    (folder / "no_id.hl7").write_text(a01.replace("|S-A01-0001|", "||"), encoding="utf-8")
    (folder / "no_processing_id.hl7").write_text(a01.replace("|S-A01-0001|P|", "|X-1||"), encoding="utf-8")
    return folder


def test_the_table_and_the_listing_say_which_rejections_are_by_design(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    config = str(ROOT / "channels.yaml")
    result = CliRunner().invoke(app, ["corpus-check", str(folder), "--config", config, "--list"])
    out = result.output
    assert result.exit_code == 0, out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "1", "0", "3", "1", "2"], out  # AA AE AR unsupported content
    assert "1 unsupported by design" in out and "2 content errors" in out
    assert "oru.hl7#1  ORU^R01  AR  unsupported  MSH-9.1" in out
    assert "no_id.hl7#1  ADT^A01  AR  content  MSH-10" in out
    assert "no_processing_id.hl7#1  ADT^A01  AR  content  MSH-11: MSH-11 processing id is empty" in out
    assert "good.hl7" not in out  # only rejections are listed


def test_json_gives_every_message_with_its_class(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    config = str(ROOT / "channels.yaml")
    result = CliRunner().invoke(app, ["corpus-check", str(folder), "--config", config, "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["file"]: row for row in map(json.loads, result.output.splitlines())}
    assert rows["good.hl7"]["ack"] == "AA" and rows["good.hl7"]["rejection"] == ""
    assert rows["oru.hl7"]["rejection"] == "unsupported"
    assert rows["no_id.hl7"]["rejection"] == "content" and rows["no_id.hl7"]["reason"].startswith("MSH-10")
