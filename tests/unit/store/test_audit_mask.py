"""Masking of sensitive values in audit diffs (hms_ach/store/audit_mask.py)."""

from __future__ import annotations

import copy
from typing import Any

from hms_ach.store.audit_keys import AuditSeal
from hms_ach.store.audit_mask import mask, mask_diff
from hms_ach.store.audit_settings import US_SSN

KEYED = AuditSeal(key=b"k" * 32, mask_fields=frozenset({"ssn", "contact.note"}))
UNKEYED = AuditSeal()


def record(ssn: str) -> dict[str, Any]:
    return {
        "identifier": [{"system": "urn:mrn", "value": "M1"}, {"system": US_SSN, "value": ssn}],
        "subject": {"identifier": {"system": US_SSN, "value": ssn}},
        "extra": {"ssn": ssn, "nested": [{"ssn": ssn}]},
        "contact": [{"note": "call after 5", "name": "Ada"}],
    }


def test_identifier_systems_and_fields_are_masked_and_input_untouched() -> None:
    before = record("123-45-6789")
    kept = copy.deepcopy(before)
    out = mask(before, KEYED)
    assert before == kept
    assert out is not None and "123-45-6789" not in repr(out)
    assert out["identifier"][0] == {"system": "urn:mrn", "value": "M1"}
    assert out["identifier"][1]["value"].startswith("masked:")
    assert out["contact"][0]["name"] == "Ada" and out["contact"][0]["note"].startswith("masked:")


def test_keyed_tokens_show_a_change_but_not_the_value() -> None:
    a, b, a2 = (mask(record(s), KEYED) for s in ("123-45-6789", "987-65-4321", "123-45-6789"))
    assert a == a2
    assert a is not None and b is not None
    assert a["identifier"][1]["value"] != b["identifier"][1]["value"]
    other_key = mask(record("123-45-6789"), AuditSeal(key=b"x" * 32))
    assert other_key is not None and other_key["identifier"][1]["value"] != a["identifier"][1]["value"]


def test_without_a_key_the_token_is_plain() -> None:
    out = mask(record("123-45-6789"), UNKEYED)
    assert out is not None and out["identifier"][1]["value"] == "masked" and out["extra"]["ssn"] == "masked"


def test_stored_diffs_are_masked_on_reading() -> None:
    legacy = [
        {
            "op": "replace",
            "path": "identifier",
            "old": record("1")["identifier"],
            "new": record("2")["identifier"],
        },
        {"op": "add", "path": "extra.ssn", "new": "123-45-6789"},
        {"op": "replace", "path": "name", "old": "A", "new": "B"},
        {"op": "add", "path": "x", "new": "masked:0011223344556677"},
    ]
    out = mask_diff(legacy, KEYED)
    assert "123-45-6789" not in repr(out)
    assert out[0]["old"][1]["value"] != out[0]["new"][1]["value"]
    assert out[2] == legacy[2]
    assert out[3]["new"] == "masked:0011223344556677"  # masked already: left as it is
