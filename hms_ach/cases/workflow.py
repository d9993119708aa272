"""A case workflow as the engine runs it: one ``kind: workflow`` file of ``mappings/workflows/``.

The file (:class:`hms_ach.mapping.spec.WorkflowMapping`, checked by ``hms-ach check``) declares a
case type: its business states, each with the FHIR ``Task.status`` it implies and its SLA per
priority, the transitions and the roles that may make them, the form the findings answer and who a
new case is assigned to. :class:`Workflow` answers the questions the case code asks of it; the
Task itself carries the case type in ``Task.code`` and the state in ``Task.businessStatus``, both
in the code systems below.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hms_ach.mapping.loader import MappingSet
from hms_ach.mapping.spec import WorkflowMapping, WorkflowState

#: Task.identifier system of a case opened through /api/v1/review/cases.
CASE_SYSTEM = "urn:hms-ach:id:case"
#: Task.code system: the case type (the workflow's name).
CASE_TYPE_SYSTEM = "urn:hms-ach:code:case-type"
#: Task.businessStatus system: the workflow state.
CASE_STATE_SYSTEM = "urn:hms-ach:code:case-state"


@dataclass(frozen=True)
class Workflow:
    """One case type's workflow."""

    name: str
    spec: WorkflowMapping

    @property
    def initial(self) -> WorkflowState:
        return self.state(self.spec.initial)

    def state(self, name: str) -> WorkflowState:
        """The state called ``name``; KeyError when the workflow has none."""
        for state in self.spec.states:
            if state.name == name:
                return state
        raise KeyError(f"workflow {self.name!r} has no state {name!r}")

    def open_states(self) -> list[str]:
        """The states of a case not yet closed (not ``final``)."""
        return [s.name for s in self.spec.states if not s.final]

    def may_move(self, from_state: str, to_state: str, roles: Iterable[str]) -> bool:
        """Whether a caller with ``roles`` may move a case from ``from_state`` to ``to_state``."""
        held = set(roles)
        return any(
            t.from_state == from_state and t.to == to_state and held.intersection(t.roles)
            for t in self.spec.transitions
        )

    def sla_minutes(self, state: str, priority: str) -> int | None:
        """How long a case of ``priority`` may stay in ``state``; None: no timer."""
        sla = self.state(state).sla
        return None if sla is None else sla.minutes.get(priority)

    def code(self) -> dict[str, Any]:
        """Task.code of a case of this type."""
        coding: dict[str, Any] = {"system": CASE_TYPE_SYSTEM, "code": self.name}
        if self.spec.display:
            coding["display"] = self.spec.display
        return {"coding": [coding], "text": self.spec.display or self.name}

    def business_status(self, state: str) -> dict[str, Any]:
        """Task.businessStatus of a case in ``state``."""
        return {"coding": [{"system": CASE_STATE_SYSTEM, "code": self.state(state).name}], "text": state}


def workflows(mappings: MappingSet) -> dict[str, Workflow]:
    """The workflows of a checked mapping set, by case type."""
    return {name: Workflow(name, f.model) for name, f in sorted(mappings.workflows.items())}


def case_type_of(task: dict[str, Any]) -> str | None:
    """The case type of a Task (its ``code`` in :data:`CASE_TYPE_SYSTEM`), None for another Task."""
    return _code_in((task.get("code") or {}), CASE_TYPE_SYSTEM)


def state_of(task: dict[str, Any]) -> str | None:
    """The workflow state of a Task (its ``businessStatus`` in :data:`CASE_STATE_SYSTEM`)."""
    return _code_in((task.get("businessStatus") or {}), CASE_STATE_SYSTEM)


def _code_in(concept: dict[str, Any], system: str) -> str | None:
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == system and coding.get("code"):
            return str(coding["code"])
    return None
