"""Hand-back: the open cases of a reviewer who left go to the next available one, or to the queue.

Run by the ``case_timers`` job (:mod:`hms_ach.cases.sla`) after the SLA timers, in the same
transaction, one savepoint per case. A case that is not final and owned by ``Practitioner/<id>``
is handed back when its owner

* is offboarded: the Practitioner is ``active: false`` (``practitioner.offboarded``) or gone
  (reason code ``offboarded``);
* no longer holds the workflow's role (``role-ended``);
* is off shift: no Shift of theirs (not cancelled) covers now, or starts within the workflow's
  ``shift_window_minutes``, or ended less than ``handback_grace_minutes`` ago (``off-shift``).

The owner is removed and the case given to the next available reviewer, chosen exactly as for a new
case (:func:`hms_ach.cases.assignment.choose` over :func:`~hms_ach.cases.assignment.candidates`,
the one leaving excepted), or queued when nobody qualifies. The Task's note says why (reason code
and Practitioner ids only, no patient data); the events are ``case.handed_back`` (from, reason,
owner) and then ``case.assigned`` or ``case.unassigned``. A queued case (no owner) is assigned as
soon as someone qualifies (``case.assigned``); while nobody does it stays queued and nothing is
written.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from hms_ach.cases.assignment import ASSIGNED_AT_EXT, Candidate, Choice, candidates, choose
from hms_ach.cases.open_cases import CaseChanged, write_next
from hms_ach.cases.transitions import announce, event_facts
from hms_ach.cases.workflow import Workflow
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint
from hms_ach.workforce.rules import DEPARTMENT_EXT, ext, iso

log = logging.getLogger("hms_ach.cases.handback")


@dataclass(frozen=True)
class Reassigned:
    """What one run did: cases handed back, cases given to someone (from a hand-back or the queue),
    cases left in the queue by a hand-back, and cases that failed (logged)."""

    handed_back: int = 0
    assigned: int = 0
    queued: int = 0
    failed: int = 0


def leaving(
    owner: str, holders: Mapping[str, Candidate], wf: Workflow, now: datetime, grace: timedelta
) -> str | None:
    """Why the case owner ``owner`` (a Practitioner id) hands their cases back; None: they keep them.
    ``holders`` are the holders of the workflow's role, by id."""
    held = holders.get(owner)
    if held is None:
        return "role-ended"
    if not held.active:
        return "offboarded"
    window = timedelta(minutes=wf.spec.assignment.shift_window_minutes)
    if any(start - window <= now < end + grace for start, end in held.shifts):
        return None
    return "off-shift"


class ReviewerPool:
    """The role holders of one workflow, read once per run and kept current as cases are given."""

    def __init__(self, tx: Tx, wf: Workflow, now: datetime):
        self.by_id = {c.practitioner_id: c for c in candidates(tx, wf.spec.assignment, now)}

    def anyone_for(self, wf: Workflow, department: str | None, now: datetime) -> bool:
        """Whether some holder qualifies for a case of ``department`` now (nothing is counted)."""
        return choose(self.by_id.values(), wf.spec.assignment, department, now).chosen is not None

    def choose(self, wf: Workflow, department: str | None, now: datetime, without: str | None) -> Choice:
        pool = [c for pid, c in self.by_id.items() if pid != without]
        choice = choose(pool, wf.spec.assignment, department, now)
        if choice.chosen is not None:
            given = self.by_id[choice.chosen]
            self.by_id[choice.chosen] = replace(given, open_cases=given.open_cases + 1, last_assigned=now)
        return choice


def _owner_id(task: dict[str, Any]) -> str | None:
    ref = str((task.get("owner") or {}).get("reference") or "")
    return ref.split("/", 1)[1] if ref.startswith("Practitioner/") and "/" in ref else None


def give(tx: Tx, task: dict[str, Any], chosen: str | None, now: datetime, note: str) -> dict[str, Any]:
    """Write the case's next version owned by ``Practitioner/<chosen>`` (None: nobody, queued), with
    ``note`` (ids and codes only); answers the Task as stored."""
    stamp = iso(now)
    nxt = copy.deepcopy(task)
    extensions = [
        e for e in nxt.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == ASSIGNED_AT_EXT)
    ]
    nxt.pop("owner", None)
    if chosen is not None:
        nxt["owner"] = {"reference": f"Practitioner/{chosen}"}
        extensions.append({"url": ASSIGNED_AT_EXT, "valueDateTime": stamp})
    if extensions:
        nxt["extension"] = extensions
    else:
        nxt.pop("extension", None)
    nxt["note"] = [*(nxt.get("note") or []), {"time": stamp, "text": note}]
    return write_next(tx, task, nxt)


def announce_owner(tx: Tx, wf: Workflow, written: dict[str, Any], considered: int) -> None:
    """``case.assigned`` (the Task has a Practitioner owner) or ``case.unassigned`` (queued)."""
    base = event_facts(written, wf)
    owner = _owner_id(written)
    if owner is not None:
        announce(tx, "case.assigned", {**base, "owner": f"Practitioner/{owner}"})
    else:
        announce(tx, "case.unassigned", {**base, "considered": considered})


def hand_back(
    tx: Tx, wf: Workflow, task: dict[str, Any], owner: str, reason: str, pool: ReviewerPool, now: datetime
) -> dict[str, Any]:
    """Take the case from ``owner`` (for ``reason``) and give it to the next available reviewer, or
    queue it; announces ``case.handed_back`` and ``case.assigned`` / ``case.unassigned``."""
    choice = pool.choose(wf, ext(task, DEPARTMENT_EXT), now, without=owner)
    why = f"handed back by Practitioner/{owner}: {reason}."
    written = give(tx, task, choice.chosen, now, f"{why} {choice.explanation()}")
    new_owner = f"Practitioner/{choice.chosen}" if choice.chosen else None
    facts = {
        **event_facts(written, wf),
        "from": f"Practitioner/{owner}",
        "reason": reason,
        "owner": new_owner,
    }
    announce(tx, "case.handed_back", facts)
    announce_owner(tx, wf, written, len(choice.considered))
    return written


def reassign(
    tx: Tx, cases: Iterable[tuple[Workflow, dict[str, Any]]], now: datetime, grace_minutes: int, limit: int
) -> Reassigned:
    """Hand back the cases of reviewers who left and assign queued cases, among ``cases`` (the open
    cases as read by :func:`~hms_ach.cases.open_cases.open_cases`; a case is read again before it
    is written), ``limit`` cases at the most. See the module docstring."""
    grace = timedelta(minutes=grace_minutes)
    pools: dict[str, ReviewerPool] = {}
    handed = assigned = queued = failed = 0
    for wf, task in cases:
        if assigned + queued + failed >= limit:  # each case changed is one of these
            break
        owner = _owner_id(task)
        if owner is None and task.get("owner"):
            continue  # owned by something other than a Practitioner (written over FHIR): left alone
        pool = pools.get(wf.name)
        if pool is None:
            pool = pools[wf.name] = ReviewerPool(tx, wf, now)
        reason = leaving(owner, pool.by_id, wf, now, grace) if owner is not None else None
        if owner is not None and reason is None:
            continue  # the owner keeps it: nothing read or written
        if owner is None and not pool.anyone_for(wf, ext(task, DEPARTMENT_EXT), now):
            continue  # queued and still nobody qualifies: nothing read or written
        try:
            with savepoint(tx):
                current = wq.get_record(tx, "Task", str(task["id"]))
                if current is None or _owner_id(current) != owner:
                    raise CaseChanged(f"Task/{task['id']} changed while it was being checked")
                if owner is not None and reason is not None:
                    written = hand_back(tx, wf, current, owner, reason, pool, now)
                    handed += 1
                    given = _owner_id(written) is not None
                    assigned += given
                    queued += not given
                    log.info(
                        "case.handed_back",
                        extra={"case": f"Task/{task['id']}", "reason": reason, "reassigned": given},
                    )
                    continue
                choice = pool.choose(wf, ext(current, DEPARTMENT_EXT), now, without=None)
                if choice.chosen is None:
                    continue  # still nobody: it stays queued, nothing written
                written = give(tx, current, choice.chosen, now, f"from the queue: {choice.explanation()}")
                announce_owner(tx, wf, written, len(choice.considered))
                assigned += 1
                log.info("case.dequeued", extra={"case": f"Task/{task['id']}"})
        except CaseChanged:  # written meanwhile: the next run sees it as it is now
            log.info("case.handback_deferred", extra={"case": f"Task/{task.get('id')}"})
        except Exception as exc:  # noqa: BLE001 - one case's failure costs only its own writes
            failed += 1
            log.error(
                "case.handback_failed", extra={"case": f"Task/{task.get('id')}", "error": type(exc).__name__}
            )
    return Reassigned(handed, assigned, queued, failed)
