"""Mapping targets against the R4 structure and HL7 sources against v2.5, checked when mappings load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hms_ach.core.errors import ConfigErrors
from hms_ach.mapping.fhir_structure import elements, resolve_target
from hms_ach.mapping.hl7_structure import check_field
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
MAPPINGS = ROOT / "mappings"


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, target)
    return target


def errors_after(mdir: Path, rel: str, old: str, new: str) -> list[str]:
    path = mdir / rel
    text = path.read_text()
    assert old in text, f"{old!r} not in {rel}"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigErrors) as info:
        load_mappings(mdir)
    return [e.render() for e in info.value.errors]


def test_the_shipped_mappings_pass() -> None:
    load_mappings(MAPPINGS)


def test_a_misspelt_target_is_refused_with_position_and_did_you_mean(mdir: Path) -> None:
    errs = errors_after(mdir, "resources/patient.yaml", "  - target: gender\n", "  - target: gendr\n")
    assert len(errs) == 1
    assert re.match(r".*resources/patient\.yaml:\d+:\d+: Patient has no element 'gendr'", errs[0]), errs
    assert "did you mean 'gender'?" in errs[0]


def test_a_misspelt_nested_element_names_its_type(mdir: Path) -> None:
    errs = errors_after(mdir, "datatypes/xpn_humanname.yaml", "target: family", "target: famliy")
    assert "HumanName has no element 'famliy'" in errs[0] and "did you mean 'family'?" in errs[0]


def test_a_single_valued_element_is_never_written_as_a_list(mdir: Path) -> None:
    errs = errors_after(
        mdir, "resources/location_fhir.yaml", "  - target: address\n", "  - target: address[]\n"
    )
    assert "Location.address holds one value (0..1)" in errs[0] and "write 'address'" in errs[0]


def test_a_list_element_written_as_one_value_is_refused_not_wrapped(mdir: Path) -> None:
    errs = errors_after(
        mdir,
        "resources/patient.yaml",
        "  - target: active\n    value: true\n",
        "  - target: name\n    source: PID-5\n    use: xpn_humanname\n",
    )
    assert "name is a list (0..*) in R4 and this rule writes one value: write name[]" in errs[0]
    errs = errors_after(
        mdir, "resources/patient.yaml", "maritalStatus.coding[0].code", "maritalStatus.coding.code"
    )
    assert any("CodeableConcept.coding is a list (0..*): say which item" in e for e in errs), errs


def test_a_text_cannot_go_into_a_complex_element(mdir: Path) -> None:
    errs = errors_after(
        mdir,
        "resources/patient.yaml",
        "  - target: maritalStatus.coding[0].code\n",
        "  - target: maritalStatus\n",
    )
    assert "maritalStatus is a CodeableConcept in R4, but this rule writes a string" in errs[0]


def test_a_datatype_mapping_must_produce_the_element_type(mdir: Path) -> None:
    errs = errors_after(
        mdir,
        "resources/patient.yaml",
        "  - target: address[]\n    for_each: PID-11\n    use: xad_address\n",
        "  - target: address[]\n    for_each: PID-11\n    use: xpn_humanname\n",
    )
    assert "address is a Address in R4, but this rule writes a HumanName (xpn_humanname)" in errs[0]


def test_a_constant_outside_a_required_binding_is_refused(mdir: Path) -> None:
    errs = errors_after(
        mdir,
        "resources/patient.yaml",
        "  - target: active\n    value: true\n",
        "  - target: gender\n    value: robot\n",
    )
    assert "'robot' is not a code of gender" in errs[0] and "female" in errs[0]


def test_hl7_sources_are_checked_against_v25(mdir: Path) -> None:
    errs = errors_after(mdir, "resources/patient.yaml", "source: PID-8\n", "source: PID-88\n")
    assert re.search(r"patient\.yaml:\d+:\d+: source 'PID-88': PID has fields PID-1 to PID-\d+", errs[0])


def test_unknown_segment_and_component_past_the_datatype(mdir: Path) -> None:
    assert "did you mean 'PID'?" in check_field("PIX", 1, None, None)  # type: ignore[operator]
    assert "components 1 to 11, not 12" in (check_field("PV1", 3, 12, None) or "")
    assert check_field("ZPI", 99, 3, None) is None  # site-defined Z-segments
    assert check_field("PV1", 53, None, None) is None  # added in v2.7: accepted
    errs = errors_after(mdir, "datatypes/cx_identifier.yaml", "source: CX.1\n", "source: CX.14\n")
    assert "CX is a CX with components 1 to" in errs[0]


def test_element_table_reads_cardinality_types_and_codes() -> None:
    loc = elements("Location")
    enc = elements("Encounter")
    assert loc is not None and enc is not None
    assert not loc["address"].many and loc["alias"].many and loc["alias"].type == "string"
    assert not enc["serviceType"].many and enc["status"].required and enc["class"].type == "Coding"
    assert elements("Patient")["gender"].codes == {"male", "female", "other", "unknown"}  # type: ignore[index]
    assert elements("Shift") is None
    resolved, problem, _ = resolve_target("Encounter", "location[0].location")
    assert problem is None and resolved is not None and resolved.element.type == "Reference"
