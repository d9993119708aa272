"""Moving a case from one workflow state to another, inside the writer's transaction.

Every change of a case's state goes through :func:`move`: the API's transitions, findings that
fail a policy (to the escalation state), the SLA timer, a complaint's resolution. It checks the
move against the workflow (:class:`~hms_ach.cases.workflow.Workflow`; the roles only when the
caller is a person, not the engine's own timer), writes the Task's next version (``status`` and
``businessStatus`` of the new state, ``lastModified``, a ``note`` saying who moved it and why, the
due time of the new state's SLA) and enqueues the events in the same transaction:

* ``case.status_changed`` on every move;
* ``case.escalated`` when the new state is a workflow's escalation state (an SLA's
  ``escalate_to``);
* ``case.resolved`` when the new state is final.

The version history of the Task is the case's state history: each version carries the state it
entered and when (``lastModified``), which is what the analytics and the per-case audit log read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hms_ach.cases.workflow import CASE_SYSTEM, Workflow, case_type_of, state_of
from hms_ach.core.records import RecordWrite
from hms_ach.outbound.events import payload_from
from hms_ach.store import outbox
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.workforce.rules import iso

#: Task.extension: when the case is due to leave its state (its SLA; absent: no timer).
DUE_EXT = "urn:hms-ach:fhir:StructureDefinition/case-due"
#: The actor of a move the engine makes itself (the SLA timer, a hand-back).
ENGINE_ACTOR = "hms-ach"


class MoveRefused(Exception):
    """A move the workflow does not allow; ``reason`` is ``not-allowed`` (no such transition from
    the case's state), ``forbidden`` (the caller holds none of the transition's roles) or
    ``not-a-case`` (the Task is no case of this workflow, or has no case identifier)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Moved:
    """A move made: the Task as written (with ``id`` and ``meta``), and the states."""

    task: dict[str, Any]
    from_state: str
    to_state: str


def escalation_states(wf: Workflow) -> frozenset[str]:
    """The states a late case goes to (the ``escalate_to`` of the workflow's SLAs)."""
    return frozenset(s.sla.escalate_to for s in wf.spec.states if s.sla is not None and s.sla.escalate_to)


def case_id_of(task: dict[str, Any]) -> str | None:
    """The case's business id (its identifier in :data:`CASE_SYSTEM`)."""
    for ident in task.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == CASE_SYSTEM and ident.get("value"):
            return str(ident["value"])
    return None


def set_due(task: dict[str, Any], wf: Workflow, state: str, now: datetime) -> None:
    """Set (or drop) the case's due time for entering ``state`` at ``now``, by its priority."""
    extensions = [
        e for e in task.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == DUE_EXT)
    ]
    minutes = wf.sla_minutes(state, str(task.get("priority") or "routine"))
    if minutes is not None:
        extensions.append({"url": DUE_EXT, "valueDateTime": iso(now + timedelta(minutes=minutes))})
    if extensions:
        task["extension"] = extensions
    else:
        task.pop("extension", None)


def write_case(tx: Tx, task: dict[str, Any], message_id: int | None) -> dict[str, Any]:
    """Write ``task`` (a case's next content, ``id``/``meta`` ignored) as the case's next version;
    answers the Task as stored."""
    case_id = case_id_of(task)
    if case_id is None:
        raise MoveRefused("not-a-case", "the Task has no case identifier")
    content = {k: v for k, v in task.items() if k not in ("id", "meta")}
    rec = RecordWrite("case", "Task", CASE_SYSTEM, case_id, content, mode="replace")
    out = Repository(tx).upsert(rec, content, message_id)
    if out is None:
        raise RuntimeError("the case's Task was not written")
    return wq.get_record(tx, "Task", out.id) or {}


def event_facts(task: dict[str, Any], wf: Workflow) -> dict[str, Any]:
    """The facts every case event carries: the Task reference and version, case type, priority."""
    return {
        "resource": f"Task/{task['id']}",
        "versionId": int(task["meta"]["versionId"]),
        "caseType": wf.name,
        "priority": task.get("priority"),
    }


def announce(tx: Tx, event: str, facts: dict[str, Any]) -> None:
    """Enqueue ``event`` with the payload its mapping (mappings/events/) builds from ``facts``."""
    outbox.enqueue(tx, event, payload_from(event, facts, facts))


def check_move(wf: Workflow, from_state: str, to_state: str, roles: Iterable[str] | None) -> None:
    """Raise :class:`MoveRefused` unless the workflow ``wf`` has the move from ``from_state`` to
    ``to_state`` and (``roles`` not None) the roles may make it. Pure: the workflow goldens
    (:mod:`hms_ach.cases.workflow_goldens`) replay cases with it."""
    if not any(t.from_state == from_state and t.to == to_state for t in wf.spec.transitions):
        allowed = sorted({t.to for t in wf.spec.transitions if t.from_state == from_state})
        raise MoveRefused(
            "not-allowed",
            f"a {wf.name} case in state {from_state!r} cannot move to {to_state!r}"
            f" (allowed: {', '.join(allowed) or 'none, the state is final'})",
        )
    if roles is not None and not wf.may_move(from_state, to_state, roles):
        needed = sorted(
            {
                r
                for t in wf.spec.transitions
                if t.from_state == from_state and t.to == to_state
                for r in t.roles
            }
        )
        raise MoveRefused(
            "forbidden", f"moving from {from_state} to {to_state} needs one of the roles {', '.join(needed)}"
        )


def move_events(wf: Workflow, to_state: str) -> list[str]:
    """The events a move into ``to_state`` announces, in order."""
    events = ["case.status_changed"]
    if to_state in escalation_states(wf):
        events.append("case.escalated")
    if wf.state(to_state).final:
        events.append("case.resolved")
    return events


def move(
    tx: Tx,
    wf: Workflow,
    task: dict[str, Any],
    to_state: str,
    *,
    actor: str,
    now: datetime,
    message_id: int | None,
    roles: Iterable[str] | None = None,
    reason: str | None = None,
) -> Moved:
    """Move the case ``task`` (as stored, with ``id``) to ``to_state`` and announce it.

    ``roles``: the caller's roles, checked against the transition; None for a move the engine
    makes itself (the SLA timer). ``reason`` goes into the note (codes and ids, never PHI).
    Raises :class:`MoveRefused` when the workflow does not allow it."""
    if case_type_of(task) != wf.name:
        raise MoveRefused("not-a-case", f"the Task is not a {wf.name} case")
    from_state = state_of(task) or ""
    check_move(wf, from_state, to_state, roles)
    state = wf.state(to_state)
    stamp = iso(now)
    nxt = copy.deepcopy(task)
    nxt["status"] = state.status
    nxt["businessStatus"] = wf.business_status(state.name)
    nxt["lastModified"] = stamp
    text = f"{from_state} -> {to_state} by {actor}" + (f": {reason}" if reason else "")
    nxt["note"] = [*(nxt.get("note") or []), {"time": stamp, "text": text}]
    set_due(nxt, wf, to_state, now)
    if state.final:
        period = dict(nxt.get("executionPeriod") or {})
        period.setdefault("start", nxt.get("authoredOn") or stamp)
        period["end"] = stamp
        nxt["executionPeriod"] = period
    written = write_case(tx, nxt, message_id)
    facts = event_facts(written, wf)
    changed = {**facts, "from": from_state, "to": to_state, "status": state.status, "actor": actor}
    payloads = {
        "case.status_changed": changed,
        "case.escalated": {**facts, "from": from_state, "reason": reason},
        "case.resolved": {**facts, "state": to_state, "status": state.status},
    }
    for event in move_events(wf, to_state):
        announce(tx, event, payloads[event])
    return Moved(written, from_state, to_state)
