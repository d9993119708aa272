"""kind: hl7 transforms: the edits, the lineage, and the loader's file:line:col errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.core.errors import ConfigErrors
from hms_ach.mapping import spec
from hms_ach.mapping.hl7_transform import Er7, TransformError, apply, parse_path
from hms_ach.mapping.loader import load_mappings

MSG = (
    b"MSH|^~\\&|ADT|HOSP|RCV|RFAC|20261126||ADT^A01^ADT_A01|C1|P|2.5.1\r"
    b"PID|1||100001^^^HOSP^MR~999^^^SSA^SS||Rivera^Maria&x||19750314|F\r"
    b"NK1|1|Rivera^Daniel\rNK1|2|Rivera^Ana\r"
    b"PV1|1|I|4W^412^A\r"
)
SEX = spec.CodeTable(kind="table", map={"F": "2", "M": "1"}, unmapped="error")


def _t(*rules: dict[str, object]) -> spec.Hl7TransformMapping:
    return spec.Hl7TransformMapping.model_validate({"kind": "hl7", "rules": list(rules)})


def _get(raw: bytes, path: str) -> str:
    return Er7(raw).get(parse_path(path))


def test_set_copy_table_and_drop_with_lineage() -> None:
    done = apply(
        _t(
            {"set": "MSH-5", "value": "LAB"},
            {"set": "MSH-6", "copy": "MSH-4"},
            {"set": "PID-8", "table": "sex"},
            {"set": "PV1-3.2", "value": "999"},
            {"set": "PID-5.2.2", "value": "y"},
            {"drop": "NK1"},
        ),
        MSG,
        {"sex": SEX},
    )
    out = done.message
    assert _get(out, "MSH-5") == "LAB" and _get(out, "MSH-6") == "HOSP"
    assert _get(out, "PID-8") == "2"
    assert _get(out, "PV1-3") == "4W^999^A"
    assert _get(out, "PID-5") == "Rivera^Maria&y"
    assert b"NK1" not in out
    assert b"100001^^^HOSP^MR~999^^^SSA^SS" in out  # the other repetitions kept
    assert [(c.rule, c.path, c.before, c.after) for c in done.changes] == [
        (1, "MSH-5", "RCV", "LAB"),
        (2, "MSH-6", "RFAC", "HOSP"),
        (3, "PID-8", "F", "2"),
        (4, "PV1-3.2", "412", "999"),
        (5, "PID-5.2.2", "x", "y"),
        (6, "NK1", "2 segment(s)", ""),
    ]


def test_untouched_message_is_byte_for_byte_the_same_and_conditions_apply() -> None:
    assert apply(_t(), MSG, {}).message == MSG
    out = apply(_t({"set": "PV1-2", "value": "E", "when": {"source": "PV1-2", "equals": "O"}}), MSG, {})
    assert out.changes == [] and out.message == MSG
    grown = apply(_t({"set": "PV1-19", "value": "V1"}), MSG, {}).message
    assert _get(grown, "PV1-19") == "V1"


def test_an_unmapped_code_under_unmapped_error_says_where() -> None:
    with pytest.raises(TransformError) as info:
        apply(_t({"set": "PID-8", "table": "sex"}), MSG.replace(b"|F\r", b"|X\r"), {"sex": SEX})
    assert info.value.location == "PID-8" and "'X'" in info.value.message


def test_the_loader_refuses_a_broken_transform_with_file_line_col(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "kind: hl7\nrules:\n  - set: PID8\n    value: x\n  - set: PID-8\n    table: nope\n  - drop: MSH\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_mappings(tmp_path)
    text = str(info.value)
    assert "t.yaml:3:" in text and "not an HL7 path" in text
    assert "t.yaml:6:" in text and "unknown code table 'nope'" in text
    assert "t.yaml:7:" in text and "cannot drop 'MSH'" in text


def test_mapping_preview_shows_the_message_after_and_the_lineage() -> None:
    from typer.testing import CliRunner

    from hms_ach.app.cli import app

    root = Path(__file__).resolve().parents[3]
    result = CliRunner().invoke(
        app,
        [
            "mapping",
            "preview",
            str(root / "samples/hl7/adt_a01.hl7"),
            "--transform",
            "adt_to_downstream",
            "--mapping-dir",
            str(root / "mappings"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "MSH|^~\\&|ADTSYS|GENHOSP|DOWNSTREAM|DOWNFAC|" in result.output
    assert "PV1-2      'I' -> 'IN'  (rule 3: table patient_class_downstream)" in result.output
    assert "NK1|" not in result.output
