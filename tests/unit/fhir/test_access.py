"""SMART scope decisions of /fhir (hms_ach.fhir.access) and the Patient compartment as declared
(core/records.py) and applied to one record's content (store/search_params.py); no database."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.auth.scopes import ScopePolicy, parse_scopes
from hms_ach.core.records import FHIR_SERVED, PATIENT_COMPARTMENT, RECORD_TYPES, THE_PATIENT_ITSELF
from hms_ach.fhir.access import decide, interactions_of, search_access
from hms_ach.fhir.outcomes import FhirError
from hms_ach.fhir.write import Operation
from hms_ach.store.search_params import SEARCH_PARAMS, in_patient_compartment


def policy(scopes: str, patient: str | None = None) -> ScopePolicy:
    return ScopePolicy(parse_scopes(scopes), patient)


def test_every_compartment_declaration_names_a_patient_reference_parameter() -> None:
    for rtype, params in PATIENT_COMPARTMENT.items():
        assert RECORD_TYPES[rtype].fhir, rtype
        for name in params:
            if name == THE_PATIENT_ITSELF:
                assert rtype == "Patient"
                continue
            param = SEARCH_PARAMS[rtype][name]
            assert param.type == "reference" and (not param.targets or "Patient" in param.targets), name
    # staff and places are not in the R4 Patient compartment
    assert not {"Practitioner", "PractitionerRole", "Organization", "Location"} & set(PATIENT_COMPARTMENT)


@pytest.mark.parametrize(
    ("rtype", "rid", "content", "expected"),
    [
        ("Patient", "p1", {}, True),
        ("Patient", "p2", {"link": [{"other": {"reference": "Patient/p1"}}]}, False),
        ("Encounter", "e1", {"subject": {"reference": "Patient/p1"}}, True),
        ("Encounter", "e1", {"subject": {"reference": "http://x.org/fhir/Patient/p1"}}, True),
        ("Encounter", "e1", {"subject": {"reference": "Patient/p2"}}, False),
        ("Encounter", "e1", {"subject": {"reference": "Group/p1"}}, False),
        ("Encounter", "e1", {"subject": "Patient/p1"}, False),  # not a Reference: ignored, never a crash
        ("ChargeItem", "c1", {"subject": {"reference": "Patient/p1"}}, True),
        ("Coverage", "v1", {"beneficiary": {"reference": "Patient/p1"}}, True),
        ("Claim", "k1", {"patient": {"reference": "Patient/p1"}}, True),
        ("Practitioner", "p1", {}, False),
        ("Location", "l1", {"partOf": {"reference": "Patient/p1"}}, False),
    ],
)
def test_in_patient_compartment(rtype: str, rid: str, content: dict[str, Any], expected: bool) -> None:
    assert in_patient_compartment(rtype, rid, content, "p1") is expected


def test_decide_refuses_with_the_scope_that_would_do() -> None:
    with pytest.raises(FhirError) as caught:
        decide(policy("user/Practitioner.rs"), "Patient", "search")
    error = caught.value
    assert error.status == 403 and error.code == "forbidden"
    assert error.headers is not None
    assert 'error="insufficient_scope"' in error.headers["WWW-Authenticate"]
    assert 'scope="user/Patient.s"' in error.headers["WWW-Authenticate"]
    assert decide(policy("patient/*.rs", "p1"), "Encounter", "read").patient == "p1"
    assert decide(policy("patient/*.rs user/Encounter.rs", "p1"), "Encounter", "read").patient is None


def test_search_access_lists_the_visible_types_and_their_limits() -> None:
    assert search_access(policy("system/*.rs")).types == dict.fromkeys(FHIR_SERVED)
    mixed = search_access(policy("patient/*.rs user/Practitioner.rs", "p1"))
    assert mixed.compartment("Encounter") == "p1" and mixed.compartment("Practitioner") is None
    assert mixed.visible("Location") and mixed.compartment("Location") == "p1"
    narrow = search_access(policy("user/Encounter.rs"))
    assert narrow.visible("Encounter") and not narrow.visible("Patient")
    assert search_access(policy("user/Encounter.r")).types == {}  # read without search sees no search


@pytest.mark.parametrize(
    ("op", "needs"),
    [
        (Operation("POST", "Patient"), ("create",)),
        (Operation("PUT", "Patient", rid="p1"), ("update",)),
        (Operation("PUT", "Patient", query="identifier=s|v"), ("create", "update")),
        (Operation("DELETE", "Patient", rid="p1"), ("delete",)),
    ],
)
def test_interactions_of_writes(op: Operation, needs: tuple[str, ...]) -> None:
    assert interactions_of(op) == needs
