"""Every registered mapping function's ``examples`` run as tests, plus its error cases."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from hms_ach.mapping.functions import FUNCTIONS, FunctionError, npi_is_valid

# Examples that show a known bug in a function; strict, so the mark must go when the bug is fixed.
KNOWN_BROKEN: dict[tuple[str, int], str] = {}

EXAMPLES = [
    pytest.param(
        name,
        given,
        args,
        expected,
        id=f"{name}[{i}]",
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[(name, i)])]
        if (name, i) in KNOWN_BROKEN
        else [],
    )
    for name, spec in sorted(FUNCTIONS.items())
    for i, (given, args, expected) in enumerate(spec.examples)
]


@pytest.mark.parametrize(("name", "given", "args", "expected"), EXAMPLES)
def test_function_examples(name: str, given: Any, args: dict[str, Any], expected: Any) -> None:
    assert FUNCTIONS[name].fn(given, **args) == expected


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_function_is_documented_with_examples(name: str) -> None:
    spec = FUNCTIONS[name]
    assert spec.summary, f"{name} has no docstring summary"
    assert spec.examples, f"{name} has no examples"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_declared_args_match_the_signature(name: str) -> None:
    params = list(inspect.signature(FUNCTIONS[name].fn).parameters)[1:]
    assert set(FUNCTIONS[name].args) == set(params)


@pytest.mark.parametrize(
    ("name", "given", "args"),
    [
        ("hl7_datetime", "2026-11-26", {}),
        ("hl7_datetime", "20261332", {}),
        ("hl7_datetime", "20261126250000", {}),
        ("hl7_datetime", "20261126083000", {"timezone": "Mars/Olympus"}),
        ("hl7_datetime", "20261126083000+2400", {}),  # a day: datetime itself refuses it
        ("hl7_datetime", "20261126083000-1500", {}),  # past FHIR's 14 hours
        ("hl7_datetime", "20261126083000+0175", {}),  # 75 minutes
        ("hl7_datetime", "20261126083000-2359", {}),
        ("hl7_date", "19751399", {}),
        ("hl7_date", "yesterday", {}),
        ("decimal", "12,50", {}),
        ("npi", "1234567890", {}),
        ("npi", "12345", {}),
        ("format", ["a"], {"template": "{0}-{1}"}),
    ],
)
def test_bad_values_raise_function_errors(name: str, given: Any, args: dict[str, Any]) -> None:
    with pytest.raises(FunctionError) as info:
        FUNCTIONS[name].fn(given, **args)
    assert info.value.code == "102"


def test_datetime_keeps_offset_and_precision() -> None:
    fn = FUNCTIONS["hl7_datetime"].fn
    assert fn("20261126083000-0500") == "2026-11-26T08:30:00-05:00"
    assert fn("2026112608") == "2026-11-26T08:00:00+00:00"
    assert fn("20261126083000", timezone="America/New_York") == "2026-11-26T08:30:00-05:00"
    assert fn("20261126083000+1400") == "2026-11-26T08:30:00+14:00"  # the widest offset FHIR allows


@pytest.mark.parametrize(
    ("value", "zone", "expected"),
    [
        ("20261126083000-0000", "UTC", "2026-11-26T08:30:00+00:00"),
        ("20261126083000+0545", "UTC", "2026-11-26T08:30:00+05:45"),
        ("20261126083000-1200", "UTC", "2026-11-26T08:30:00-12:00"),
        ("20261126083000.12-1230", "Europe/Paris", "2026-11-26T08:30:00.12-12:30"),
        ("202611260830", "z", "2026-11-26T08:30:00+00:00"),
        ("2026112608", "", "2026-11-26T08:00:00+00:00"),
        ("20260701120000", "Europe/Paris", "2026-07-01T12:00:00+02:00"),
        ("09991231235959", "UTC", "999-12-31T23:59:59+00:00"),
    ],
)
def test_datetime_text_of_fixed_offsets(value: str, zone: str, expected: str) -> None:
    """UTC and the message's own offset are written from the digits; a named zone and a year
    before 1000 take the general path (strftime); both give the same text."""
    assert FUNCTIONS["hl7_datetime"].fn(value, timezone=zone) == expected


def test_npi_check_digit() -> None:
    assert npi_is_valid("1234567893")
    assert npi_is_valid("1356702989")
    assert not npi_is_valid("1234567894")
