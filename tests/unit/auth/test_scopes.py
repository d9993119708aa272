"""SMART App Launch scope grammar (v1 and v2) and the /fhir policy it grants."""

from __future__ import annotations

import pytest

from hms_ach.auth import ScopePolicy, parse_scopes
from hms_ach.auth.scopes import INTERACTIONS, parse_scope

READS = ("read", "vread", "history")
SEARCHES = ("search", "history-type")
WRITES = ("create", "update", "delete")


@pytest.mark.parametrize(
    ("text", "context", "resource_type", "letters", "version"),
    [
        ("patient/Observation.read", "patient", "Observation", "rs", 1),
        ("patient/Observation.write", "patient", "Observation", "cud", 1),
        ("user/*.*", "user", "*", "cruds", 1),
        ("system/Patient.cruds", "system", "Patient", "cruds", 2),
        ("patient/*.rs", "patient", "*", "rs", 2),
        ("user/Encounter.cud", "user", "Encounter", "cud", 2),
        ("system/Claim.s", "system", "Claim", "s", 2),
        ("user/Practitioner.r", "user", "Practitioner", "r", 2),
    ],
)
def test_grammar(text: str, context: str, resource_type: str, letters: str, version: int) -> None:
    scope = parse_scope(text)
    assert scope is not None
    assert (scope.context, scope.resource_type, scope.letters, scope.version) == (
        context,
        resource_type,
        frozenset(letters),
        version,
    )


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.sr",  # v2 letters must be in c r u d s order
        "patient/Observation.rr",
        "patient/Observation.x",
        "patient/Observation.",
        "patient/Observation",
        "patient/observation.read",  # resource types start upper-case
        "patient/Obs-ervation.read",
        "admin/Patient.read",
        "patient/Observation.rs?category=laboratory",  # v2 granular: not enforceable here, grants nothing
        "patient/*.read/extra",
    ],
)
def test_malformed_or_unsupported_scopes_grant_nothing(text: str) -> None:
    parsed = parse_scopes(text)
    assert parsed.resource == ()
    policy = ScopePolicy(parsed, patient="p-1")
    assert not any(policy.allows("Observation", i) for i in INTERACTIONS)


def test_non_resource_scopes_are_kept_aside() -> None:
    parsed = parse_scopes(
        "openid fhirUser profile launch launch/patient launch/encounter offline_access online_access "
        "patient/*.read cases.read admin/Patient.read patient/Observation.rs?code=x patient/*.read"
    )
    assert [s.text for s in parsed.resource] == ["patient/*.read"]  # duplicates once
    assert parsed.other == (
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
        "cases.read",
        "admin/Patient.read",
    )
    assert parsed.unsupported == ("patient/Observation.rs?code=x",)
    assert parse_scopes(["user/*.rs", 7, "openid"]).texts == ("user/*.rs", "openid")  # type: ignore[list-item]


def test_v1_read_and_write_map_onto_interactions() -> None:
    read = ScopePolicy(parse_scopes("user/Observation.read"))
    assert all(read.allows("Observation", i) for i in READS + SEARCHES)
    assert not any(read.allows("Observation", i) for i in WRITES)
    assert not read.allows("Patient", "read")
    write = ScopePolicy(parse_scopes("user/Observation.write"))
    assert all(write.allows("Observation", i) for i in WRITES)
    assert not any(write.allows("Observation", i) for i in READS + SEARCHES)


@pytest.mark.parametrize(
    ("letters", "allowed"),
    [
        ("r", {"read", "vread", "history"}),
        ("s", {"search", "history-type"}),
        ("rs", {"read", "vread", "history", "search", "history-type"}),
        ("c", {"create"}),
        ("cud", {"create", "update", "delete"}),
        ("ud", {"update", "delete"}),
        ("cruds", set(INTERACTIONS)),
    ],
)
def test_v2_letters(letters: str, allowed: set[str]) -> None:
    policy = ScopePolicy(parse_scopes(f"system/Encounter.{letters}"))
    assert {i for i in INTERACTIONS if policy.allows("Encounter", i)} == allowed
    assert not policy.allows("Encounter", "operate")  # an interaction nobody granted


def test_patient_scopes_are_limited_to_the_token_patient() -> None:
    policy = ScopePolicy(parse_scopes("patient/*.read"), patient="A")
    assert policy.allows("Observation", "search")
    assert policy.patient_compartment("Observation", "search") == "A"
    assert policy.patient_compartment("Patient", "read") == "A"
    assert not policy.allows("Observation", "create")  # writes are 403
    # without a patient claim a patient/ scope grants nothing
    orphan = ScopePolicy(parse_scopes("patient/*.read"))
    assert not orphan.allows("Observation", "read")


def test_a_wider_scope_lifts_the_compartment() -> None:
    policy = ScopePolicy(parse_scopes("patient/*.read user/Practitioner.rs"), patient="A")
    assert policy.patient_compartment("Observation", "read") == "A"
    assert (
        policy.allows("Practitioner", "read") and policy.patient_compartment("Practitioner", "read") is None
    )


def test_user_practitioner_read_sees_no_patient() -> None:
    policy = ScopePolicy(parse_scopes("user/Practitioner.read"))
    assert policy.allows("Practitioner", "search")
    assert not policy.allows("Patient", "read") and not policy.allows("Patient", "search")
    assert policy.required_scope("Patient", "search") == "user/Patient.s"


def test_a_transaction_is_decided_entry_by_entry() -> None:
    policy = ScopePolicy(parse_scopes("user/Observation.cruds user/Patient.rs"))
    entries = [("Observation", "create"), ("Observation", "update"), ("Patient", "update")]
    assert [policy.allows(t, i) for t, i in entries] == [True, True, False]
