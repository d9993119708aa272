"""Claims: at discharge the charges of an encounter become one FHIR R4 ``Claim``.

:func:`claim_for_encounter` runs inside the discharge's own transaction (called by the change
listener in :mod:`hms_ach.outbound.events` on ``encounter.discharged``), so a committed discharge
always has its Claim and its ``claim.created`` event. The Claim is keyed on the encounter, so a
discharge sent twice, or cancelled and sent again, updates the same Claim.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, select

from hms_ach.core.records import RecordWrite
from hms_ach.store.models import RECORD_TABLES, SearchReference

CLAIM_SYSTEM = "urn:hms-ach:claim"
CPT = "http://www.ama-assn.org/go/cpt"
#: Encounter.class codes (v3 ActCode) billed on an institutional claim (837I); the others are professional (837P).
INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC"})
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def _referring(
    conn: Connection, resource_type: str, param: str, target_type: str, target_id: str
) -> list[str]:
    ref = SearchReference.__table__  # type: ignore[attr-defined]
    rows = (
        conn.execute(
            select(ref.c.resource_id)
            .distinct()
            .where(
                and_(
                    ref.c.resource_type == resource_type,
                    ref.c.param == param,
                    ref.c.target_type == target_type,
                    ref.c.target_id == target_id,
                )
            )
        )
        .scalars()
        .all()
    )
    return list(rows)


def _load(conn: Connection, resource_type: str, ids: list[str]) -> list[dict[str, Any]]:
    if not ids:
        return []
    table = RECORD_TABLES[resource_type].__table__  # type: ignore[attr-defined]
    rows = conn.execute(select(table.c.resource).where(and_(table.c.id.in_(ids), table.c.deleted.is_(False))))
    return [orjson.loads(r.resource) for r in rows]


def charges_of(conn: Connection, encounter_id: str) -> list[dict[str, Any]]:
    charges = _load(conn, "Charge", _referring(conn, "Charge", "encounter", "Encounter", encounter_id))
    return sorted(
        (c for c in charges if c.get("status", "billable") == "billable"),
        key=lambda c: (c.get("date", ""), c["id"]),
    )


def coverage_of(conn: Connection, patient_id: str) -> dict[str, Any] | None:
    covs = [
        c
        for c in _load(conn, "Coverage", _referring(conn, "Coverage", "beneficiary", "Patient", patient_id))
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


def claim_for_encounter(conn: Connection, encounter_id: str, message_id: int | None) -> str | None:
    """Make (or update) the Claim of a discharged encounter; returns its reference, None without charges."""
    from hms_ach.store.repository import Repository

    repo = Repository(conn)
    encounter = repo.get("Encounter", encounter_id)
    if encounter is None:
        return None
    charges = charges_of(conn, encounter_id)
    if not charges:
        return None
    subject = (encounter.get("subject") or {}).get("reference", "")
    coverage = coverage_of(conn, subject.split("/", 1)[1]) if subject.startswith("Patient/") else None
    content = build_claim(encounter, charges, coverage)
    rec = RecordWrite("claim", "Claim", CLAIM_SYSTEM, encounter_id, content, mode="replace")
    outcome = repo.upsert(rec, content, message_id)
    return outcome.reference if outcome else None
