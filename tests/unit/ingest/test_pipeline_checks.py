"""The pipeline's checks of what reaches the store: NUL characters in JSON, record limits."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.core.errors import ContentError
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.ingest.pipeline import check_records, find_nul


def _rec(value: str = "E1", **content: Any) -> MappingResult:
    return MappingResult(records=[RecordWrite("p", "Patient", "urn:x", value, content)])


@pytest.mark.parametrize(
    ("value", "index", "path"),
    [
        ({"name": [{"family": "a"}, {"given": ["b", "c\x00"]}]}, "[{}]", "Patient.name[1].given[1]"),
        ({"a": {"b\x00": 1}}, "[{}]", "Patient.a"),
        ({"given": ["x", "\x00"]}, ".{}", "Patient.given.1"),
        ({"ok": ["x", 1, None, True]}, "[{}]", None),
    ],
)
def test_find_nul_gives_the_path(value: Any, index: str, path: str | None) -> None:
    assert find_nul(value, "Patient", index) == path


def test_find_nul_survives_any_depth() -> None:
    deep: Any = "\x00"
    for _ in range(10_000):
        deep = [deep]
    assert find_nul(deep, "$") == "$" + "[0]" * 10_000


def test_check_records_refuses_what_a_database_would() -> None:
    check_records(_rec("9" * 255, text="ok"))
    with pytest.raises(ContentError, match="at most 255") as info:
        check_records(_rec("9" * 256))
    assert (info.value.location, info.value.code) == ("Patient.identifier.value", "104")
    with pytest.raises(ContentError, match="NUL") as info:
        check_records(_rec(note="a\x00b"))
    assert info.value.code == "102"
    with pytest.raises(ContentError, match="max_record_bytes"):
        check_records(_rec(note="x" * 2000), max_record_bytes=1024)


def test_check_records_finds_the_failing_record_among_several() -> None:
    """The records are checked together first; a failure is then found record by record, with the
    same reason and location as when each is checked alone (and every record under the cap passes,
    even when together they are larger)."""
    ok = RecordWrite("a", "Patient", "urn:x", "1", {"text": "x" * 700})
    check_records(MappingResult(records=[ok, ok]), max_record_bytes=1024)
    big = RecordWrite("b", "Encounter", "urn:x", "2", {"note": "x" * 2000})
    with pytest.raises(ContentError, match="the Encounter record is") as info:
        check_records(MappingResult(records=[ok, big]), max_record_bytes=1024)
    assert (info.value.location, info.value.code) == ("Encounter", "104")
    nul = RecordWrite("c", "Condition", "urn:x", "3", {"note": {"a\x00": "b"}})
    with pytest.raises(ContentError, match="Condition record contains a NUL"):
        check_records(MappingResult(records=[ok, nul, big]), max_record_bytes=1024)
    long_key = RecordWrite("d", "Location", "urn:x", "9" * 256, {})
    with pytest.raises(ContentError, match="Location identifier value"):
        check_records(MappingResult(records=[ok, long_key]))
    odd_content: dict[Any, Any] = {1: "not JSON-ready here"}
    odd = RecordWrite("e", "Patient", None, "4", odd_content)
    check_records(MappingResult(records=[ok, odd]))  # the store renders it; skipped as before
