"""FHIR ``AuditEvent`` search at /fhir/AuditEvent, rendered from the audit trail (read-only).

The route is declared in :mod:`hms_ach.fhir.routes`; :func:`search_audit_events` answers it.

Parameters: ``entity`` (``Practitioner/123`` or a type), ``agent`` (channel or client name),
``date`` (``ge``/``gt``/``le``/``lt`` prefixes on the recorded instant, repeatable), ``_count`` and
``_cursor`` (keyset paging on the chain order).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import Request
from starlette.responses import Response

from hms_ach.fhir.outcomes import FHIR_JSON, FhirError
from hms_ach.store import audit
from hms_ach.store.db import Store
from hms_ach.store.search_params import date_range

MAX_COUNT = 200


def date_bounds(values: list[str], name: str = "date") -> tuple[str | None, str | None]:
    """FHIR date criteria (with prefixes) -> (inclusive since, exclusive until) as audit instants."""
    since: str | None = None
    until: str | None = None
    for raw in values:
        prefix = raw[:2] if raw[:2] in ("ge", "gt", "le", "lt", "eq") else "eq"
        text = raw[2:] if raw[:2] == prefix else raw
        try:
            lo, hi = date_range(text)
        except ValueError as exc:
            raise FhirError(400, "invalid", f"{name}={raw[:40]!r}: {exc}", expression=name) from None
        lo_s, hi_s = audit.instant(lo), audit.instant(hi)
        if prefix in ("ge", "eq"):
            since = max(since or lo_s, lo_s)
        if prefix == "gt":
            since = max(since or hi_s, hi_s)
        if prefix in ("le", "eq"):
            until = min(until or hi_s, hi_s)
        if prefix == "lt":
            until = min(until or lo_s, lo_s)
    return since, until


def search_audit_events(store: Store, request: Request, visible: bool = True) -> Response:
    """``GET /fhir/AuditEvent``: a searchset of the audit entries matching the query parameters;
    empty when the caller may not see the trail (``visible``: a grant limited to a patient
    compartment, which the trail is not in)."""
    params = request.query_params
    known = {"entity", "agent", "date", "_count", "_cursor", "_format"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise FhirError(
            400,
            "not-supported",
            f"unknown AuditEvent search parameter(s): {', '.join(unknown)}; supported: entity, agent, date",
            expression=unknown[0],
        )
    count_text, cursor_text = params.get("_count", "50"), params.get("_cursor", "0")
    if not count_text.isdigit() or not cursor_text.isdigit():
        raise FhirError(400, "invalid", "_count and _cursor must be whole numbers")
    since, until = date_bounds(params.getlist("date"))
    q = audit.AuditQuery(
        entity=params.get("entity"),
        agent=params.get("agent"),
        since=since,
        until=until,
        after_seq=int(cursor_text),
        limit=min(int(count_text), MAX_COUNT),
    )
    rows, next_seq = audit.search_trail(store, q) if visible else ([], None)
    base = str(request.base_url).rstrip("/") + "/fhir/AuditEvent"
    keep = [(k, v) for k, v in params.multi_items() if k != "_cursor"]
    links = [{"relation": "self", "url": f"{base}?{urlencode(params.multi_items())}"}]
    if next_seq is not None:
        links.append({"relation": "next", "url": f"{base}?{urlencode(keep + [('_cursor', str(next_seq))])}"})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "meta": {"lastUpdated": datetime.now(UTC).isoformat().replace("+00:00", "Z")},
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/audit-{r['seq']}",
                "resource": audit.as_audit_event(r),
                "search": {"mode": "match"},
            }
            for r in rows
        ],
    }
    if next_seq is None and int(cursor_text) == 0:
        bundle["total"] = len(rows)  # every match is on this first page (the trail is not counted otherwise)
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON)
