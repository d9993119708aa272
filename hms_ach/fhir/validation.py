"""Validation of a FHIR resource written to ``/fhir`` before it is mapped (pure, no I/O).

Every resource a client writes (create, update, each transaction or batch entry) is checked against
R4 by :func:`hms_ach.mapping.fhir_instance.problems`: element names, cardinality (no array where R4
allows one value), JSON types, primitive formats, choice types, required elements and required
bindings at any depth. :func:`check_codes` adds our own rules (the Basic code that
names a canonical record type, Encounter.class codes, the verification status extension). A refusal
is a :class:`~hms_ach.fhir.outcomes.FhirError` naming the element in ``expression``: 400 for
structure, types and required elements, 422 for a code outside its binding.
"""

from __future__ import annotations

from typing import Any

from hms_ach.core.records import FHIR_WRITABLE
from hms_ach.fhir.outcomes import FhirError
from hms_ach.mapping.fhir_instance import problems

#: The resource types the FHIR REST channel writes. ``Basic`` carries what FHIR R4 has no resource
#: for (its code says which canonical record type): a ``shift`` becomes a Shift record.
WRITE_TYPES = (*FHIR_WRITABLE, "Basic")
BASIC_TYPE_SYSTEM = "urn:hms-ach:code:basic-type"
BASIC_RECORDS = {"shift": "Shift"}

#: Encounter.class codes (v3 ActEncounterCode, the R4 extensible binding's codes we accept).
ENCOUNTER_CLASSES = frozenset(
    {"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"}
)
#: Qualification verification status (our extension) codes.
VERIFICATION_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-status"
VERIFICATION_CODES = frozenset({"verified", "unverified", "pending", "failed", "expired"})


#: Problems counted per refused resource (the first is named; the rest are counted).
MAX_PROBLEMS = 20


def validate(resource: Any, where: str = "") -> str:
    """Check ``resource``; returns its type. FhirError 400 (structure) or 422 (codes) naming the element."""
    if not isinstance(resource, dict):
        raise FhirError(
            400, "structure", "the body must be a JSON object (a FHIR resource)", expression=where or None
        )
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(
            400, "required", "resourceType is missing", expression=f"{where}resourceType".lstrip(".")
        )
    if rtype not in WRITE_TYPES:
        raise FhirError(
            400,
            "not-supported",
            f"resource type {rtype[:64]!r} cannot be written here; writable: {', '.join(WRITE_TYPES)}",
            expression=f"{where}resourceType".lstrip("."),
        )
    found = problems(resource, limit=MAX_PROBLEMS)
    if found:
        first = found[0]
        loc = f"{where}{first.expression}"
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise FhirError(
            422 if first.code == "code-invalid" else 400,
            first.code,
            f"{loc}: {first.message}{more}",
            expression=loc,
        )
    check_codes(rtype, resource, where)
    return rtype


def check_codes(rtype: str, resource: dict[str, Any], where: str = "") -> None:
    """Our own code rules, beyond R4's required bindings (which the R4 check has enforced already)."""
    if rtype == "Basic":
        codes = [
            c.get("code")
            for c in (resource.get("code") or {}).get("coding") or []
            if c.get("system") == BASIC_TYPE_SYSTEM
        ]
        if not codes or codes[0] not in BASIC_RECORDS:
            raise FhirError(
                422,
                "code-invalid",
                f"Basic.code must be one of {', '.join(sorted(BASIC_RECORDS))} in {BASIC_TYPE_SYSTEM}",
                expression=f"{where}Basic.code",
            )
    if rtype == "Encounter":
        cls = resource.get("class") or {}
        if cls.get("system", "").endswith("v3-ActCode") and cls.get("code") not in ENCOUNTER_CLASSES:
            raise FhirError(
                422,
                "code-invalid",
                f"Encounter.class: not one of {', '.join(sorted(ENCOUNTER_CLASSES))}",
                expression=f"{where}Encounter.class",
            )
    if rtype == "Practitioner":
        for i, qual in enumerate(resource.get("qualification") or []):
            for ext in qual.get("extension") or []:
                if ext.get("url") == VERIFICATION_EXT and ext.get("valueCode") not in VERIFICATION_CODES:
                    raise FhirError(
                        422,
                        "code-invalid",
                        f"the verification status is not one of {', '.join(sorted(VERIFICATION_CODES))}",
                        expression=f"{where}Practitioner.qualification[{i}].extension",
                    )
            period = qual.get("period") or {}
            if period.get("start") and period.get("end") and str(period["end"]) < str(period["start"]):
                raise FhirError(
                    422,
                    "invariant",
                    "the period ends before it starts",
                    expression=f"{where}Practitioner.qualification[{i}].period",
                )
