"""Claims: at discharge the charges of an encounter become one FHIR R4 ``Claim``.

:func:`on_change` is a change listener (see :mod:`hms_ach.store.changes`; subscribed by
:func:`hms_ach.app.wiring.wire_listeners`, after the outbox's): on ``encounter.discharged`` it runs
:func:`claim_for_encounter` inside the discharge's own transaction, so a committed discharge always
has its Claim and its ``claim.created`` event. The Claim is keyed on the encounter, so a
discharge sent twice, or cancelled and sent again, updates the same Claim.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hms_ach.core.records import RecordWrite
from hms_ach.outbound.events import encounter_events
from hms_ach.store import record_reads
from hms_ach.store.changes import Change
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository

CLAIM_SYSTEM = "urn:hms-ach:claim"
CPT = "http://www.ama-assn.org/go/cpt"
#: Encounter.class codes (v3 ActCode) billed on an institutional claim (837I); the others are professional (837P).
INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC"})
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def _referring_records(
    tx: Tx, resource_type: str, param: str, target_type: str, target_id: str
) -> list[dict[str, Any]]:
    ids = record_reads.referring(tx, resource_type, param, target_type, target_id)
    return record_reads.current(tx, resource_type, ids)


def charges_of(tx: Tx, encounter_id: str) -> list[dict[str, Any]]:
    charges = _referring_records(tx, "Charge", "encounter", "Encounter", encounter_id)
    return sorted(
        (c for c in charges if c.get("status", "billable") == "billable"),
        key=lambda c: (c.get("date", ""), c["id"]),
    )


def coverage_of(tx: Tx, patient_id: str) -> dict[str, Any] | None:
    covs = [
        c
        for c in _referring_records(tx, "Coverage", "beneficiary", "Patient", patient_id)
        if c.get("status") == "active"
    ]
    covs.sort(key=lambda c: (c.get("order", 99), c.get("meta", {}).get("lastUpdated", "")))
    return covs[0] if covs else None


def _is_inpatient(encounter: dict[str, Any]) -> bool:
    """True when the encounter's class (from PV1-2) is an inpatient one."""
    klass = encounter.get("class") or {}
    return isinstance(klass, dict) and klass.get("code") in INPATIENT_CLASSES


def build_claim(
    encounter: dict[str, Any], charges: list[dict[str, Any]], coverage: dict[str, Any] | None
) -> dict[str, Any]:
    """The Claim content for an encounter's charges (pure)."""
    diagnoses: list[str] = []
    for charge in charges:
        for dx in charge.get("diagnosis", []):
            if dx.get("code") and dx["code"] not in diagnoses:
                diagnoses.append(dx["code"])
    performers: list[str] = []
    items = []
    for seq, charge in enumerate(charges, start=1):
        performer = (charge.get("performer") or {}).get("reference")
        if performer and performer not in performers:
            performers.append(performer)
        amount = float(charge.get("amount", 0))
        item: dict[str, Any] = {
            "sequence": seq,
            "productOrService": {
                "coding": [
                    {
                        "system": CPT,
                        "code": charge.get("code", {}).get("code"),
                        "display": charge.get("code", {}).get("display"),
                    }
                ]
            },
            "servicedDate": str(charge.get("date", ""))[:10],
            "quantity": {"value": charge.get("units", 1)},
            "net": {"value": amount, "currency": "USD"},
            "encounter": [{"reference": f"Encounter/{encounter['id']}"}],
            "diagnosisSequence": [
                diagnoses.index(dx["code"]) + 1
                for dx in charge.get("diagnosis", [])
                if dx.get("code") in diagnoses
            ]
            or ([1] if diagnoses else []),
        }
        if performer:
            item["careTeamSequence"] = [performers.index(performer) + 1]
        items.append({k: v for k, v in item.items() if v not in (None, [], "")})
    total = round(sum(float(c.get("amount", 0)) for c in charges), 2)
    claim: dict[str, Any] = {
        "identifier": [{"system": CLAIM_SYSTEM, "value": encounter["id"]}],
        "status": "active",
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                    "code": "institutional" if _is_inpatient(encounter) else "professional",
                }
            ]
        },
        "use": "claim",
        "patient": encounter.get("subject"),
        "created": datetime.now(UTC).date().isoformat(),
        "provider": {"reference": performers[0]}
        if performers
        else {"display": "billing provider (configured)"},
        "priority": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]
        },
        "careTeam": [
            {"sequence": i, "provider": {"reference": ref}} for i, ref in enumerate(performers, start=1)
        ],
        "diagnosis": [
            {"sequence": i, "diagnosisCodeableConcept": {"coding": [{"system": ICD10, "code": code}]}}
            for i, code in enumerate(diagnoses, start=1)
        ],
        "item": items,
        "total": {"value": total, "currency": "USD"},
    }
    if coverage is not None:
        claim["insurance"] = [
            {"sequence": 1, "focal": True, "coverage": {"reference": f"Coverage/{coverage['id']}"}}
        ]
        payor = (coverage.get("payor") or [{}])[0]
        claim["insurer"] = {k: v for k, v in payor.items() if k in ("identifier", "display")}
    return {k: v for k, v in claim.items() if v not in (None, [])}


def claim_for_encounter(tx: Tx, encounter_id: str, message_id: int | None) -> str | None:
    """Make (or update) the Claim of a discharged encounter; returns its reference, None without charges."""
    charges = charges_of(tx, encounter_id)  # first: most discharges have none, and then that is all
    if not charges:
        return None
    repo = Repository(tx)
    encounter = repo.get("Encounter", encounter_id)
    if encounter is None:
        return None
    subject = (encounter.get("subject") or {}).get("reference", "")
    coverage = coverage_of(tx, subject.split("/", 1)[1]) if subject.startswith("Patient/") else None
    content = build_claim(encounter, charges, coverage)
    rec = RecordWrite("claim", "Claim", CLAIM_SYSTEM, encounter_id, content, mode="replace")
    outcome = repo.upsert(rec, content, message_id)
    return outcome.reference if outcome else None


def on_change(tx: Tx, change: Change) -> None:
    """Change listener: a discharged encounter (``encounter.discharged``) gets its Claim, in the
    discharge's own transaction."""
    if change.resource_type == "Encounter" and "encounter.discharged" in encounter_events(change):
        claim_for_encounter(tx, change.id, change.message_id)
