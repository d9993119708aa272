"""Complaints (PROTECTION): a complaint is a case of the ``complaint`` workflow, routed by its category.

A complaint logged (``POST /api/v1/complaints``, :mod:`hms_ach.cases.complaints_api`) becomes, in one
writer transaction:

* the complainant's record: a RelatedPerson of the patient the complaint is about, or a Patient of
  their own when it names none (RelatedPerson.patient is required), keyed on the complaint's id in
  :data:`COMPLAINANT_SYSTEM`, with their name and contact points (the preferred one ranked 1). It is
  a record like any other: versioned, in the audit chain with the caller, read over FHIR with an
  access record. Its name and contacts appear nowhere else: not in the Task, the events or the log;
* a Task of the workflow (the same shape as a review case, :func:`hms_ach.cases.opening.task_json`) whose
  ``requester`` is that record, whose department comes from the workflow's ``routing:`` (category ->
  department, with a default) and whose owner is the next available holder of the assignment role
  (``complaints-officer``) in that department (:mod:`hms_ach.cases.assignment`), or nobody (queued);
  its priority is the request's, else the category's, else routine, and its due time the SLA of the
  initial state;
* the events ``case.created`` and ``case.assigned`` / ``case.unassigned`` (as every case), then
  ``complaint.logged``, ``complaint.routed`` and ``complaint.acknowledged``; the notify sink sends the
  acknowledgement to the complainant (recipient rule ``requester``).

Resolving it (:func:`resolve_complaint`) moves the Task through the workflow to its resolved state
with :func:`hms_ach.cases.transitions.move` (through ``investigating`` when it is still ``logged``),
stores the resolution as a QuestionnaireResponse of the workflow's form (``complaint-resolution``:
items ``resolution`` and ``upheld``) referenced from ``Task.output``, and announces
``complaint.resolved``, whose notice the notify sink sends to the complainant.
"""

from __future__ import annotations

import copy
import uuid
from collections import deque
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, model_validator

from hms_ach.cases.assignment import Choice, candidates, choose
from hms_ach.cases.opening import CaseIn, announce_opened, case_view, task_json
from hms_ach.cases.transitions import (
    DUE_EXT,
    announce,
    case_id_of,
    escalation_states,
    event_facts,
    move,
    write_case,
)
from hms_ach.cases.workflow import CASE_SYSTEM, Workflow, case_type_of, state_of
from hms_ach.core.records import RecordWrite
from hms_ach.mapping.spec import WorkflowRouting
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.workforce.rules import DEPARTMENT_EXT, ext, iso

#: The case type (workflow) of a complaint.
COMPLAINT = "complaint"
#: RelatedPerson/Patient.identifier system of a complainant: the complaint's id.
COMPLAINANT_SYSTEM = "urn:hms-ach:id:complainant"
#: QuestionnaireResponse.identifier system of a complaint's resolution: the complaint's id.
RESOLUTION_SYSTEM = "urn:hms-ach:id:complaint-resolution"
#: Task.extension: the complaint's category (a code of the workflow's routing).
CATEGORY_EXT = "urn:hms-ach:fhir:StructureDefinition/complaint-category"
#: QuestionnaireResponse.extension: the case (Task) the response belongs to.
CASE_EXT = "urn:hms-ach:fhir:StructureDefinition/case"
#: The state a resolved complaint is in.
RESOLVED = "resolved"

Priority = Literal["routine", "urgent", "asap", "stat"]
_EMAIL = r"^[^@\s<>\"(),;:]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63}$"
_PHONE = r"^\+?[0-9][0-9 ().-]{4,30}$"


class Complainant(BaseModel):
    """Who complains, and how to reach them (at least one contact)."""

    name: str = Field(min_length=1, max_length=200, description="Their name, as they give it")
    email: str | None = Field(None, max_length=254, pattern=_EMAIL, description="E-mail address")
    phone: str | None = Field(None, pattern=_PHONE, description="Phone number, e.g. +44 20 7946 0000")
    preferred: Literal["email", "sms"] | None = Field(
        None, description="How they want to be told (default: email when given, else sms)"
    )

    @model_validator(mode="after")
    def _reachable(self) -> Complainant:
        if self.email is None and self.phone is None:
            raise ValueError("a complainant needs an email or a phone to be answered")
        if self.preferred == "email" and self.email is None:
            raise ValueError("preferred is email but no email is given")
        if self.preferred == "sms" and self.phone is None:
            raise ValueError("preferred is sms but no phone is given")
        return self

    def channel(self) -> str:
        """The contact system they prefer: email or sms."""
        return self.preferred or ("email" if self.email else "sms")


class ComplaintIn(BaseModel):
    """The body of ``POST /api/v1/complaints``."""

    category: str = Field(min_length=1, max_length=64, description="A category of the workflow's routing")
    description: str = Field(min_length=1, max_length=4000, description="What happened (Task.description)")
    complainant: Complainant = Field(description="Who complains and how to reach them")
    patient: str | None = Field(
        None, pattern=r"^Patient/[A-Za-z0-9\-.]{1,64}$", description="The patient it is about (Patient/id)"
    )
    occurred_at: datetime | None = Field(None, description="When it happened (a dateTime with offset)")
    priority: Priority | None = Field(
        None, description="Task.priority; default: the category's, else routine"
    )
    complaint_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9\-._]+$",
        description="Your id of the complaint; sent again, the stored complaint is answered (200)",
    )

    @model_validator(mode="after")
    def _aware(self) -> ComplaintIn:
        if self.occurred_at is not None and self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at needs a UTC offset (Z or +hh:mm)")
        return self


class ResolutionIn(BaseModel):
    """The body of ``POST /api/v1/complaints/{id}/resolve``."""

    resolution: str = Field(min_length=1, max_length=4000, description="The outcome, as recorded")
    upheld: bool = Field(description="Whether the complaint was found justified")


class ComplaintRefused(Exception):
    """A complaint request the data refuses: ``reason`` is ``unknown-category``, ``unknown-patient``
    or ``taken`` (the complaint id names a case of another type)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------- routing
def routing_of(wf: Workflow) -> WorkflowRouting:
    """The workflow's routing; a workflow without one routes nothing."""
    if wf.spec.routing is None:
        raise ComplaintRefused("unknown-category", f"workflow {wf.name!r} has no routing: section")
    return wf.spec.routing


def route(wf: Workflow, category: str, priority: str | None) -> tuple[str, str]:
    """(department, priority) of a new complaint of ``category``; ComplaintRefused when unknown."""
    routing = routing_of(wf)
    found = routing.category(category)
    if found is None:
        codes = ", ".join(c.code for c in routing.categories)
        raise ComplaintRefused(
            "unknown-category", f"unknown category {category[:64]!r}: expected one of {codes}"
        )
    return found.department or routing.default_department, priority or found.priority or "routine"


# ---------------------------------------------------------------------------- records
def complainant_record(complaint: ComplaintIn, complaint_id: str) -> tuple[str, dict[str, Any]]:
    """(record type, content) of the complainant: a RelatedPerson of the patient, else a Patient."""
    person = complaint.complainant
    preferred = person.channel()
    telecom: list[dict[str, Any]] = []
    if person.email:
        telecom.append({"system": "email", "value": person.email})
    if person.phone:
        telecom.append({"system": "sms" if preferred == "sms" else "phone", "value": person.phone})
    for point in telecom:
        if point["system"] == preferred:
            point["rank"] = 1
    content: dict[str, Any] = {
        "identifier": [{"system": COMPLAINANT_SYSTEM, "value": complaint_id}],
        "active": True,
        "name": [{"text": person.name}],
        "telecom": telecom,
    }
    if complaint.patient:
        content["patient"] = {"reference": complaint.patient}
        return "RelatedPerson", content
    return "Patient", content


def _upsert(tx: Tx, rtype: str, system: str, value: str, content: dict[str, Any], message_id: int) -> str:
    rec = RecordWrite(rtype.lower(), rtype, system, value, content, mode="replace")
    out = Repository(tx).upsert(rec, content, message_id)
    if out is None:
        raise RuntimeError(f"the {rtype} was not written")
    return out.reference


def complaint_task(
    wf: Workflow,
    complaint: ComplaintIn,
    complaint_id: str,
    requester: str,
    department: str,
    priority: str,
    choice: Choice,
    now: datetime,
) -> dict[str, Any]:
    """The Task of a new complaint: a case of ``wf`` about the patient (else the complainant),
    requested by the complainant, in the routed department, with its category."""

    case = CaseIn(
        case_type=wf.name,
        case_id=complaint_id,
        focus=complaint.patient or requester,
        patient=complaint.patient,
        priority=cast(Priority, priority),  # one of TASK_PRIORITIES (the routing's check)
        department=department,
        description=complaint.description,
    )
    task = task_json(wf, case, complaint_id, choice, now)
    task["requester"] = {"reference": requester}
    task["extension"] = [*task.get("extension", []), {"url": CATEGORY_EXT, "valueCode": complaint.category}]
    if complaint.occurred_at is not None:
        task["input"] = [{"type": {"text": "occurred"}, "valueDateTime": iso(complaint.occurred_at)}]
    return task


def category_of(task: dict[str, Any]) -> str | None:
    for e in task.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == CATEGORY_EXT:
            return str(e.get("valueCode")) if e.get("valueCode") else None
    return None


def _kind(output: Any) -> str | None:
    kind = output.get("type") if isinstance(output, dict) else None
    return str(kind.get("text")) if isinstance(kind, dict) and kind.get("text") else None


def _reference(value: Any) -> str | None:
    """``value.reference`` of a Reference; None for anything else (a Task written over FHIR may hold
    anything)."""
    return str(value["reference"]) if isinstance(value, dict) and value.get("reference") else None


def _output(task: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((o for o in task.get("output") or [] if _kind(o) == kind), None)


def complaint_view(task: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The JSON of a complaint: the case view, its category, the complainant's reference (never
    their name or contacts) and, once resolved, the resolution's reference and whether upheld."""
    view = case_view(task, now)
    view["complaint_id"] = view.pop("case_id")
    view["category"] = category_of(task)
    view["complainant"] = _reference(task.get("requester"))
    resolution = _output(task, "resolution")
    upheld = _output(task, "upheld")
    view["resolution"] = _reference((resolution or {}).get("valueReference"))
    view["upheld"] = upheld.get("valueBoolean") if upheld else None
    return view


def complaint_facts(task: dict[str, Any], wf: Workflow) -> dict[str, Any]:
    """What every complaint event carries: the case facts, the complaint's id and the requester."""
    return {
        **event_facts(task, wf),
        "complaint": case_id_of(task),
        "requester": _reference(task.get("requester")),
    }


def _announce_logged(tx: Tx, task: dict[str, Any], wf: Workflow, choice: Choice) -> None:
    announce_opened(tx, task, wf, choice)  # case.created, case.assigned | case.unassigned
    facts = complaint_facts(task, wf)
    category, department = category_of(task), ext(task, DEPARTMENT_EXT)
    patient = _reference(task.get("for"))
    announce(tx, "complaint.logged", {**facts, "category": category, "patient": patient})
    owner = _reference(task.get("owner"))
    announce(
        tx, "complaint.routed", {**facts, "category": category, "department": department, "owner": owner}
    )
    due = next((e.get("valueDateTime") for e in task.get("extension") or [] if e.get("url") == DUE_EXT), None)
    announce(tx, "complaint.acknowledged", {**facts, "department": department, "due": due})


def log_complaint(
    tx: Tx, wf: Workflow, complaint: ComplaintIn, complaint_id: str, message_id: int, now: datetime
) -> tuple[int, dict[str, Any], Choice | None]:
    """Write a new complaint (see the module docstring); the same ``complaint_id`` again answers the
    stored one with 200 and writes nothing. Returns (status, Task, the choice made or None)."""
    repo = Repository(tx)
    found = repo.find_by_key("Task", CASE_SYSTEM, complaint_id)
    if found is not None:
        task = wq.get_record(tx, "Task", found[0]) or found[1]
        if case_type_of(task) != wf.name:
            raise ComplaintRefused("taken", f"the id {complaint_id!r} names a case that is not a complaint")
        return 200, task, None
    department, priority = route(wf, complaint.category, complaint.priority)
    if complaint.patient and wq.get_record(tx, "Patient", complaint.patient.split("/", 1)[1]) is None:
        raise ComplaintRefused("unknown-patient", f"no stored {complaint.patient}")
    rtype, person = complainant_record(complaint, complaint_id)
    requester = _upsert(tx, rtype, COMPLAINANT_SYSTEM, complaint_id, person, message_id)
    rule = wf.spec.assignment
    choice = choose(candidates(tx, rule, now), rule, department, now)
    content = complaint_task(wf, complaint, complaint_id, requester, department, priority, choice, now)
    task = write_case(tx, content, message_id)
    _announce_logged(tx, task, wf, choice)
    return 201, task, choice


def new_complaint_id() -> str:
    return f"CMP-{uuid.uuid4()}"


# ---------------------------------------------------------------------------- resolution
def path_to(wf: Workflow, from_state: str, to_state: str) -> list[str]:
    """The fewest moves from ``from_state`` to ``to_state`` the workflow allows, not through its
    escalation states (the states entered, in order); empty when there is no way."""
    avoid = escalation_states(wf)
    before: dict[str, str] = {}
    queue = deque([from_state])
    seen = {from_state}
    while queue:
        state = queue.popleft()
        if state == to_state:
            steps = [state]
            while steps[-1] in before:
                steps.append(before[steps[-1]])
            return list(reversed(steps))[1:]
        for t in wf.spec.transitions:
            if t.from_state == state and t.to not in seen and (t.to not in avoid or t.to == to_state):
                seen.add(t.to)
                before[t.to] = state
                queue.append(t.to)
    return []


def resolution_response(
    wf: Workflow, task: dict[str, Any], body: ResolutionIn, author: str | None, now: datetime
) -> dict[str, Any]:
    """The QuestionnaireResponse of a complaint's resolution (the workflow's form)."""
    qr: dict[str, Any] = {
        "identifier": {"system": RESOLUTION_SYSTEM, "value": case_id_of(task)},
        "questionnaire": f"Questionnaire/{wf.spec.form}",
        "status": "completed",
        "authored": iso(now),
        "extension": [{"url": CASE_EXT, "valueReference": {"reference": f"Task/{task['id']}"}}],
        "item": [
            {"linkId": "resolution", "text": "Resolution", "answer": [{"valueString": body.resolution}]},
            {"linkId": "upheld", "text": "Upheld", "answer": [{"valueBoolean": body.upheld}]},
        ],
    }
    if task.get("focus"):
        qr["subject"] = task["focus"]
    if author:
        qr["author"] = {"reference": f"Practitioner/{author}"}
    return qr


def resolve_complaint(
    tx: Tx,
    wf: Workflow,
    task: dict[str, Any],
    body: ResolutionIn,
    *,
    actor: str,
    roles: frozenset[str],
    author: str | None,
    message_id: int,
    now: datetime,
) -> dict[str, Any]:
    """Move the complaint ``task`` to resolved (as the workflow allows, with the caller's roles),
    store its resolution and announce ``complaint.resolved``; answers the Task as written.
    Raises :class:`~hms_ach.cases.transitions.MoveRefused` when the workflow does not allow it."""
    steps = path_to(wf, state_of(task) or "", RESOLVED)
    if not steps:
        move(tx, wf, task, RESOLVED, actor=actor, now=now, message_id=message_id, roles=roles)  # raises
    complaint_id = str(case_id_of(task))
    qr = resolution_response(wf, task, body, author, now)
    qr_ref = _upsert(tx, "QuestionnaireResponse", RESOLUTION_SYSTEM, complaint_id, qr, message_id)
    current = task
    for i, state in enumerate(steps):
        if i == len(steps) - 1:  # the resolution goes into the version that resolves the case
            current = copy.deepcopy(current)
            current["output"] = [
                *(o for o in current.get("output") or [] if _kind(o) not in ("resolution", "upheld")),
                {"type": {"text": "resolution"}, "valueReference": {"reference": qr_ref}},
                {"type": {"text": "upheld"}, "valueBoolean": body.upheld},
            ]
        reason = "resolution recorded" if state == RESOLVED else "on resolution"
        current = move(
            tx, wf, current, state, actor=actor, now=now, message_id=message_id, roles=roles, reason=reason
        ).task
    written = current
    facts = complaint_facts(written, wf)
    announce(tx, "complaint.resolved", {**facts, "upheld": body.upheld, "resolution": qr_ref, "actor": actor})
    return written
