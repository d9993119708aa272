"""SLA timers of review cases: the ``case_timers`` job (docs/review-cases.md, "SLA timers").

Every ``interval_seconds`` (60 by default) the job reads the open cases (Tasks of a workflow whose
state is not final, found through the ``status`` index) and, for each whose due time (the
:data:`~hms_ach.cases.transitions.DUE_EXT` extension that :func:`~hms_ach.cases.transitions.set_due`
writes when the case enters a state with an SLA) has passed:

1. records the breach on the Task, its next version: the extension :data:`BREACHED_EXT` with the
   state and the due time, and a note; and emits ``case.sla_breached`` (resource, versionId,
   caseType, priority, state, due, escalateTo, notifyRole, owner);
2. moves the case to the state's ``escalate_to`` with :func:`~hms_ach.cases.transitions.move`
   (actor ``hms-ach``, no role check), which emits ``case.escalated``. A workflow without that
   transition (``triage`` of clinical-review) leaves the case where it is: the breach is recorded
   and announced all the same, once.

Exactly once per entry into a state: the breach, the events and the move commit in one savepoint
of the job's transaction, and a case whose :data:`BREACHED_EXT` already names its state and due
time is skipped, so a second run, a restarted engine or another instance never fires it again;
and a breach is written only over the version of the Task that was read
(:func:`~hms_ach.cases.open_cases.write_next`), so two runs racing do not both write it. Entering
the state again gives a new due time, hence a new breach. The same job then hands back the cases
of reviewers who left (:mod:`hms_ach.cases.handback`). A run is one writer transaction: it changes
``max_cases_per_run`` cases at most, the next runs the others.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, model_validator

from hms_ach.cases import handback
from hms_ach.cases.open_cases import CaseChanged, open_cases, write_next
from hms_ach.cases.transitions import (
    DUE_EXT,
    ENGINE_ACTOR,
    MoveRefused,
    announce,
    event_facts,
    move,
)
from hms_ach.cases.workflow import Workflow, state_of, workflows
from hms_ach.core.types import JobSchedule
from hms_ach.outbound.events import current_engine
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce.rules import iso

log = logging.getLogger("hms_ach.cases.sla")

#: Task.extension: the last SLA breach recorded (sub-extensions ``state`` and ``due``).
BREACHED_EXT = "urn:hms-ach:fhir:StructureDefinition/case-sla-breached"


_CAP = "How many cases one run changes at most (a run is one writer transaction); the others wait"


class CaseTimerSettings(JobSchedule):
    """``jobs: case_timers:`` in channels.yaml."""

    interval_seconds: float | None = Field(60, gt=0, description="How often the open cases are checked")
    handback_grace_minutes: int = Field(
        30,
        ge=0,
        description="A reviewer whose last shift ended more than this long ago (and no shift covers "
        "now) hands their open cases back",
    )
    handback: bool = Field(
        True, description="false: only the SLA timers run (no hand-back, no assignment from the queue)"
    )
    max_cases_per_run: int = Field(100, ge=1, description=_CAP)

    @model_validator(mode="before")
    @classmethod
    def _cron_instead(cls, data: Any) -> Any:
        """A ``cron:`` given without ``interval_seconds`` replaces the default interval."""
        if isinstance(data, dict) and data.get("cron") and "interval_seconds" not in data:
            return {**data, "interval_seconds": None}
        return data


def moment(text: Any) -> datetime | None:
    """A dateTime text as an aware datetime (UTC when it has no offset); None when it is not one."""
    if not isinstance(text, str) or len(text) < 11:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def extension_value(task: dict[str, Any], url: str) -> Any:
    """The first ``extension`` of ``task`` with ``url``, or None."""
    return next((e for e in task.get("extension") or [] if isinstance(e, dict) and e.get("url") == url), None)


def recorded_breach(task: dict[str, Any]) -> tuple[str | None, str | None]:
    """(state, due) of the breach recorded on ``task`` (:data:`BREACHED_EXT`), Nones without one."""
    found = extension_value(task, BREACHED_EXT)
    parts = {
        e.get("url"): e.get("valueCode", e.get("valueDateTime"))
        for e in (found or {}).get("extension") or []
        if isinstance(e, dict)
    }
    return parts.get("state"), parts.get("due")


def breach(task: dict[str, Any], wf: Workflow, now: datetime) -> tuple[str, str] | None:
    """(state, due) when ``task`` is past its due time and that breach is not recorded yet."""
    state = state_of(task)
    due_ext = extension_value(task, DUE_EXT)
    due = str(due_ext.get("valueDateTime") or "") if due_ext else ""
    when = moment(due)
    if state is None or when is None or when > now:
        return None
    if recorded_breach(task) == (state, due):
        return None
    return state, due


def record_breach(
    tx: Tx, wf: Workflow, task: dict[str, Any], state: str, due: str, now: datetime
) -> tuple[dict[str, Any], str | None]:
    """Write the breach on the case (its next version), announce ``case.sla_breached`` and move the
    case to the state's ``escalate_to``. Answers (the Task as it stands, the state it moved to)."""
    sla = wf.state(state).sla
    target = sla.escalate_to if sla is not None else None
    movable = any(t.from_state == state and t.to == target for t in wf.spec.transitions)
    escalate_to = target if movable and target != state else None  # None: the case stays where it is
    stamp = iso(now)
    nxt = copy.deepcopy(task)
    others = [
        e for e in nxt.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == BREACHED_EXT)
    ]
    mark = [{"url": "state", "valueCode": state}, {"url": "due", "valueDateTime": due}]
    nxt["extension"] = [*others, {"url": BREACHED_EXT, "extension": mark}]
    nxt["note"] = [*(nxt.get("note") or []), {"time": stamp, "text": f"SLA of {state} passed (due {due})"}]
    written = write_next(tx, task, nxt)
    owner = (written.get("owner") or {}).get("reference")
    facts = {
        **event_facts(written, wf),
        "state": state,
        "due": due,
        "escalateTo": escalate_to,
        "notifyRole": sla.notify_role if sla is not None else None,
        "owner": owner,
    }
    announce(tx, "case.sla_breached", facts)
    if escalate_to is None:
        return written, None
    try:
        moved = move(
            tx, wf, written, escalate_to, actor=ENGINE_ACTOR, now=now, message_id=None, reason="sla-breached"
        )
    except MoveRefused as refused:  # the workflow has no such transition: the breach stands alone
        log.warning(
            "case.sla_not_escalated",
            extra={"case": f"Task/{written['id']}", "state": state, "reason": refused.reason},
        )
        return written, None
    return moved.task, escalate_to


def check_timers(
    tx: Tx, cases: Iterable[tuple[Workflow, dict[str, Any]]], now: datetime, limit: int
) -> tuple[int, int, int]:
    """Record the new breaches among ``cases`` (the open cases as read), ``limit`` at the most;
    answers (breached, escalated, failed)."""
    breached = escalated = failed = 0
    for wf, task in cases:
        found = breach(task, wf, now)
        if found is None:
            continue
        if breached + failed >= limit:
            break
        try:
            with savepoint(tx):  # one case's failure costs only its own writes
                _, moved_to = record_breach(tx, wf, task, found[0], found[1], now)
        except CaseChanged:  # written meanwhile: the next run sees it as it is now
            log.info("case.sla_deferred", extra={"case": f"Task/{task.get('id')}"})
            continue
        except Exception as exc:  # noqa: BLE001 - the other cases still get their timers
            failed += 1
            log.error(
                "case.sla_failed",
                extra={"case": f"Task/{task.get('id')}", "error": type(exc).__name__},
            )
            continue
        breached += 1
        escalated += moved_to is not None
        log.info(
            "case.sla_breached",
            extra={"case": f"Task/{task['id']}", "state": found[0], "escalated_to": moved_to},
        )
    return breached, escalated, failed


class CaseTimerJob:
    """The ``case_timers`` job (a :class:`hms_ach.core.types.Job`): :func:`check_timers`, then
    :func:`hms_ach.cases.handback.reassign`, over the workflows of the running engine's mappings."""

    Settings = CaseTimerSettings

    def run(self, tx: Tx, settings: CaseTimerSettings) -> str:
        engine = current_engine()
        known = workflows(engine.mset) if engine is not None else {}
        if not known:
            return "no workflows loaded: nothing checked"
        now = datetime.now(UTC)
        cases = list(open_cases(tx, known))  # one read for both; a case written by the timers is
        limit = settings.max_cases_per_run  # read again by the hand-back
        breached, escalated, failed = check_timers(tx, cases, now, limit)
        summary = f"breached={breached}, escalated={escalated}"
        if settings.handback:
            left = max(0, limit - breached - failed)
            done = handback.reassign(tx, cases, now, settings.handback_grace_minutes, left)
            summary += f", handed_back={done.handed_back}, assigned={done.assigned}, queued={done.queued}"
            failed += done.failed
        if failed:  # logged per case (case.sla_failed); the others are committed
            summary += f", failed={failed}"
        return summary
