"""The record vocabulary shared by every layer: which record types exist, and what a mapping produces.

* :data:`RECORD_TYPES` is the one table of canonical record types. Each row says whether the type is
  a FHIR R4 resource served under ``/fhir``, whether FHIR clients may write it, whether the
  ``fhir_push`` sink may mirror it, its table name and its search parameters. The store makes one
  table per row, the search index and the CapabilityStatement read the parameters from here, and the
  mapping loader accepts exactly these names. A new resource type is one row here, plus its mapping
  YAML.
* :class:`MappingResult` / :class:`RecordWrite` are the contract between the mapping engine
  (``mapping/``) and the store (``store/``): plain data, so the preview can show it and the golden
  tests can compare it. :func:`merge_content` is the one merge rule both use;
  :func:`merge_record` applies it by a write's mode, or a record type's own rule when one is
  installed (:data:`RECORD_MERGERS`: Practitioner survivorship, merged by source).

References between records of one message are written ``{"reference": "@alias"}`` and resolved by
the store to ``Type/id`` once the aliased record has its id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hms_ach.core.errors import MessageError

Mode = Literal["merge", "replace", "fill"]


@dataclass
class Lineage:
    """Where one produced value came from: ``Encounter.location[0].location <- PV1-3 (4W^412^B)``."""

    target: str
    source: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.target} <- {self.source}" + (f" ({self.value})" if self.value else "")


@dataclass
class RecordWrite:
    """Upsert one canonical record, keyed on its business identifier."""

    alias: str
    resource_type: str
    key_system: str | None
    key_value: str | None
    content: dict[str, Any]
    mode: Mode = "merge"
    create: bool = True
    lineage: list[Lineage] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.key_system}|{self.key_value}" if self.key_value else "(no key)"


@dataclass
class StoreAction:
    """A registered store operation beyond upserts, e.g. ``merge_patient``."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class MappingResult:
    mapping: str = ""
    records: list[RecordWrite] = field(default_factory=list)
    actions: list[StoreAction] = field(default_factory=list)
    #: failures of rules and records marked ``critical: false``: the message is stored without
    #: them and answered AA with an ERR of severity W per warning
    warnings: list[MessageError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "records": [
                {
                    "alias": r.alias,
                    "resourceType": r.resource_type,
                    "key": {"system": r.key_system, "value": r.key_value},
                    "mode": r.mode,
                    "create": r.create,
                    "content": r.content,
                }
                for r in self.records
            ],
            "actions": [{"name": a.name, "args": a.args} for a in self.actions],
        }


# ---------------------------------------------------------------------------- record types
#: A search parameter declaration: (type, FHIRPath-subset path[, reference target types]).
#: ``type`` is token, string, date or reference; ``|`` joins alternative paths.
ParamDecl = tuple[str, str] | tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True)
class RecordType:
    """One canonical record type: how it is stored, served, written, mirrored and searched."""

    name: str
    table: str
    """The store table of its current versions (history and index rows are shared tables)."""
    fhir: bool
    """A FHIR R4 resource, served under /fhir (read, vread, history, search)."""
    writable: bool
    """FHIR clients may create, update and delete it through a ``fhir_rest`` channel."""
    mirrored: bool
    """The ``fhir_push`` sink may mirror it to a remote FHIR server."""
    description: str
    params: dict[str, ParamDecl]
    """Search parameters (besides ``_id`` and ``_lastUpdated``, which every type has)."""
    custom_params: dict[str, str] = field(default_factory=dict)
    """Parameters of ``params`` that are not in the base R4 specification: name -> what it matches.
    The CapabilityStatement declares each with the canonical URL
    ``urn:hms-ach:fhir:SearchParameter/<Type>-<name>`` and this text."""
    patient_compartment: tuple[str, ...] = ()
    """How a record of this type belongs to the compartment of a Patient (FHIR R4
    CompartmentDefinition ``patient``): the reference parameters of ``params`` whose Patient target
    is that patient, or :data:`THE_PATIENT_ITSELF` for the Patient record. Empty: not in the Patient
    compartment (a token limited to one patient's compartment sees no record of this type)."""


#: In :attr:`RecordType.patient_compartment`: the record's own id is the patient's (Patient only).
THE_PATIENT_ITSELF = "_id"

_HUMAN_NAME = "name.family | name.given | name.prefix | name.suffix | name.text"

#: The one table of record types. A new resource type is one row here and its mapping YAML.
RECORD_TYPES: dict[str, RecordType] = {
    "Patient": RecordType(
        name="Patient",
        table="patient",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A patient (PID), FHIR R4 Patient."),
        patient_compartment=(THE_PATIENT_ITSELF,),
        params={
            "identifier": ("token", "identifier"),
            "name": ("string", _HUMAN_NAME),
            "family": ("string", "name.family"),
            "given": ("string", "name.given"),
            "birthdate": ("date", "birthDate"),
            "gender": ("token", "gender"),
        },
    ),
    "Encounter": RecordType(
        name="Encounter",
        table="encounter",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A visit (PV1/PV2), FHIR R4 Encounter."),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "status": ("token", "status"),
            "class": ("token", "class"),
            "date": ("date", "period"),
            "subject": ("reference", "subject", ("Patient", "Group")),
            "patient": ("reference", "subject", ("Patient",)),
            "location": ("reference", "location.location", ("Location",)),
            "participant": (
                "reference",
                "participant.individual",
                ("Practitioner", "PractitionerRole", "RelatedPerson"),
            ),
            "practitioner": ("reference", "participant.individual", ("Practitioner",)),
        },
    ),
    "Location": RecordType(
        name="Location",
        table="location",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A ward, room or bed (PV1-3, MFN), FHIR R4 Location."),
        params={
            "identifier": ("token", "identifier"),
            "name": ("string", "name | alias"),
            "status": ("token", "status"),
            "operational-status": ("token", "operationalStatus"),
            "type": ("token", "type"),
            "physical-type": ("token", "physicalType"),
            "partof": ("reference", "partOf", ("Location",)),
        },
    ),
    "Practitioner": RecordType(
        name="Practitioner",
        table="practitioner",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A staff member with credentials (MFN^M02, rosters), FHIR R4 Practitioner."),
        params={
            "identifier": ("token", "identifier"),
            "name": ("string", _HUMAN_NAME),
            "family": ("string", "name.family"),
            "given": ("string", "name.given"),
            "active": ("token", "active"),
            "gender": ("token", "gender"),
            "qualification-period": ("date", "qualification.period"),
        },
        custom_params={
            "qualification-period": (
                "Not in the base specification. A date search on Practitioner.qualification.period: matches "
                "a practitioner with a qualification (licence, certification) whose period meets the "
                "criterion, with the prefixes of a FHIR date search applied to the period as a range (an "
                "open end is unbounded). Example: qualification-period=gt2026-06-30 finds practitioners "
                "with a qualification still valid after that day."
            ),
        },
    ),
    "PractitionerRole": RecordType(
        name="PractitionerRole",
        table="practitioner_role",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A staff member's role in a department, FHIR R4 PractitionerRole."),
        params={
            "identifier": ("token", "identifier"),
            "practitioner": ("reference", "practitioner", ("Practitioner",)),
            "organization": ("reference", "organization", ("Organization",)),
            "location": ("reference", "location", ("Location",)),
            "role": ("token", "code"),
            "specialty": ("token", "specialty"),
            "date": ("date", "period"),
            "active": ("token", "active"),
        },
    ),
    "Organization": RecordType(
        name="Organization",
        table="organization",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A payer, department or facility, FHIR R4 Organization."),
        params={
            "identifier": ("token", "identifier"),
            "name": ("string", "name | alias"),
            "active": ("token", "active"),
        },
    ),
    "Shift": RecordType(
        name="Shift",
        table="shift",
        fhir=False,
        writable=False,
        mirrored=False,
        description=(
            "A planned or worked shift (not a FHIR resource). Content: identifier[], practitioner {reference}, role {coding, text}, department {reference or display}, location {reference}, start, end (dateTime with offset), status (planned | confirmed | swapped | cancelled), swapRequest {requestedBy, replacement, status: requested | approved | rejected, decidedAt}."
        ),
        params={
            "identifier": ("token", "identifier"),
            "practitioner": ("reference", "practitioner", ("Practitioner",)),
            "date": ("date", "start"),
            # custom: the end of the shift, so that an overlap check reads only the shifts around its window
            "end": ("date", "end"),
            "status": ("token", "status"),
        },
    ),
    "Timecard": RecordType(
        name="Timecard",
        table="timecard",
        fhir=False,
        writable=False,
        mirrored=False,
        description=(
            "A worked period from clock-in/clock-out events (not a FHIR resource). Content: identifier[], practitioner {reference}, department, clockIn, clockOut (dateTime with offset), workedMinutes, overtimeMinutes (by the configured overtime rule), shift {reference}."
        ),
        params={
            "identifier": ("token", "identifier"),
            "practitioner": ("reference", "practitioner", ("Practitioner",)),
            "date": ("date", "clockIn"),
        },
    ),
    "Charge": RecordType(
        name="Charge",
        table="charge",
        fhir=False,
        writable=False,
        mirrored=False,
        description=(
            "One billable service from a DFT^P03 FT1 segment (the 837's input; not a FHIR resource). Content: identifier[], encounter {reference}, patient {reference}, code {system, code, display} (CPT/HCPCS), units, amount (extended, >= 0), date, performer {reference, npi}, diagnosis [codes], insurance {payerId, payerName, memberId, groupNumber, subscriber {...}} from IN1."
        ),
        params={
            "identifier": ("token", "identifier"),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "patient": ("reference", "patient", ("Patient",)),
        },
    ),
    "ChargeItem": RecordType(
        name="ChargeItem",
        table="charge_item",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "A FHIR R4 ChargeItem from a DFT^P03 FT1 segment (the same charge as the Charge record, "
            "served to FHIR clients); served read-only."
        ),
        patient_compartment=("subject",),
        params={
            "identifier": ("token", "identifier"),
            "patient": ("reference", "subject", ("Patient",)),
            "subject": ("reference", "subject", ("Patient", "Group")),
            "context": ("reference", "context", ("Encounter", "EpisodeOfCare")),
            "encounter": ("reference", "context", ("Encounter",)),
            "code": ("token", "code"),
            "entered-date": ("date", "enteredDate"),
            "occurrence": ("date", "occurrenceDateTime | occurrencePeriod"),
            "performer-actor": ("reference", "performer.actor"),
        },
        custom_params={
            "encounter": (
                "Not in the R4 specification, where the visit of a ChargeItem is searched by `context` "
                "(R5 renamed it `encounter`). A reference search on ChargeItem.context, Encounter only: "
                "encounter=Encounter/123 finds the charges of that visit."
            ),
        },
    ),
    "Coverage": RecordType(
        name="Coverage",
        table="coverage",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "A FHIR R4 Coverage from an IN1 segment (payer, member id, subscriber relationship); served read-only."
        ),
        patient_compartment=("beneficiary",),
        params={
            "identifier": ("token", "identifier"),
            "beneficiary": ("reference", "beneficiary", ("Patient",)),
            "patient": ("reference", "beneficiary", ("Patient",)),
            "status": ("token", "status"),
        },
    ),
    "Claim": RecordType(
        name="Claim",
        table="claim",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "A FHIR R4 Claim made at discharge from the charges of one encounter (billing/claims.py); served read-only."
        ),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "status": ("token", "status"),
            "use": ("token", "use"),
            "created": ("date", "created"),
            "patient": ("reference", "patient", ("Patient",)),
            "encounter": ("reference", "item.encounter", ("Encounter",)),
            "insurer": ("reference", "insurer", ("Organization",)),
            "provider": ("reference", "provider", ("Practitioner", "PractitionerRole", "Organization")),
        },
    ),
    "AllergyIntolerance": RecordType(
        name="AllergyIntolerance",
        table="allergy_intolerance",
        fhir=True,
        writable=False,
        mirrored=True,
        description=("A FHIR R4 AllergyIntolerance from an ADT AL1 segment; served read-only."),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "patient": ("reference", "patient", ("Patient",)),
            "code": ("token", "code | reaction.substance"),
            "clinical-status": ("token", "clinicalStatus"),
            "verification-status": ("token", "verificationStatus"),
            "type": ("token", "type"),
            "category": ("token", "category"),
            "criticality": ("token", "criticality"),
            "onset": ("date", "reaction.onset"),
            "date": ("date", "recordedDate"),
        },
    ),
    "Condition": RecordType(
        name="Condition",
        table="condition",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "A FHIR R4 Condition (category encounter-diagnosis) from an ADT DG1 segment, linked from "
            "Encounter.diagnosis; served read-only."
        ),
        patient_compartment=("patient", "asserter"),
        params={
            "identifier": ("token", "identifier"),
            "patient": ("reference", "subject", ("Patient",)),
            "subject": ("reference", "subject", ("Patient", "Group")),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "asserter": (
                "reference",
                "asserter",
                ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson"),
            ),
            "code": ("token", "code"),
            "category": ("token", "category"),
            "clinical-status": ("token", "clinicalStatus"),
            "verification-status": ("token", "verificationStatus"),
            "onset-date": ("date", "onsetDateTime | onsetPeriod"),
            "recorded-date": ("date", "recordedDate"),
        },
    ),
    "RelatedPerson": RecordType(
        name="RelatedPerson",
        table="related_person",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "A FHIR R4 RelatedPerson (next of kin, contact) from an ADT NK1 segment; served read-only."
        ),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "patient": ("reference", "patient", ("Patient",)),
            "name": ("string", _HUMAN_NAME),
            "relationship": ("token", "relationship"),
            "gender": ("token", "gender"),
            "birthdate": ("date", "birthDate"),
            "active": ("token", "active"),
        },
    ),
    "Observation": RecordType(
        name="Observation",
        table="observation",
        fhir=True,
        writable=False,
        mirrored=True,
        description=("A FHIR R4 Observation from an OBX segment of an ADT message; served read-only."),
        patient_compartment=("subject",),
        params={
            "identifier": ("token", "identifier"),
            "patient": ("reference", "subject", ("Patient",)),
            "subject": ("reference", "subject", ("Patient", "Group", "Device", "Location")),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "code": ("token", "code"),
            "category": ("token", "category"),
            "status": ("token", "status"),
            "date": ("date", "effectiveDateTime | effectivePeriod"),
            "value-concept": ("token", "valueCodeableConcept"),
            "value-string": ("string", "valueString"),
            "value-date": ("date", "valueDateTime | valuePeriod"),
        },
    ),
    "Task": RecordType(
        name="Task",
        table="task",
        fhir=True,
        writable=True,
        mirrored=True,
        description=(
            "A review case or complaint (docs/review-cases.md), FHIR R4 Task: status and businessStatus "
            "follow its workflow file (mappings/workflows/), owner is the assigned reviewer."
        ),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "status": ("token", "status"),
            "business-status": ("token", "businessStatus"),
            "intent": ("token", "intent"),
            "owner": ("reference", "owner"),
            "requester": ("reference", "requester"),
            "performer": ("token", "performerType"),
            "focus": ("reference", "focus"),
            "subject": ("reference", "for"),
            "patient": ("reference", "for", ("Patient",)),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "code": ("token", "code"),
            "priority": ("token", "priority"),
            "authored-on": ("date", "authoredOn"),
            "modified": ("date", "lastModified"),
            "period": ("date", "executionPeriod"),
            "part-of": ("reference", "partOf", ("Task",)),
            "based-on": ("reference", "basedOn"),
        },
    ),
    "Questionnaire": RecordType(
        name="Questionnaire",
        table="questionnaire",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("A form that a case's findings answer (a workflow's `form:`), FHIR R4 Questionnaire."),
        params={
            "identifier": ("token", "identifier"),
            "url": ("token", "url"),
            "name": ("string", "name"),
            "title": ("string", "title"),
            "status": ("token", "status"),
            "version": ("token", "version"),
            "date": ("date", "date"),
            "code": ("token", "code | item.code"),
            "subject-type": ("token", "subjectType"),
        },
    ),
    "QuestionnaireResponse": RecordType(
        name="QuestionnaireResponse",
        table="questionnaire_response",
        fhir=True,
        writable=True,
        mirrored=True,
        description=("The findings of a case, answering its form, FHIR R4 QuestionnaireResponse."),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "questionnaire": ("reference", "questionnaire", ("Questionnaire",)),
            "subject": ("reference", "subject"),
            "patient": ("reference", "subject", ("Patient",)),
            "author": ("reference", "author"),
            "status": ("token", "status"),
            "authored": ("date", "authored"),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "based-on": ("reference", "basedOn"),
            "part-of": ("reference", "partOf"),
            "source": ("reference", "source"),
        },
    ),
    "Provenance": RecordType(
        name="Provenance",
        table="provenance",
        fhir=True,
        writable=False,
        mirrored=True,
        description=(
            "The electronic signature of a case's findings (docs/review-cases.md), FHIR R4 Provenance "
            "with a JWS in signature.data; written by POST /api/v1/review/{caseId}/sign only, served "
            "read-only."
        ),
        patient_compartment=("patient",),
        params={
            "target": ("reference", "target"),
            "agent": ("reference", "agent.who"),
            "patient": ("reference", "target", ("Patient",)),
            "recorded": ("date", "recorded"),
            "signature-type": ("token", "signature.type"),
            "entity": ("reference", "entity.what"),
        },
    ),
    "Communication": RecordType(
        name="Communication",
        table="communication",
        fhir=True,
        writable=True,
        mirrored=True,
        description=(
            "A comment on a case (docs/review-cases.md), FHIR R4 Communication: about the Task, partOf "
            "the comment it replies to, sender the commenting Practitioner."
        ),
        patient_compartment=("patient",),
        params={
            "identifier": ("token", "identifier"),
            "about": ("reference", "about"),
            "part-of": ("reference", "partOf"),
            "sender": ("reference", "sender"),
            "recipient": ("reference", "recipient"),
            "sent": ("date", "sent"),
            "status": ("token", "status"),
            "subject": ("reference", "subject"),
            "patient": ("reference", "subject", ("Patient",)),
            "encounter": ("reference", "encounter", ("Encounter",)),
            "category": ("token", "category"),
        },
    ),
    "Group": RecordType(
        name="Group",
        table="fhir_group",
        fhir=True,
        writable=True,
        mirrored=True,
        description=(
            "A FHIR R4 Group (a cohort of patients, a care team's panel) written through FHIR; its "
            "Patient members are what Group/[id]/$export exports."
        ),
        patient_compartment=("member",),
        params={
            "identifier": ("token", "identifier"),
            "type": ("token", "type"),
            "actual": ("token", "actual"),
            "code": ("token", "code"),
            "member": (
                "reference",
                "member.entity",
                ("Patient", "Practitioner", "PractitionerRole", "Group"),
            ),
            "characteristic": ("token", "characteristic.code"),
        },
    ),
}

#: Record types served under /fhir, in table order.
FHIR_SERVED: tuple[str, ...] = tuple(n for n, r in RECORD_TYPES.items() if r.fhir)
#: Record types FHIR clients may write.
FHIR_WRITABLE: tuple[str, ...] = tuple(n for n, r in RECORD_TYPES.items() if r.writable)
#: Record types in the Patient compartment: type -> how a record belongs to it (see
#: :attr:`RecordType.patient_compartment`).
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    n: r.patient_compartment for n, r in RECORD_TYPES.items() if r.patient_compartment
}
#: Record types the fhir_push sink may mirror.
MIRRORED: tuple[str, ...] = tuple(n for n, r in RECORD_TYPES.items() if r.mirrored)


# ---------------------------------------------------------------------------- the merge rule

#: Values a mapping may write that are instructions to the merge (:func:`merge_content`), never
#: stored: (FHIR type, element) -> codes. The mapping check lets them pass a required binding.
#: ``EncounterLocation.status`` ``cancelled``: a pending transfer withdrawn (A26), the entry removed.
MERGE_DIRECTIVES: dict[tuple[str, str], frozenset[str]] = {
    ("EncounterLocation", "status"): frozenset({"cancelled"})
}


def merge_content(old: dict[str, Any], new: dict[str, Any], history: bool = False) -> dict[str, Any]:
    """Deep-merge ``new`` into ``old``: objects merge, lists and scalars replace, ``None`` deletes.

    ``history`` (a message updating a stored record): a ``location`` list of location entries
    (Encounter.location) is merged by :func:`merge_location_history` instead of replaced."""
    out = dict(old)
    for k, v in new.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_content(out[k], v)
        elif history and k == "location" and _is_history(v) and (k not in out or _is_history(out[k])):
            out[k] = merge_location_history(out.get(k) or [], v)
        else:
            out[k] = v
    return out


def _is_history(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, dict) and isinstance(i.get("location"), dict) for i in value)
    )


def _location_ref(item: dict[str, Any]) -> Any:
    return item["location"].get("reference")


def merge_location_history(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Encounter.location with its history: the message's entries first (the current one, ``active``,
    at [0]), then the stored entries it does not name.

    * An entry the message names again keeps its stored ``period.start`` (the stay began then); an
      ``active`` one loses its ``period.end`` (a cancelled discharge).
    * A stored ``active`` entry the message does not name is ``completed``: the patient left it.
    * A ``completed`` entry without ``period.end`` ends when the current entry started.
    * An entry with status ``cancelled`` (a pending transfer withdrawn, A26) removes that location:
      it never was the patient's, so no trace of it is kept.
    """
    by_ref = {_location_ref(i): i for i in old}
    current_start = next(
        ((i.get("period") or {}).get("start") for i in new if i.get("status") == "active"), None
    )
    named = {_location_ref(i) for i in new}
    out: list[dict[str, Any]] = []

    def ended(item: dict[str, Any]) -> dict[str, Any]:
        period = item.get("period") or {}
        if current_start and not period.get("end"):
            item = {**item, "period": {**period, "end": current_start}}
        return item

    for item in new:
        if item.get("status") == "cancelled":
            continue
        prior = by_ref.get(_location_ref(item))
        if prior is not None:
            start = (prior.get("period") or {}).get("start")
            item = merge_content(prior, item)
            if start:
                item["period"] = {**(item.get("period") or {}), "start": start}
            if item.get("status") == "active" and "end" in (item.get("period") or {}):
                item["period"] = {k: v for k, v in item["period"].items() if k != "end"}
        out.append(ended(item) if item.get("status") == "completed" else item)
    for item in old:
        if _location_ref(item) in named:
            continue
        if item.get("status") == "active":
            item = ended({**item, "status": "completed"})
        out.append(item)
    return out


# ---------------------------------------------------------------------------- per-type merges (survivorship)


@dataclass(frozen=True)
class MergeInput:
    """One write of a record that a type's own merge rule settles (:data:`RECORD_MERGERS`)."""

    resource_type: str
    old: dict[str, Any]
    """The stored content (``{}`` for a new record)."""
    new: dict[str, Any]
    """What the source sends."""
    source: str
    """The source of the write: the inbound channel's name (``""`` when not known)."""
    mode: Mode


#: A record type's own merge rule: the content to store for one write.
RecordMerger = Callable[[MergeInput], dict[str, Any]]
#: A record type's match policy: the ``(system, value)`` identifiers of a content that name the
#: same record, in the order they are tried, when its business key finds none.
RecordMatcher = Callable[[dict[str, Any]], list[tuple[str, str]]]

#: Record types whose writes are merged by their own rule instead of :func:`merge_by_mode`, and
#: found by their own match policy. Empty unless the composition root installs one
#: (:func:`hms_ach.workforce.survivorship.install` for Practitioner); a type not here merges as
#: its RecordWrite's ``mode`` says.
RECORD_MERGERS: dict[str, RecordMerger] = {}
RECORD_MATCHERS: dict[str, RecordMatcher] = {}
#: What a type's own merge rule reads besides its :class:`MergeInput` (its settings), by type: a
#: function giving the object in use now, replaced (never changed in place) when the settings change.
#: The store remembers writes that changed nothing per merge rule and this object
#: (:func:`merge_rule`), so that a new rule or new settings are never answered from that memory.
MERGE_SETTINGS: dict[str, Callable[[], object]] = {}


def merge_rule(resource_type: str) -> tuple[object, object]:
    """The merge a write of ``resource_type`` gets now: (its own rule or None, that rule's settings
    object or None). Two writes with the same input and the same (identical) pair merge the same."""
    settings = MERGE_SETTINGS.get(resource_type)
    return RECORD_MERGERS.get(resource_type), None if settings is None else settings()


def merge_by_mode(
    mode: Mode, old: dict[str, Any], new: dict[str, Any], history: bool = False
) -> dict[str, Any]:
    """The merge every record type gets by default: ``replace`` takes ``new`` whole, ``fill`` keeps
    what is stored and fills the gaps, ``merge`` deep-merges ``new`` into ``old``
    (:func:`merge_content`; ``history``: Encounter.location keeps its history)."""
    if mode == "replace":
        return merge_content({}, new)
    if mode == "fill":
        return merge_content(new, old)
    return merge_content(old, new, history=history)


def merge_record(
    resource_type: str,
    mode: Mode,
    old: dict[str, Any],
    new: dict[str, Any],
    source: str = "",
    history: bool = False,
) -> dict[str, Any]:
    """The content to store when ``source`` writes ``new`` over ``old``: the type's own rule
    (:data:`RECORD_MERGERS`) when it has one, else :func:`merge_by_mode`."""
    merger = RECORD_MERGERS.get(resource_type)
    if merger is None:
        return merge_by_mode(mode, old, new, history)
    return merger(MergeInput(resource_type, old, new, source, mode))
