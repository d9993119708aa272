"""Records that are not FHIR resources, as they appear in FHIR answers.

A shift (a canonical ``Shift`` record) is written over FHIR as a ``Basic`` resource with code
``shift`` (``mappings/resources/shift_fhir.yaml``); :func:`as_fhir` turns the stored shift back into
that ``Basic``, so that a write's answer (a single response or a transaction/batch-response entry)
holds a valid R4 resource, never ``resourceType: "Shift"``. Other records that are not served
(Timecard, Charge) have no FHIR form: :func:`as_fhir` gives None, and the answer carries the
entry's status without a resource.
"""

from __future__ import annotations

from typing import Any

import orjson

from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir.validation import BASIC_TYPE_SYSTEM

EXT = "urn:hms-ach:fhir:StructureDefinition/shift-"


def fhir_type(resource_type: str) -> str | None:
    """The FHIR type a record of ``resource_type`` is answered as (None: it has no FHIR form)."""
    if resource_type in FHIR_SERVED:
        return resource_type
    return "Basic" if resource_type == "Shift" else None


def _shift_as_basic(shift: dict[str, Any]) -> dict[str, Any]:
    basic: dict[str, Any] = {"resourceType": "Basic", "id": shift.get("id")}
    if isinstance(shift.get("meta"), dict):
        basic["meta"] = shift["meta"]
    extensions: list[dict[str, Any]] = []
    if shift.get("start") or shift.get("end"):
        period = {k: shift[k] for k in ("start", "end") if shift.get(k)}
        extensions.append({"url": f"{EXT}period", "valuePeriod": period})
    if shift.get("status"):
        extensions.append({"url": f"{EXT}status", "valueCode": shift["status"]})
    role = (shift.get("role") or {}).get("text") if isinstance(shift.get("role"), dict) else None
    if role:
        extensions.append({"url": f"{EXT}role", "valueString": role})
    dept = shift.get("department")
    dept_name = dept.get("display") if isinstance(dept, dict) else None
    if dept_name:
        extensions.append({"url": f"{EXT}department", "valueString": dept_name})
    if extensions:
        basic["extension"] = extensions
    if isinstance(shift.get("identifier"), list):
        basic["identifier"] = shift["identifier"]
    basic["code"] = {"coding": [{"system": BASIC_TYPE_SYSTEM, "code": "shift"}]}
    who = shift.get("practitioner")
    if isinstance(who, dict) and who.get("reference"):
        basic["subject"] = {"reference": who["reference"]}
    return basic


def as_fhir(resource_type: str, text: str | None) -> str | None:
    """The stored JSON ``text`` of a ``resource_type`` record as FHIR JSON (a served type as it is,
    a shift as its ``Basic``), or None when the record has no FHIR form."""
    if text is None:
        return None
    if resource_type in FHIR_SERVED:
        return text
    if resource_type == "Shift":
        return orjson.dumps(_shift_as_basic(orjson.loads(text))).decode()
    return None
