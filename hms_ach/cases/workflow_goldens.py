"""Workflow goldens: ``mappings/workflows/<name>_test.yaml`` replay cases through a workflow.

``hms-ach mapping test`` and ``hms-ach check`` run them (and tests/unit/cases/test_workflow_goldens.py).
Each case starts in the workflow's initial state (or ``start:``) and makes its steps in order; a
step moves the case to a state as a caller holding some roles and says what must follow: the new
state and Task.status, the events announced, the SLA of the new state for the case's priority, or
that the move is refused (``not-allowed``: the workflow has no such transition; ``forbidden``: none
of the roles may make it). A refused step leaves the case where it was::

    workflow: clinical-review
    cases:
      - name: a reviewer escalates, a supervisor takes it back
        priority: urgent
        steps:
          - move: in-review
            as: [reviewer]
            expect: {state: in-review, status: in-progress, due_minutes: 480}
          - move: escalated
            as: [reviewer]
            expect: {state: escalated, events: [case.status_changed, case.escalated]}
          - move: in-review
            as: [reviewer]
            expect: {refused: forbidden}

The moves are checked by the same pure functions the engine's :func:`~hms_ach.cases.transitions.move`
uses (:func:`~hms_ach.cases.transitions.check_move`, :func:`~hms_ach.cases.transitions.move_events`)
on the :class:`~hms_ach.cases.workflow.Workflow`: no store is needed. Results are the
:class:`~hms_ach.mapping.goldens.CaseResult` of the other goldens, placed at the failing step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hms_ach.cases.transitions import MoveRefused, check_move, move_events
from hms_ach.cases.workflow import Workflow, workflows
from hms_ach.core.errors import ConfigError, ConfigErrors
from hms_ach.mapping.goldens import CaseResult, is_workflow_golden
from hms_ach.mapping.loader import MappingSet, Positions, load_yaml, position_of
from hms_ach.mapping.spec import TASK_PRIORITIES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StepExpect(_Strict):
    state: str | None = Field(None, description="The state the case is in after the step")
    status: str | None = Field(None, description="The Task.status after the step")
    refused: Literal["not-allowed", "forbidden"] | None = Field(
        None, description="The move is refused: not-allowed (no such transition) or forbidden (roles)"
    )
    events: list[str] | None = Field(None, description="The events the move announces, in order")
    due_minutes: int | None = Field(
        None, description="The SLA of the new state for the case's priority, in minutes; null: no timer"
    )


class Step(_Strict):
    move: str = Field(description="The state to move to")
    as_: list[str] = Field(alias="as", description="The caller's token roles, e.g. [reviewer]")
    expect: StepExpect = Field(description="What follows")


class WorkflowCase(_Strict):
    name: str = Field(description="Name of the case, unique within the file")
    description: str = Field("", description="What the case shows")
    priority: str = Field("routine", description="Task.priority: routine | urgent | asap | stat")
    start: str | None = Field(None, description="The state the case starts in (default: the initial state)")
    steps: list[Step] = Field(min_length=1, description="The moves, in order")


class WorkflowGolden(_Strict):
    workflow: str = Field(description="The workflow's name (its case type), e.g. clinical-review")
    cases: list[WorkflowCase] = Field(min_length=1, description="The cases")


def discover(mappings_root: Path | str) -> list[Path]:
    """The workflow golden files under ``mappings_root`` (or the file itself when it is one)."""
    root = Path(mappings_root)
    if root.is_file():
        return [root] if is_workflow_golden(root) else []
    return sorted(p for p in root.rglob("*_test.yaml") if is_workflow_golden(p))


def load(path: Path) -> tuple[WorkflowGolden, Positions]:
    """Read and check one workflow golden file; ConfigErrors name ``file:line:col``."""
    try:
        data, positions = load_yaml(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from exc
    try:
        model = WorkflowGolden.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(p) for p in loc)
            msg = f"unknown key {loc[-1]!r}" if err["type"] == "extra_forbidden" else f"{where}: {err['msg']}"
            errors.append(ConfigError(msg, position_of(path, positions, loc)))
        raise ConfigErrors(errors) from exc
    return model, positions


def run_file(path: Path, mset: MappingSet) -> list[CaseResult]:
    """Run every case of one workflow golden file; a broken file is one failed result saying why."""
    try:
        golden, positions = load(path)
    except ConfigErrors as exc:
        return [CaseResult(path.name, False, message=str(exc), file=str(path))]
    known = workflows(mset)
    wf = known.get(golden.workflow)
    if wf is None:
        pos = position_of(path, positions, ("workflow",))
        message = (
            f"{pos}: unknown workflow {golden.workflow!r} (expected one of {', '.join(known) or 'none'})"
        )
        return [CaseResult(path.name, False, message=message, file=str(path), line=pos.line or 0)]
    return [run_case(wf, case, i, path, positions) for i, case in enumerate(golden.cases)]


def _line(path: Path, positions: Positions, *loc: Any) -> int:
    return position_of(path, positions, loc).line or 0


def run_case(wf: Workflow, case: WorkflowCase, index: int, path: Path, positions: Positions) -> CaseResult:
    """Replay case ``index`` through ``wf``; the result fails at the first step that differs."""
    result = CaseResult(case.name, False, file=str(path), line=_line(path, positions, "cases", index))
    names = [s.name for s in wf.spec.states]
    if case.priority not in TASK_PRIORITIES:
        result.message = f"unknown priority {case.priority!r} (expected one of {', '.join(TASK_PRIORITIES)})"
        return result
    state = case.start or wf.initial.name
    if state not in names:
        result.message = f"unknown start state {state!r} (expected one of {', '.join(names)})"
        return result
    for j, step in enumerate(case.steps):
        problems = _step(wf, state, step, case.priority)
        if problems:
            result.line = _line(path, positions, "cases", index, "steps", j)
            result.message = f"step {j + 1} (move to {step.move} as {', '.join(step.as_)}): " + "; ".join(
                problems
            )
            return result
        if step.expect.refused is None:
            state = step.move
    result.passed = True
    return result


def _step(wf: Workflow, state: str, step: Step, priority: str) -> list[str]:
    """What differs between the step's expectation and the move from ``state`` (empty: none)."""
    want = step.expect
    try:
        check_move(wf, state, step.move, step.as_)
    except MoveRefused as exc:
        if want.refused == exc.reason:
            return (
                [] if want.state in (None, state) else [f"refused, the case stays {state}, not {want.state}"]
            )
        return [f"refused ({exc.reason}): {exc.detail}"]
    if want.refused is not None:
        return [f"expected the move to be refused ({want.refused}), but it is allowed"]
    got = wf.state(step.move)
    problems = []
    if want.state is not None and want.state != got.name:
        problems.append(f"state is {got.name}, expected {want.state}")
    if want.status is not None and want.status != got.status:
        problems.append(f"status is {got.status}, expected {want.status}")
    if want.events is not None and want.events != move_events(wf, got.name):
        problems.append(f"events are {move_events(wf, got.name)}, expected {want.events}")
    if "due_minutes" in want.model_fields_set and want.due_minutes != wf.sla_minutes(got.name, priority):
        problems.append(
            f"the SLA is {wf.sla_minutes(got.name, priority)} minutes, expected {want.due_minutes}"
        )
    return problems
