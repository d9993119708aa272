"""Mapping coverage lists what the mappings drop; the generated mapping reference is up to date."""

from __future__ import annotations

from pathlib import Path

from hms_ach.hl7v2.parse import parse
from hms_ach.mapping.coverage import Coverage, populated
from hms_ach.mapping.docs import generate
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]


def test_generated_mapping_reference_is_not_stale() -> None:
    committed = (ROOT / "docs" / "mapping-language.md").read_text(encoding="utf-8")
    assert committed == generate(), "docs/mapping-language.md is stale: run `hms-ach docs`"


def test_coverage_reports_populated_fields_no_mapping_reads() -> None:
    engine = MappingEngine(load_mappings(ROOT / "mappings"))
    msg = parse((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
    cov = Coverage()
    cov.add(engine, msg)
    assert "PID-5.1" in populated(msg)
    dropped = set(cov.dropped)
    assert "PID-22.1" in dropped  # the ethnic group is not mapped
    assert not dropped & {"PID-5.1", "PID-5.2", "PID-8", "PV1-3.1", "PV1-3.2", "PV1-3.3", "PV1-19.1"}
    assert not dropped & {"AL1-3.1", "AL1-3.2", "DG1-3.1", "NK1-2.1", "NK1-3.1"}  # clinical content
    assert "PV1-3.7" in dropped  # the building of the bed is not mapped
    assert not any(p.startswith("MSH") for p in dropped)
    assert "ethnic group" in cov.to_text()
