"""The compiled mapping engine: lineage on or off gives the same records, and records share no objects
with the mapping files or with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hms_ach.hl7v2.parse import parse
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = sorted(p for p in (ROOT / "samples" / "hl7").glob("*.hl7"))


@pytest.fixture(scope="module")
def engine() -> MappingEngine:
    return MappingEngine(load_mappings(ROOT / "mappings"), "America/New_York")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_lineage_off_yields_the_same_records(engine: MappingEngine, sample: Path) -> None:
    msg = parse(sample.read_bytes())
    traced = engine.map_message(msg)
    plain = engine.map_message(msg, lineage=False)
    assert plain.to_dict() == traced.to_dict()
    assert traced.records and all(r.lineage for r in traced.records)
    assert not any(r.lineage for r in plain.records)


def _containers(value: Any) -> list[int]:
    if isinstance(value, dict):
        return [id(value)] + [i for v in value.values() for i in _containers(v)]
    if isinstance(value, list):
        return [id(value)] + [i for v in value for i in _containers(v)]
    return []


def test_records_share_no_objects_across_messages(engine: MappingEngine) -> None:
    msg = parse((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
    first = engine.map_message(msg, lineage=False)
    second = engine.map_message(msg, lineage=False)
    ids_first = {i for r in first.records for i in _containers(r.content)}
    ids_second = {i for r in second.records for i in _containers(r.content)}
    assert not ids_first & ids_second
    # changing one result (as the store may) leaves the next one untouched
    for rec in first.records:
        for v in rec.content.values():
            if isinstance(v, dict):
                v["changed"] = True
    assert engine.map_message(msg, lineage=False).to_dict() == second.to_dict()


def test_references_between_records_of_one_message_are_resolved(engine: MappingEngine) -> None:
    msg = parse((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
    result = engine.map_message(msg, lineage=False)
    encounter = next(r for r in result.records if r.resource_type == "Encounter")
    assert encounter.content["subject"] == {"reference": "@patient"}
    assert "@as:" not in repr(result.to_dict())


def test_a_rule_that_is_not_critical_fails_as_a_warning(tmp_path: Path) -> None:
    """`critical: false` on a rule: a site-local code (PID-8 Q) leaves gender unset and is a warning;
    without it the same message is an error."""
    import shutil

    from hms_ach.core.errors import MappingError

    root = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", root)
    patient = root / "resources" / "patient.yaml"
    text = patient.read_text()
    rule = "  - target: gender\n    source: PID-8\n    table: administrative_sex\n"
    assert rule in text
    raw = (
        b"MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126||ADT^A04|C1|P|2.5.1\r"
        b"PID|1||100001^^^GENHOSP^MR||Rivera^Maria||19750314|Q\r"
        b"PV1|1|O|CLINIC^^^GENHOSP||||||||||||||||V1^^^GENHOSP^VN\r"
    )
    with pytest.raises(MappingError):
        MappingEngine(load_mappings(root)).map_message(parse(raw))
    patient.write_text(text.replace(rule, rule + "    critical: false\n"))
    result = MappingEngine(load_mappings(root)).map_message(parse(raw))
    stored = next(r for r in result.records if r.resource_type == "Patient")
    assert "gender" not in stored.content and stored.content["birthDate"] == "1975-03-14"
    assert [(w.code, w.location) for w in result.warnings] == [("103", "PID-8")]
    assert any(r.resource_type == "Encounter" for r in result.records)
