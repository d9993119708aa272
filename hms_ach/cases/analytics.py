"""Review analytics over a window, computed from the cases' Task version histories
(docs/review-cases.md, "Analytics", defines every figure; this module is the definition's code).

A Task version is a step of its case: it carries the state it is in (``businessStatus``) and when
it was written (``lastModified``; the store's write time when absent). The figures of a window
``[start, end)``:

* **throughput per reviewer**: the cases *resolved* in the window, i.e. whose last entry into a
  final state of their workflow falls in it, counted for the case's owner at that version
  (``unassigned`` when none);
* **time per case**: ``authoredOn`` to that resolution, over the cases resolved in the window;
* **time per state**: each stay in a state, from the version entering it to the first version in
  another state, over the stays that ended in the window;
* **SLA breaches**: the versions written in the window that newly carry the
  ``case-sla-breached`` extension, or (a case without that extension) enter an escalation state
  by the engine itself (the note says ``by hms-ach``: the SLA timer);
* **policy-violation rate**: of the findings of the cases (QuestionnaireResponses in a version's
  ``Task.output``) authored in the window, the share :func:`violating_findings` flags (an error policy broken when submitted);
* **reopen rate**: of the cases with a version written in the window, the share with a version in
  the window that leaves a final state, or leaves an escalation state for a state neither final
  nor escalation (``escalated -> in-review``).

Medians and the 90th percentile are nearest-rank (:func:`percentile`); durations are seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hms_ach.cases.findings import POLICY_VIOLATION_EXT
from hms_ach.cases.transitions import ENGINE_ACTOR, escalation_states
from hms_ach.cases.workflow import Workflow, case_type_of, state_of
from hms_ach.store.case_audit_queries import RecordVersion

#: Task.extension: the case breached its SLA (written by the SLA timer when it escalates).
SLA_BREACHED_EXT = "urn:hms-ach:fhir:StructureDefinition/case-sla-breached"


@dataclass(frozen=True)
class Window:
    """``[start, end)``, UTC."""

    start: datetime
    end: datetime

    def holds(self, moment: datetime | None) -> bool:
        return moment is not None and self.start <= moment < self.end


@dataclass(frozen=True)
class Rules:
    """What the figures need of a workflow: its final states and its escalation states."""

    final: frozenset[str]
    escalation: frozenset[str]

    @classmethod
    def of(cls, wf: Workflow) -> Rules:
        return cls(frozenset(s.name for s in wf.spec.states if s.final), escalation_states(wf))


@dataclass(frozen=True)
class Step:
    """One version of a case: when, in which state, whose."""

    at: datetime
    state: str
    owner: str | None
    task: dict[str, Any]


def parse_instant(text: Any) -> datetime | None:
    """A FHIR dateTime or instant as an aware UTC datetime; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100): the smallest value with at least ``p``
    percent of the values at or below it, i.e. the ``ceil(p/100 * n)``-th smallest. The median is
    ``p = 50`` (of an even count, the lower of the two middle values). None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def steps_of(versions: list[RecordVersion]) -> list[Step]:
    """The steps of a case from its versions (deleted versions left out), oldest first."""
    out: list[Step] = []
    for v in versions:
        if v.deleted:
            continue
        task = v.content
        owner = (task.get("owner") or {}).get("reference") if isinstance(task.get("owner"), dict) else None
        at = parse_instant(task.get("lastModified")) or v.last_updated.astimezone(UTC)
        out.append(Step(at, state_of(task) or str(task.get("status") or ""), owner, task))
    return out


def _resolution(steps: list[Step], rules: Rules, window: Window) -> Step | None:
    """The case's last entry into a final state that falls in ``window``."""
    found = None
    for prev, step in zip([None, *steps], steps, strict=False):
        entered = step.state in rules.final and (prev is None or prev.state not in rules.final)
        if entered and window.holds(step.at):
            found = step
    return found


def _stays(steps: list[Step]) -> list[tuple[str, datetime, datetime]]:
    """(state, entered, left) of every stay that ended (the case moved on)."""
    out: list[tuple[str, datetime, datetime]] = []
    if not steps:
        return out
    first = steps[0]
    state, entered = first.state, parse_instant(first.task.get("authoredOn")) or first.at
    for step in steps[1:]:
        if step.state != state:
            out.append((state, entered, step.at))
            state, entered = step.state, step.at
    return out


def _has_ext(task: dict[str, Any], url: str) -> bool:
    return any(isinstance(e, dict) and e.get("url") == url for e in task.get("extension") or [])


def _engine_escalation(prev: Step, step: Step, rules: Rules) -> bool:
    if step.state not in rules.escalation or prev.state == step.state:
        return False
    notes = step.task.get("note") or []
    new = notes[len(prev.task.get("note") or []) :]
    return any(f" by {ENGINE_ACTOR}" in str(n.get("text") or "") for n in new if isinstance(n, dict))


def sla_breaches(steps: list[Step], rules: Rules, window: Window) -> int:
    """The SLA breaches of one case in ``window`` (see the module docstring)."""
    flagged = any(_has_ext(s.task, SLA_BREACHED_EXT) for s in steps)
    count = 0
    for prev, step in zip(steps, steps[1:], strict=False):
        if not window.holds(step.at):
            continue
        if flagged:
            count += _has_ext(step.task, SLA_BREACHED_EXT) and not _has_ext(prev.task, SLA_BREACHED_EXT)
        else:
            count += _engine_escalation(prev, step, rules)
    if steps and flagged and window.holds(steps[0].at) and _has_ext(steps[0].task, SLA_BREACHED_EXT):
        count += 1
    return count


def reopened(steps: list[Step], rules: Rules, window: Window) -> bool:
    """Whether the case was reopened in ``window`` (see the module docstring)."""
    for prev, step in zip(steps, steps[1:], strict=False):
        if not window.holds(step.at) or prev.state == step.state:
            continue
        if prev.state in rules.final and step.state not in rules.final:
            return True
        if prev.state in rules.escalation and step.state not in rules.final | rules.escalation:
            return True
    return False


def violating_findings(histories: Mapping[str, list[RecordVersion]]) -> set[str]:
    """The ids of the findings that broke an error policy when submitted: their ``Task.output``
    entry carries a :data:`POLICY_VIOLATION_EXT` extension in some version of their case. The one
    place the policy-violation rate asks."""
    out: set[str] = set()
    for versions in histories.values():
        for v in versions:
            for o in v.content.get("output") or []:
                ref = (o.get("valueReference") or {}).get("reference") if isinstance(o, dict) else None
                if (
                    isinstance(ref, str)
                    and ref.startswith("QuestionnaireResponse/")
                    and _has_ext(o, POLICY_VIOLATION_EXT)
                ):
                    out.add(ref.split("/", 1)[1])
    return out


def findings_of(histories: Mapping[str, list[RecordVersion]]) -> set[str]:
    """The ids of the QuestionnaireResponses named in any version's ``Task.output``."""
    out: set[str] = set()
    for versions in histories.values():
        for v in versions:
            for o in v.content.get("output") or []:
                ref = (o.get("valueReference") or {}).get("reference") if isinstance(o, dict) else None
                if isinstance(ref, str) and ref.startswith("QuestionnaireResponse/"):
                    out.add(ref.split("/", 1)[1])
    return out


def _times(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "median_seconds": percentile(values, 50),
        "p90_seconds": percentile(values, 90),
    }


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def compute(
    histories: Mapping[str, list[RecordVersion]],
    findings: Mapping[str, dict[str, Any]],
    rules: Mapping[str, Rules],
    window: Window,
) -> dict[str, Any]:
    """The figures of ``window`` over the cases' ``histories`` (Task id -> versions), their
    ``findings`` (QuestionnaireResponse id -> content) and each case type's ``rules``. Cases of a
    case type without rules (no such workflow loaded) are left out."""
    per_reviewer: dict[str, int] = {}
    case_seconds: list[float] = []
    state_seconds: dict[str, list[float]] = {}
    breaches = breached_cases = active = reopens = 0
    for versions in histories.values():
        steps = steps_of(versions)
        if not steps:
            continue
        case_rules = rules.get(case_type_of(steps[-1].task) or "")
        if case_rules is None:
            continue
        if any(window.holds(s.at) for s in steps):
            active += 1
            reopens += reopened(steps, case_rules, window)
        done = _resolution(steps, case_rules, window)
        if done is not None:
            who = done.owner or "unassigned"
            per_reviewer[who] = per_reviewer.get(who, 0) + 1
            authored = parse_instant(steps[0].task.get("authoredOn")) or steps[0].at
            case_seconds.append((done.at - authored).total_seconds())
        for state, entered, left in _stays(steps):
            if window.holds(left):
                state_seconds.setdefault(state, []).append((left - entered).total_seconds())
        n = sla_breaches(steps, case_rules, window)
        breaches += n
        breached_cases += n > 0
    counted = [qid for qid, qr in findings.items() if window.holds(parse_instant(qr.get("authored")))]
    flagged = violating_findings(histories)
    violations = sum(qid in flagged for qid in counted)
    return {
        "window": {"start": window.start.isoformat(), "end": window.end.isoformat()},
        "percentile": "nearest-rank",
        "cases": active,
        "throughput": {
            "resolved": sum(per_reviewer.values()),
            "per_reviewer": [{"reviewer": r, "resolved": n} for r, n in sorted(per_reviewer.items())],
        },
        "time_per_case": _times(case_seconds),
        "time_per_state": {s: _times(v) for s, v in sorted(state_seconds.items())},
        "sla_breaches": {"count": breaches, "cases": breached_cases},
        "policy_violations": {
            "findings": len(counted),
            "with_violations": violations,
            "rate": _rate(violations, len(counted)),
        },
        "reopen": {"cases": active, "reopened": reopens, "rate": _rate(reopens, active)},
    }
