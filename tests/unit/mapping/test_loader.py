"""Broken mapping files give one clear ConfigError each: file:line:col, what, expected, did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.core.errors import ConfigError, ConfigErrors
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]

TABLE = """\
kind: table
map: {F: female, M: male}
"""

DATATYPE = """\
kind: datatype
datatype: XPN
rules:
  - target: family
    source: XPN.1.1
"""

RESOURCE = """\
kind: resource
resource: Patient
key:
  system: {value: "urn:x"}
  value: {source: PID-3.1, required: true}
rules:
  - target: name[]
    for_each: PID-5
    use: xpn_name
  - target: gender
    source: PID-8
    table: administrative_sex
  - target: birthDate
    source: PID-7
    function: hl7_date
"""

MESSAGE = """\
kind: message
match: {message: ADT, events: [A01]}
records:
  - record: patient
    as: patient
"""


def _tree(tmp_path: Path, **replace: str) -> Path:
    """A small valid mapping tree; ``replace`` swaps whole files (``resource=...``)."""
    files = {
        "tables/administrative_sex.yaml": replace.get("table", TABLE),
        "datatypes/xpn_name.yaml": replace.get("datatype", DATATYPE),
        "resources/patient.yaml": replace.get("resource", RESOURCE),
        "messages/adt.yaml": replace.get("message", MESSAGE),
    }
    for extra_name, text in replace.items():
        if "/" in extra_name:
            files[extra_name] = text
    root = tmp_path / "mappings"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def _errors(root: Path) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load_mappings(root)
    errors = info.value.errors
    assert errors and all(isinstance(e, ConfigError) for e in errors)
    return errors


def _one(root: Path) -> str:
    errors = _errors(root)
    assert len(errors) == 1, [e.render() for e in errors]
    return errors[0].render()


def test_the_small_tree_and_the_shipped_mappings_load(tmp_path: Path) -> None:
    mset = load_mappings(_tree(tmp_path))
    assert set(mset.resources) == {"patient"}
    shipped = load_mappings(ROOT / "mappings")
    assert {"adt_a01", "adt_a40", "mfn_m02"} <= set(shipped.messages)


def test_typo_in_a_key(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, resource=RESOURCE.replace("  - target: gender", "  - tagret: gender")))
    assert "resources/patient.yaml:10:5: unknown key 'tagret'; did you mean 'target'?" in text
    assert "expected one of" in text


def test_typo_in_a_function_name(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, resource=RESOURCE.replace("function: hl7_date", "function: hl7_dattime")))
    assert "resources/patient.yaml:15:5: unknown function 'hl7_dattime'; did you mean 'hl7_datetime'?" in text
    assert "expected one of" in text


def test_typo_in_a_table_name(tmp_path: Path) -> None:
    text = _one(
        _tree(tmp_path, resource=RESOURCE.replace("table: administrative_sex", "table: administrative_sx"))
    )
    assert (
        "resources/patient.yaml:12:5: unknown table 'administrative_sx'; did you mean 'administrative_sex'?"
        in text
    )


def test_missing_table(tmp_path: Path) -> None:
    text = _one(
        _tree(tmp_path, resource=RESOURCE.replace("table: administrative_sex", "table: ethnic_group"))
    )
    assert "resources/patient.yaml:12:5: unknown table 'ethnic_group'" in text
    assert "expected a name from mappings/tables" in text


def test_unknown_datatype_mapping_in_use(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, resource=RESOURCE.replace("use: xpn_name", "use: xpn_nam")))
    assert "resources/patient.yaml:9:5: unknown datatype mapping 'xpn_nam'; did you mean 'xpn_name'?" in text


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("PID.8", "did you mean 'PID-8'?"),
        ("PID.5.1", "did you mean 'PID-5.1'?"),
        ("PID-0", "HL7 positions start at 1"),
    ],
)
def test_wrong_path_syntax(tmp_path: Path, path: str, expected: str) -> None:
    text = _one(_tree(tmp_path, resource=RESOURCE.replace("source: PID-8", f"source: {path}")))
    assert "resources/patient.yaml:11:5:" in text
    assert expected in text


def test_record_layering_loop(tmp_path: Path) -> None:
    loop_a = RESOURCE + "  - target: link[0].other\n    record: other_patient\n"
    loop_b = RESOURCE + "  - target: link[0].other\n    record: patient\n"
    errors = _errors(_tree(tmp_path, resource=loop_a, **{"resources/other_patient.yaml": loop_b}))
    text = "\n".join(e.render() for e in errors)
    assert "use:/record: layering loops" in text
    assert (
        "resource:other_patient -> resource:patient -> resource:other_patient" in text
        or "resource:patient -> resource:other_patient -> resource:patient" in text
    )
    assert ".yaml:6:" in text  # the rules: key of the file where the loop closes


def test_use_layering_loop(tmp_path: Path) -> None:
    looping = DATATYPE + "  - target: given[]\n    source: XPN.2\n    use: xpn_name\n"
    text = _one(_tree(tmp_path, datatype=looping))
    assert (
        "datatypes/xpn_name.yaml:3:1: use:/record: layering loops: datatype:xpn_name -> datatype:xpn_name"
        in text
    )


def test_yaml_syntax_error(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, resource=RESOURCE.replace("  - target: gender", "  - target: [gender")))
    assert "resources/patient.yaml:" in text
    assert "YAML syntax error" in text
    assert "expected valid YAML" in text


def test_unknown_kind(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, table=TABLE.replace("kind: table", "kind: tabel")))
    assert "tables/administrative_sex.yaml:1:1: unknown kind 'tabel'; did you mean 'table'?" in text


def test_unknown_parameter_in_with(tmp_path: Path) -> None:
    text = _one(_tree(tmp_path, message=MESSAGE + "    with: {bed_status: O}\n"))
    assert "messages/adt.yaml:6:12: patient has no parameter 'bed_status'" in text


def test_unknown_alias_in_an_action(tmp_path: Path) -> None:
    message = (
        MESSAGE + "actions:\n  - action: merge_patient\n    args: {source: old_patient, target: patient}\n"
    )
    text = _one(_tree(tmp_path, message=message))
    assert "messages/adt.yaml:8:" in text
    assert "unknown alias 'old_patient'" in text


def test_all_errors_of_all_files_are_reported(tmp_path: Path) -> None:
    resource = RESOURCE.replace("function: hl7_date", "function: hl7_dattime").replace(
        "source: PID-8", "source: PID.8"
    )
    errors = _errors(_tree(tmp_path, resource=resource))
    assert len(errors) == 2


def test_errors_never_leak_a_stack_trace(tmp_path: Path) -> None:
    """Garbage files of every shape still give ConfigErrors, not Python exceptions."""
    for i, garbage in enumerate(
        [
            "- a\n- b\n",
            "just text\n",
            "kind: resource\n",
            "kind: message\nmatch: 3\n",
            "kind: table\nmap: [1, 2]\n",
            "\t\tkind: x",
            "kind: resource\nresource: Patient\nrules:\n  - target: a\n    for_each: PID-3\n",
        ]
    ):
        root = tmp_path / f"t{i}"
        (root / "x").mkdir(parents=True)
        (root / "x" / "bad.yaml").write_text(garbage, encoding="utf-8")
        errors = _errors(root)
        assert all("bad.yaml:" in e.render() for e in errors), [e.render() for e in errors]
