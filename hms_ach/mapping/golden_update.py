"""``hms-ach mapping test --update``: accept what the mappings produce now as a case's expectation.

For every case that fails, the case's ``expect`` is rewritten in place with what its input maps to
now: the records (resourceType, key, content; ``create: false`` for an update-only write) and, when
the case checks them, the store actions; the error (code, location, ACK code, message) for a case
whose input is refused; the payload for an event case. The rest of the file (other cases, comments,
key order) is kept by ruamel.yaml's round trip. The command prints each failure's diff first, so the
change is seen before it is written; the rewritten files are then reviewed in git like any edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from hms_ach.core.errors import MessageError
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.goldens import (
    CaseResult,
    GoldenCase,
    Hl7Parser,
    load_golden_file,
    normalised_records,
    produce,
    run_case,
)
from hms_ach.mapping.loader import MappingSet


def _expectation(case: GoldenCase, path: Path, mset: MappingSet, repo_root: Path, parse: Hl7Parser) -> Any:
    """What ``case`` produces now, as its ``expect`` section (None when it cannot be computed)."""
    engine = MappingEngine(mset, case.timezone)
    if case.event is not None:
        payload = engine.map_event(case.event.event, case.event.context())
        return None if payload is None else {"payload": payload}
    try:
        mapped = produce(case, path, engine, repo_root, parse)
    except MessageError as exc:
        return {
            "error": {
                "code": str(exc.code),
                "location": exc.location,
                "ack": exc.ack_code,
                "message": exc.message,
            }
        }
    except OSError:
        return None
    records = []
    for rec in normalised_records(mapped):
        out: dict[str, Any] = {"resourceType": rec["resourceType"]}
        if rec["key"] is not None:
            out["key"] = {k: v for k, v in rec["key"].items() if v is not None}
        if rec["create"] is False:
            out["create"] = False
        out["content"] = rec["content"]
        records.append(out)
    expect: dict[str, Any] = {"records": records}
    if case.expect.actions is not None:
        expect["actions"] = [{"name": a.name, "args": dict(a.args)} for a in mapped.actions]
    return expect


def update_golden_file(
    path: Path, mset: MappingSet, repo_root: Path, parse: Hl7Parser
) -> tuple[list[CaseResult], list[str]]:
    """Run the cases of ``path`` and rewrite the ``expect`` of each failing one with what it produces
    now; returns every case's result (before the update) and the names of the cases rewritten."""
    golden = load_golden_file(path)
    results = [run_case(golden, i, mset, repo_root, parse) for i in range(len(golden.model.cases))]
    failing = [i for i, r in enumerate(results) if not r.passed]
    if not failing:
        return results, []
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 120
    doc = yaml.load(path.read_text(encoding="utf-8"))
    updated = []
    for i in failing:
        case = golden.model.cases[i]
        expect = _expectation(case, path, mset, repo_root, parse)
        if expect is None:
            continue
        node = doc["cases"][i]
        node["expect"] = CommentedMap(expect)
        if case.match == "subset" and "records" in expect:
            node.pop("match", None)  # the written records are the whole output: subset still holds
        updated.append(case.name)
    if updated:
        with path.open("w", encoding="utf-8") as fh:
            yaml.dump(doc, fh)
    return results, updated
