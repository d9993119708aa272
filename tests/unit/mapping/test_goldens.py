"""Every golden case under mappings/ as its own test, plus tests of the golden runner itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.core.errors import ConfigErrors
from hms_ach.hl7v2.parse import parse
from hms_ach.mapping import goldens
from hms_ach.mapping.loader import MappingSet, load_mappings

ROOT = Path(__file__).resolve().parents[3]
MAPPINGS = ROOT / "mappings"


def _collect() -> list[pytest.ParameterSet]:
    params = []
    for path in goldens.discover(MAPPINGS):
        rel = path.relative_to(ROOT).as_posix()
        try:
            golden = goldens.load_golden_file(path)
        except ConfigErrors as exc:  # a broken golden file is one failing test, not a collection error
            params.append(pytest.param(path, -1, str(exc), id=f"{rel}::(file)"))
            continue
        for i, case in enumerate(golden.model.cases):
            params.append(pytest.param(path, i, "", id=f"{rel}::{case.name}"))
    return params


@pytest.fixture(scope="module")
def mset() -> MappingSet:
    return load_mappings(MAPPINGS)


def test_every_message_mapping_has_golden_tests(mset: MappingSet) -> None:
    missing = [
        f.path.name
        for f in mset.messages.values()
        if not f.path.with_name(f.path.stem + "_test.yaml").exists()
    ]
    assert not missing, f"message mappings without a *_test.yaml beside them: {missing}"


def test_every_good_sample_is_covered_by_a_golden_case() -> None:
    used: set[str] = set()
    for path in goldens.discover(MAPPINGS):
        used |= {c.sample for c in goldens.load_golden_file(path).model.cases if c.sample}
    samples = {p.relative_to(ROOT).as_posix() for p in (ROOT / "samples" / "hl7").glob("*.hl7")}
    # DFT^P03 is mapped by its own issue
    missing = sorted(s for s in samples - used if not s.endswith("dft_p03.hl7"))
    assert not missing, f"samples no golden case uses: {missing}"


@pytest.mark.parametrize(("path", "index", "load_error"), _collect())
def test_golden_case(path: Path, index: int, load_error: str, mset: MappingSet) -> None:
    if load_error:
        pytest.fail(load_error, pytrace=False)
    result = goldens.run_case(goldens.load_golden_file(path), index, mset, ROOT, parse)
    if not result.passed:
        pytest.fail(result.report(), pytrace=False)


# ------------------------------------------------------------------ the runner itself

A01 = (
    "MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126083000-0500||ADT^A01^ADT_A01|T1|P|2.5.1\n"
    "PID|1||500001^^^GENHOSP^MR||Doe^Jane^Q||19800101|F\n"
    "PV1|1|I|4W^412^A^GENHOSP||||||||||||||||V77^^^GENHOSP^VN\n"
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x_test.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _case(body: str) -> str:
    message = "".join(f"      {line}\n" for line in A01.splitlines())
    return f"cases:\n  - name: c\n    message: |\n{message}{body}"


def _run(tmp_path: Path, mset: MappingSet, text: str) -> goldens.CaseResult:
    results = goldens.run_golden_file(_write(tmp_path, text), mset, ROOT, parse)
    assert len(results) == 1
    return results[0]


def test_subset_passes_when_every_given_value_is_present(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        _case(
            "    expect:\n"
            "      records:\n"
            "        - resourceType: Patient\n"
            "          content: {name: [{given: [Jane]}], birthDate: 1980-01-01}\n"
        ),
    )
    assert result.passed, result.report()


def test_subset_failure_shows_a_diff_naming_file_and_line(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        _case(
            "    expect:\n"
            "      records:\n"
            "        - resourceType: Encounter\n"
            "          content: {status: finished}\n"
        ),
    )
    assert not result.passed
    assert result.where.endswith("x_test.yaml:2")
    assert '-    "status": "finished"' in result.diff
    assert '+    "status": "in-progress"' in result.diff
    assert "class" not in result.diff  # only what the expectation names is shown


def test_exact_fails_on_extra_content(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        _case(
            "    match: exact\n"
            "    expect:\n"
            "      records:\n"
            "        - resourceType: Patient\n"
            "          content: {gender: female}\n"
        ),
    )
    assert not result.passed
    assert "expected exactly 1 records" in result.message
    assert '+      "birthDate": "1980-01-01"' in result.diff


def test_references_are_shown_as_conditional_references(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        _case(
            "    expect:\n"
            "      records:\n"
            "        - resourceType: Encounter\n"
            "          content:\n"
            "            subject: {reference: 'Patient?identifier=urn:hms-ach:id:GENHOSP|500001'}\n"
        ),
    )
    assert result.passed, result.report()


def test_absent_elements_are_checked(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        _case(
            "    expect:\n"
            "      records:\n"
            "        - resourceType: Encounter\n"
            "          absent: [status, period.end]\n"
        ),
    )
    assert not result.passed
    assert "Encounter.status must not be set" in result.message
    assert "period.end" not in result.message


def test_missing_record_lists_what_was_produced(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path, mset, _case("    expect:\n      records:\n        - resourceType: Practitioner\n")
    )
    assert not result.passed
    assert "no Practitioner record" in result.message
    assert "Patient urn:hms-ach:id:GENHOSP|500001" in result.message


def test_expected_error_that_does_not_happen_fails(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(tmp_path, mset, _case("    expect:\n      error: {code: '101'}\n"))
    assert not result.passed
    assert "expected an error" in result.message


def test_wrong_error_is_described(tmp_path: Path, mset: MappingSet) -> None:
    text = _case("    expect:\n      error: {code: '102', location: PID-7}\n").replace("|F\n", "|Q\n")
    result = _run(tmp_path, mset, text)
    assert not result.passed
    assert "code: expected '102', got '103'" in result.message
    assert "location: expected 'PID-7', got 'PID-8'" in result.message


def test_missing_sample_is_a_failed_case(tmp_path: Path, mset: MappingSet) -> None:
    result = _run(
        tmp_path,
        mset,
        "cases:\n  - name: c\n    sample: samples/nope.hl7\n    expect: {error: {code: '101'}}\n",
    )
    assert not result.passed
    assert "cannot read sample 'samples/nope.hl7'" in result.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "cases:\n  - name: c\n    mesage: x\n    expect: {error: {}}\n",
            ["x_test.yaml:3:5", "did you mean 'message'"],
        ),
        (
            "cases:\n  - name: c\n    expect: {error: {}}\n",
            ["exactly one of `sample`, `message`, `csv`, `fhir` or `event`"],
        ),
        ("cases:\n  - name: c\n    message: x\n    expect: {}\n", ["expects nothing"]),
        (
            "cases:\n  - name: c\n    message: x\n    expect:\n      records:\n        - resourceTyp: Patient\n",
            ["x_test.yaml:6:11", "did you mean 'resourceType'"],
        ),
        ("cases: [\n", ["x_test.yaml:", "YAML syntax error"]),
    ],
)
def test_broken_golden_files_say_where(
    tmp_path: Path, mset: MappingSet, text: str, expected: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigErrors) as info:
        goldens.load_golden_file(path)
    for part in expected:
        assert part in str(info.value)
    results = goldens.run_golden_file(path, mset, ROOT, parse)
    assert [r.passed for r in results] == [False]


def test_discover_finds_golden_files_only() -> None:
    found = goldens.discover(MAPPINGS)
    assert found and all(p.name.endswith("_test.yaml") for p in found)
    assert MAPPINGS / "messages" / "adt_a01_test.yaml" in found
