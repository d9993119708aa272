"""Validation of a FHIR resource written to ``/fhir`` before it is mapped (pure, no I/O).

The R4B model from ``fhir.resources`` checks structure and data types; :func:`check_codes` checks
the required value-set bindings that model does not (gender, status, class, our verification
status extension, the Basic code that names a canonical record type). A refusal is a
:class:`~hms_ach.fhir.outcomes.FhirError` naming the element: 400 for structure, 422 for codes.
"""

from __future__ import annotations

from typing import Any

from hms_ach.core.records import FHIR_WRITABLE
from hms_ach.fhir.outcomes import FhirError

#: The resource types the FHIR REST channel writes. ``Basic`` carries what FHIR R4 has no resource
#: for (its code says which canonical record type): a ``shift`` becomes a Shift record.
WRITE_TYPES = (*FHIR_WRITABLE, "Basic")
BASIC_TYPE_SYSTEM = "urn:hms-ach:code:basic-type"
BASIC_RECORDS = {"shift": "Shift"}

#: Required bindings fhir.resources does not enforce: resource type -> element -> allowed codes.
REQUIRED_CODES: dict[str, dict[str, frozenset[str]]] = {
    "Patient": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "Practitioner": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "Encounter": {
        "status": frozenset(
            {
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        )
    },
    "Location": {
        "status": frozenset({"active", "suspended", "inactive"}),
        "mode": frozenset({"instance", "kind"}),
    },
}
#: Encounter.class codes (v3 ActEncounterCode, the R4 extensible binding's codes we accept).
ENCOUNTER_CLASSES = frozenset(
    {"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"}
)
#: Qualification verification status (our extension) codes.
VERIFICATION_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-status"
VERIFICATION_CODES = frozenset({"verified", "unverified", "pending", "failed", "expired"})


def _where(prefix: str, loc: tuple[Any, ...]) -> str:
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


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
    import pydantic
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = _where(f"{where}{rtype}", tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FhirError(
            400,
            "structure" if first.get("type") != "missing" else "required",
            f"{loc}: {first.get('msg', 'invalid')}{more}",
            expression=loc,
        ) from None
    check_codes(rtype, resource, where)
    return rtype


def check_codes(rtype: str, resource: dict[str, Any], where: str = "") -> None:
    """The required value-set bindings (gender, status, class...) that the R4B models do not check."""
    for element, allowed in REQUIRED_CODES.get(rtype, {}).items():
        value = resource.get(element)
        if value is not None and value not in allowed:
            raise FhirError(
                422,
                "code-invalid",
                f"{rtype}.{element} {str(value)[:64]!r} is not one of {', '.join(sorted(allowed))}",
                expression=f"{where}{rtype}.{element}",
            )
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
                f"Encounter.class {str(cls.get('code'))[:32]!r} is not one of "
                f"{', '.join(sorted(ENCOUNTER_CLASSES))}",
                expression=f"{where}Encounter.class",
            )
    if rtype == "Practitioner":
        for i, qual in enumerate(resource.get("qualification") or []):
            for ext in qual.get("extension") or []:
                if ext.get("url") == VERIFICATION_EXT and ext.get("valueCode") not in VERIFICATION_CODES:
                    raise FhirError(
                        422,
                        "code-invalid",
                        f"verification status {str(ext.get('valueCode'))[:32]!r} is not one of "
                        f"{', '.join(sorted(VERIFICATION_CODES))}",
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
