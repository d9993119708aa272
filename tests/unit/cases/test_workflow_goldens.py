"""The workflow goldens: the shipped ones pass, and a wrong expectation fails at its step."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.cases import workflow_goldens
from hms_ach.mapping import goldens
from hms_ach.mapping.loader import MappingSet, load_mappings

ROOT = Path(__file__).resolve().parents[3]
MAPPINGS = ROOT / "mappings"


@pytest.fixture(scope="module")
def mset() -> MappingSet:
    return load_mappings(MAPPINGS)


def test_the_shipped_workflows_have_goldens_and_they_pass(mset: MappingSet) -> None:
    files = workflow_goldens.discover(MAPPINGS)
    assert [f.name for f in files] == ["clinical-review_test.yaml", "complaint_test.yaml"]
    results = [r for f in files for r in workflow_goldens.run_file(f, mset)]
    assert len(results) >= 6
    assert [r.report() for r in results if not r.passed] == []
    # the mapping goldens leave them to this runner
    assert not set(files) & set(goldens.discover(MAPPINGS))


def _run(tmp_path: Path, mset: MappingSet, text: str) -> list[goldens.CaseResult]:
    path = tmp_path / "workflows" / "x_test.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    assert workflow_goldens.discover(tmp_path) == [path]
    return workflow_goldens.run_file(path, mset)


CASE = """\
workflow: clinical-review
cases:
  - name: one
    priority: urgent
    steps:
      - move: in-review
        as: [reviewer]
        expect: {state: in-review}
      - move: escalated
        as: [reviewer]
        expect: %s
"""


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ("{state: escalated, status: on-hold}", ""),
        (
            "{status: in-progress}",
            "step 2 (move to escalated as reviewer): status is on-hold, expected in-progress",
        ),
        ("{refused: forbidden}", "expected the move to be refused (forbidden), but it is allowed"),
        ("{events: [case.status_changed]}", "events are ['case.status_changed', 'case.escalated']"),
        ("{due_minutes: 10}", "the SLA is None minutes, expected 10"),
    ],
)
def test_a_step_that_differs_fails_at_its_line(
    tmp_path: Path, mset: MappingSet, expect: str, message: str
) -> None:
    (result,) = _run(tmp_path, mset, CASE % expect)
    assert result.passed is (message == ""), result.report()
    if message:
        assert result.line == 9 and message in result.message


def test_refused_moves_say_why(tmp_path: Path, mset: MappingSet) -> None:
    text = CASE.replace(
        "as: [reviewer]\n        expect: {state: in-review}",
        "as: [auditor]\n        expect: {state: in-review}",
    )
    (result,) = _run(tmp_path, mset, text % "{}")
    assert not result.passed and result.line == 6
    assert (
        "refused (forbidden): moving from triage to in-review needs one of the roles reviewer, supervisor"
        in (result.message)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workflow: nope\ncases:\n  - name: a\n    steps: [{move: x, as: [r], expect: {}}]\n",
            "unknown workflow 'nope'",
        ),
        ("workflow: complaint\ncases:\n  - name: a\n    stepz: []\n", "x_test.yaml:4:5: unknown key 'stepz'"),
        (
            "workflow: complaint\ncases:\n  - name: a\n    start: gone\n    steps: [{move: x, as: [r], expect: {}}]\n",
            "unknown start state 'gone'",
        ),
    ],
)
def test_broken_golden_files_say_where(tmp_path: Path, mset: MappingSet, text: str, message: str) -> None:
    (result,) = _run(tmp_path, mset, text)
    assert not result.passed and message in result.message
