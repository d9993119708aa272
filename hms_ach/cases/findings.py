"""A case's findings, their policies and their signature, inside the writer's transaction (no HTTP).

Findings are a QuestionnaireResponse answering the workflow's form (``form:``, a stored
Questionnaire). :func:`prepare` fills what the caller left out (``questionnaire``, ``subject``,
``author``, the case extension), checks the answers against the form
(:func:`hms_ach.cases.forms.validate_response`) and refuses a closed case; :func:`submit` stores the
response as a new record, adds it to ``Task.output``, runs the workflow's ``policies``
(:func:`evaluate`: FHIRPath over the response, each with a severity) and moves the case
(:func:`settle`): a broken ``error`` rule to ``on_violation`` (the escalation queue), otherwise to
``on_findings``. :func:`sign_findings` signs the latest findings (:mod:`hms_ach.cases.signatures`),
stores the Provenance, adds the signature extension to the response (its next version), and the
policies run again. Every move goes through :func:`hms_ach.cases.transitions.move`, made by the
engine on the caller's behalf (the actor is the caller); the events are
``case.findings_submitted`` and ``case.signed``.
"""

from __future__ import annotations

import copy
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from hms_ach.cases.forms import validate_response
from hms_ach.cases.signatures import SigningKey, provenance, sign, with_signature
from hms_ach.cases.transitions import announce, event_facts, move, write_case
from hms_ach.cases.workflow import Workflow, case_type_of, state_of
from hms_ach.core.records import RecordWrite
from hms_ach.mapping.fhir_instance import problems
from hms_ach.mapping.hl7_transform import compile_fhirpath
from hms_ach.mapping.spec import WorkflowPolicy
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.workforce.rules import iso

#: QuestionnaireResponse.extension: the case the findings belong to (valueReference Task/<id>).
CASE_EXT = "urn:hms-ach:fhir:StructureDefinition/case"
#: QuestionnaireResponse.identifier system of findings submitted through the API.
FINDINGS_SYSTEM = "urn:hms-ach:id:findings"
#: Task.output type text of the findings.
FINDINGS_OUTPUT = "findings"
#: Task.output[].extension of a findings entry: an error policy the findings broke when submitted.
POLICY_VIOLATION_EXT = "urn:hms-ach:fhir:StructureDefinition/policy-violation"
SEVERITIES = ("error", "warning", "information")

Refusal = Literal["not-a-case", "invalid", "no-form", "closed", "no-findings"]


class FindingsRefused(Exception):
    """Findings or a signature that cannot be taken: ``kind`` says why (``not-a-case``, ``invalid``
    answers with ``errors`` naming the linkIds, ``no-form`` stored, the case is ``closed``, there are
    ``no-findings`` to sign)."""

    def __init__(self, kind: Refusal, detail: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.errors = errors or []


@dataclass(frozen=True)
class Violation:
    """A policy the findings break."""

    policy: str
    severity: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"policy": self.policy, "severity": self.severity, "message": self.message}


# ---------------------------------------------------------------------------- policies (pure)
def holds(policy: WorkflowPolicy, response: dict[str, Any]) -> bool:
    """Whether ``policy`` holds for ``response``: its FHIRPath answers true (a single true, or only
    trues); empty, false or an evaluation error is a violation."""
    try:
        result = compile_fhirpath(policy.expression)(response)
    except Exception:  # noqa: BLE001 - a rule that cannot be evaluated on this input does not hold
        return False
    return bool(result) and all(value is True for value in result)


def evaluate(policies: Sequence[WorkflowPolicy], response: dict[str, Any]) -> list[Violation]:
    """The violations of ``response``, in the order the policies are declared."""
    return [Violation(p.id, p.severity, p.message) for p in policies if not holds(p, response)]


def counts(violations: Sequence[Violation]) -> dict[str, int]:
    """How many violations of each severity."""
    return {s: sum(1 for v in violations if v.severity == s) for s in SEVERITIES}


def outcome_state(wf: Workflow, violations: Sequence[Violation]) -> str | None:
    """Where findings with ``violations`` send the case: ``on_violation`` on an error, else
    ``on_findings``; None when the workflow declares neither."""
    if any(v.severity == "error" for v in violations):
        return wf.spec.on_violation
    return wf.spec.on_findings


def path_to(wf: Workflow, start: str, goal: str) -> list[str] | None:
    """The states of the shortest chain of transitions from ``start`` to ``goal`` (``[]`` when the
    case is there already), None when there is none."""
    if start == goal:
        return []
    came: dict[str, str] = {start: start}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        for t in wf.spec.transitions:
            if t.from_state == here and t.to not in came:
                came[t.to] = here
                if t.to == goal:
                    steps = [goal]
                    while came[steps[-1]] != start:
                        steps.append(came[steps[-1]])
                    return steps[::-1]
                todo.append(t.to)
    return None


def reason_of(violations: Sequence[Violation]) -> str:
    """The move's reason: the ids of the broken error rules, or that the findings passed."""
    errors = [v.policy for v in violations if v.severity == "error"]
    if errors:
        return f"policy {', '.join(errors)} (error)"
    others = [v.policy for v in violations]
    return "findings passed the policies" + (f" (with {', '.join(others)})" if others else "")


# ---------------------------------------------------------------------------- reads
def load_case(tx: Tx, wf: Workflow | None, task_id: str) -> dict[str, Any]:
    """The case ``Task/<task_id>`` as stored (of ``wf`` when given); refused when it is no case."""
    task = wq.get_record(tx, "Task", task_id)
    if task is None or case_type_of(task) is None or (wf is not None and case_type_of(task) != wf.name):
        raise FindingsRefused("not-a-case", f"there is no case Task/{task_id[:64]}")
    return task


def _refuse_closed(wf: Workflow, task: dict[str, Any]) -> None:
    """Refuse a case in a final state, or in a state its workflow does not have (a Task written over
    FHIR may say anything)."""
    state = state_of(task) or ""
    if state not in {s.name for s in wf.spec.states}:
        raise FindingsRefused("closed", f"the case's state {state[:64]!r} is not a state of {wf.name}")
    if wf.state(state).final:
        raise FindingsRefused("closed", f"the case is closed (state {state})")


def form_of(tx: Tx, form: str) -> dict[str, Any] | None:
    """The workflow's form: the Questionnaire with id ``form``, or else the one whose identifier value,
    name or url (its last segment) is ``form``."""
    found = wq.get_record(tx, "Questionnaire", form)
    if found is not None:
        return found
    for q in wq.scan(tx, "Questionnaire"):
        idents = q.get("identifier") or []
        url = str(q.get("url") or "")
        if (
            any(isinstance(i, dict) and i.get("value") == form for i in idents)
            or q.get("name") == form
            or (url and url.rstrip("/").rsplit("/", 1)[-1] == form)
        ):
            return q
    return None


def findings_of(task: dict[str, Any]) -> str | None:
    """The id of the case's latest findings (the last findings entry of ``Task.output``)."""
    latest = None
    for out in task.get("output") or []:
        if not isinstance(out, dict) or (out.get("type") or {}).get("text") != FINDINGS_OUTPUT:
            continue
        ref = str((out.get("valueReference") or {}).get("reference") or "")
        if ref.startswith("QuestionnaireResponse/"):
            latest = ref.split("/", 1)[1]
    return latest


# ---------------------------------------------------------------------------- writes
@dataclass(frozen=True)
class Prepared:
    """Findings ready to store: the response filled in, for the case as read."""

    task: dict[str, Any]
    response: dict[str, Any]


def prepare(
    tx: Tx, wf: Workflow, task_id: str, body: dict[str, Any], author: str | None, now: datetime
) -> Prepared:
    """Fill and check the findings ``body`` for the case; :class:`FindingsRefused` when they cannot
    be taken."""
    task = load_case(tx, wf, task_id)
    _refuse_closed(wf, task)
    form = form_of(tx, wf.spec.form)
    if form is None:
        raise FindingsRefused(
            "no-form", f"the form {wf.spec.form!r} of {wf.name} is not stored as a Questionnaire"
        )
    if body.get("resourceType") not in (None, "QuestionnaireResponse"):
        raise FindingsRefused(
            "invalid",
            "the body is not a QuestionnaireResponse",
            [{"location": "body.resourceType", "detail": "expected QuestionnaireResponse"}],
        )
    qr = {k: copy.deepcopy(v) for k, v in body.items() if k not in ("id", "meta", "identifier")}
    qr["resourceType"] = "QuestionnaireResponse"
    qr["identifier"] = {"system": FINDINGS_SYSTEM, "value": f"{task_id}-{uuid.uuid4().hex[:12]}"}
    qr.setdefault("questionnaire", f"Questionnaire/{form['id']}")
    qr.setdefault("status", "completed")
    qr.setdefault("authored", iso(now))
    if "subject" not in qr and isinstance(task.get("focus"), dict):
        qr["subject"] = task["focus"]
    if "author" not in qr:
        if author is None:
            raise FindingsRefused(
                "invalid",
                "the findings name no author",
                [
                    {
                        "location": "body.author",
                        "detail": "a Practitioner reference, or a token with employee_id",
                    }
                ],
            )
        qr["author"] = {"reference": author}
    extensions = [
        e for e in qr.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == CASE_EXT)
    ]
    qr["extension"] = [*extensions, {"url": CASE_EXT, "valueReference": {"reference": f"Task/{task_id}"}}]
    wrong = problems(qr, limit=20)  # FHIR R4: elements, types, required elements and bindings
    if wrong:
        errors = [{"location": f"body.{p.expression}", "detail": p.message} for p in wrong]
        raise FindingsRefused("invalid", "the body is not a valid FHIR R4 QuestionnaireResponse", errors)
    issues = validate_response(form, qr)
    if issues:
        errors = [{"location": f"item[linkId={i.link_id}]", "detail": i.message} for i in issues]
        links = ", ".join(sorted({i.link_id for i in issues}))
        raise FindingsRefused("invalid", f"the answers do not fit the form {wf.spec.form} ({links})", errors)
    return Prepared(task, qr)


@dataclass
class Settled:
    """What a submission or a signature did: the case as written, the findings, their violations,
    the states passed through, the Provenance made (when signed)."""

    task: dict[str, Any]
    response: dict[str, Any]
    violations: list[Violation]
    moves: list[str] = field(default_factory=list)
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": f"QuestionnaireResponse/{self.response['id']}",
            "findings_version": int(self.response["meta"]["versionId"]),
            "state": state_of(self.task),
            "violations": [v.to_dict() for v in self.violations],
            "counts": counts(self.violations),
            "moved_through": self.moves,
            "provenance": f"Provenance/{self.provenance['id']}" if self.provenance else None,
        }


@dataclass(frozen=True)
class Act:
    """One write for a caller, in the writer's transaction: the case's workflow, who acts (the
    moves' actor), when, and the stored request the record versions belong to."""

    tx: Tx
    wf: Workflow
    actor: str
    now: datetime
    message_id: int


@dataclass(frozen=True)
class Signer:
    """Who signs (``Practitioner/<id>``) and the key that signs for them."""

    reference: str
    key: SigningKey


def settle(act: Act, task: dict[str, Any], response: dict[str, Any]) -> Settled:
    """Run the policies over ``response`` and move the case where they send it."""
    wf = act.wf
    violations = evaluate(wf.spec.policies, response)
    goal = outcome_state(wf, violations)
    here = state_of(task) or ""
    steps = path_to(wf, here, goal) if goal is not None else []
    if steps is None:
        raise FindingsRefused("closed", f"a {wf.name} case in state {here!r} cannot reach {goal!r}")
    reason = reason_of(violations)
    for state in steps:
        moved = move(
            act.tx, wf, task, state, actor=act.actor, now=act.now, message_id=act.message_id, reason=reason
        )
        task = moved.task
    return Settled(task, response, violations, steps)


def submit(act: Act, prepared: Prepared, signer: Signer | None = None) -> Settled:
    """Store the findings, link them from the case, sign them when a ``signer`` is given, announce
    ``case.findings_submitted`` and move the case by the policies."""
    tx, wf = act.tx, act.wf
    ident = prepared.response["identifier"]
    rec = RecordWrite(
        "findings",
        "QuestionnaireResponse",
        ident["system"],
        ident["value"],
        prepared.response,
        mode="replace",
    )
    out = Repository(tx).upsert(rec, prepared.response, act.message_id)
    if out is None:
        raise RuntimeError("the findings were not written")
    response = wq.get_record(tx, "QuestionnaireResponse", out.id) or {}
    task = copy.deepcopy(load_case(tx, wf, str(prepared.task["id"])))
    made = None
    if signer is not None:
        response, made = _sign(act, task, response, signer)
    violations = evaluate(wf.spec.policies, response)
    link: dict[str, Any] = {
        "type": {"text": FINDINGS_OUTPUT},
        "valueReference": {"reference": f"QuestionnaireResponse/{out.id}"},
    }
    broken = [v.policy for v in violations if v.severity == "error"]
    if broken:  # what the findings broke when submitted: the analytics' policy-violation rate
        link["extension"] = [{"url": POLICY_VIOLATION_EXT, "valueCode": p} for p in broken]
    task["output"] = [*(task.get("output") or []), link]
    task = write_case(tx, task, act.message_id)
    found = counts(violations)
    facts = {
        **event_facts(task, wf),
        "resource": f"QuestionnaireResponse/{out.id}",
        "case": f"Task/{task['id']}",
        "errors": found["error"],
        "warnings": found["warning"],
        "information": found["information"],
    }
    announce(tx, "case.findings_submitted", facts)
    settled = settle(act, task, response)
    settled.provenance = made
    return settled


def sign_findings(act: Act, task_id: str, signer: Signer) -> Settled:
    """Sign the case's latest findings, then move the case by the policies."""
    task = load_case(act.tx, act.wf, task_id)
    _refuse_closed(act.wf, task)
    qid = findings_of(task)
    response = wq.get_record(act.tx, "QuestionnaireResponse", qid) if qid else None
    if response is None:
        raise FindingsRefused("no-findings", f"case Task/{task_id[:64]} has no findings to sign")
    response, made = _sign(act, task, response, signer)
    settled = settle(act, task, response)
    settled.provenance = made
    return settled


def _sign(
    act: Act, task: dict[str, Any], response: dict[str, Any], signer: Signer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sign ``response`` (as stored): the Provenance stored, the response's next version carrying the
    signature extension, ``case.signed`` announced. Answers (response as written, Provenance)."""
    tx, repo = act.tx, Repository(act.tx)
    version = int(response["meta"]["versionId"])
    signed_ref = f"QuestionnaireResponse/{response['id']}/_history/{version}"
    token = sign(response, signer.key)
    content = provenance(signed_ref, f"Task/{task['id']}", signer.reference, token, signer.key, iso(act.now))
    rec = RecordWrite("signature", "Provenance", None, None, content, mode="replace")
    out = repo.upsert(rec, content, act.message_id)
    if out is None:
        raise RuntimeError("the signature's Provenance was not written")
    made = wq.get_record(tx, "Provenance", out.id) or {}
    rid = str(response["id"])
    repo.write_version(
        "QuestionnaireResponse",
        rid,
        version + 1,
        with_signature(response, out.id),
        act.message_id,
        False,
        before=response,
    )
    written = wq.get_record(tx, "QuestionnaireResponse", rid) or {}
    facts = {
        **event_facts(task, act.wf),
        "resource": f"Provenance/{out.id}",
        "case": f"Task/{task['id']}",
        "target": signed_ref,
        "signer": signer.reference,
        "onBehalf": signer.key.engine,
    }
    announce(tx, "case.signed", facts)
    return written, made
