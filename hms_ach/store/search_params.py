"""Search parameters declared as data (placeholder; the FHIR API work fills this in).

Contract used by the store: ``index_rows(resource_type, resource) -> {kind: [row, ...]}`` where
kind is one of token/string/date/reference and each row holds the columns of the matching
``search_*`` table except resource_type and resource_id.
"""

from __future__ import annotations

from typing import Any


def index_rows(resource_type: str, resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    subject = resource.get("subject")
    if resource_type == "Encounter" and isinstance(subject, dict):
        ref = str(subject.get("reference", ""))
        if "/" in ref:
            t, i = ref.split("/", 1)
            out["reference"] = [{"param": "subject", "target_type": t, "target_id": i}]
    return out
