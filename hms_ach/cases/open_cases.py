"""The open cases: the Tasks of a workflow whose state is not final, read through the search index,
and written back only when nobody wrote them since they were read.

A Task with a case type but no case identifier (written over FHIR) is no case the engine moves. The
SLA timers (:mod:`hms_ach.cases.sla`) and the hand-back (:mod:`hms_ach.cases.handback`) look at
these only; a closed case is never read by them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from hms_ach.cases.transitions import case_id_of, write_case
from hms_ach.cases.workflow import Workflow, case_type_of, state_of
from hms_ach.store import workforce_queries as wq
from hms_ach.store.port import Tx
from hms_ach.store.savepoint import savepoint


def open_cases(tx: Tx, known: Mapping[str, Workflow]) -> Iterator[tuple[Workflow, dict[str, Any]]]:
    """(workflow, Task) of every case of ``known`` whose state is not final, read through the
    ``status`` index (the Task.status values of the workflows' open states)."""
    statuses = sorted({s.status for wf in known.values() for s in wf.spec.states if not s.final})
    seen: set[str] = set()
    for status in statuses:
        for task in wq.scan(tx, "Task", [wq.with_status("Task", status)]):
            wf = known.get(case_type_of(task) or "")
            state = state_of(task)
            if wf is None or state is None or case_id_of(task) is None or str(task.get("id")) in seen:
                continue
            seen.add(str(task.get("id")))
            if state in wf.open_states():
                yield wf, task


class CaseChanged(Exception):
    """The case was written by someone else after it was read (another instance, an API call)."""


def write_next(tx: Tx, read: dict[str, Any], nxt: dict[str, Any]) -> dict[str, Any]:
    """Write ``nxt`` as the version after ``read`` (the Task as read, with ``meta``); when another
    version came in between, the write is rolled back and :class:`CaseChanged` raised, so the next
    run sees the case as it is. (On PostgreSQL the write locks the row until the transaction ends,
    so the check is exact.)"""
    expected = int((read.get("meta") or {}).get("versionId", 0)) + 1
    with savepoint(tx):
        written = write_case(tx, nxt, None)
        if int(written["meta"]["versionId"]) != expected:
            raise CaseChanged(f"Task/{written['id']} changed while it was being checked")
    return written
