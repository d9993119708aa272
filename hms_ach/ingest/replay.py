"""Replay stored messages through a (possibly changed) mapping set, and show what would change.

The messages run through the real store path (upserts, merges, history, actions) inside one
transaction. For a dry run that transaction is rolled back, so the diff shown is exactly what
``--apply`` would write, including the effect of earlier messages on later ones.

Each message is replayed the way it came in, chosen by its content type:

* ``hl7v2``: parsed and mapped again (:func:`hms_ach.ingest.pipeline.evaluate`), with its channel's policy;
* ``fhir+json`` (the ``fhir_rest`` channel): the stored body is run again as the same request
  (method, URL and If-Match / If-None-Exist, kept in ``message_fhir_request``): validated, mapped
  with the FHIR mappings and written by :func:`hms_ach.fhir.write.apply_request`;
* ``csv``: a stored bad row is mapped again with its dataset's CSV mapping
  (:func:`hms_ach.channels.sftp_csv.replay_stored_row`).

What cannot be run again (the record of a whole CSV file, a connection error, a workforce API
request) is reported with the reason and left as it is.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, and_, select

from hms_ach.fhir.outcomes import FhirError
from hms_ach.ingest.pipeline import Hl7Policy, _charset, apply_evaluation, evaluate
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store import messages
from hms_ach.store.db import Store
from hms_ach.store.models import ResourceHistory

H = ResourceHistory.__table__  # type: ignore[attr-defined]


@dataclass
class RecordChange:
    reference: str
    created: bool
    diff: str


@dataclass
class ReplayReport:
    message_id: int
    message_type: str
    status_before: str
    status_after: str
    ack_code: str
    error: str | None = None
    changes: list[RecordChange] = field(default_factory=list)
    replayable: bool = True


def _body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    data = orjson.loads(text)
    return {k: v for k, v in data.items() if k != "meta"}


def _diff(before: dict[str, Any], after: dict[str, Any], ref: str) -> str:
    a = json.dumps(before, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    b = json.dumps(after, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    return "\n".join(difflib.unified_diff(a, b, f"{ref} (stored)", f"{ref} (replayed)", lineterm="", n=2))


def _change(conn: Connection, resource_type: str, rid: str, version: int, reference: str) -> RecordChange:
    def body(v: int) -> str | None:
        return conn.execute(
            select(H.c.resource).where(
                and_(H.c.resource_type == resource_type, H.c.id == rid, H.c.version_id == v)
            )
        ).scalar()

    after, before = body(version), body(version - 1)
    return RecordChange(reference, before is None, _diff(_body(before), _body(after), reference))


def _replay_hl7(
    conn: Connection, row: Any, engine: MappingEngine, policies: dict[str, Hl7Policy]
) -> ReplayReport:
    policy = policies.get(row.channel) or Hl7Policy(row.channel)
    ev = evaluate(bytes(row.raw), policy, engine)
    out = apply_evaluation(conn, ev, int(row.id), _charset(ev, policy), replay=True)
    report = ReplayReport(int(row.id), row.message_type, row.status, out.status, out.ack_code, out.error)
    report.changes = [
        _change(conn, w.resource_type, w.id, w.version_id, w.reference) for w in out.writes if w.changed
    ]
    return report


def _replay_fhir(conn: Connection, row: Any, engine: MappingEngine, max_bundle_entries: int) -> ReplayReport:
    from hms_ach.channels.fhir_rest import request_operations
    from hms_ach.fhir.write import (
        RequestLine,
        apply_request,
        prepare,
        record_rejection,
        stored_request_line,
    )

    mid = int(row.id)
    line = stored_request_line(conn, mid)
    if line is None:
        # stored before request lines were kept: a Bundle or a plain create carries all it needs
        kind, _, rtype = str(row.message_type).partition(" ")
        if row.message_type == "Bundle":
            line = RequestLine("POST", "")
        elif kind == "POST" and rtype:
            line = RequestLine("POST", rtype)
        else:
            return _not_replayable(row, "its URL and headers were not stored (written by an older version)")
    try:
        body = orjson.loads(bytes(row.raw)) if line.method != "DELETE" else None
        ops, kind = request_operations(line, body, max_bundle_entries)
        for op in ops:
            prepare(op, engine)
    except orjson.JSONDecodeError as exc:
        return _not_replayable(row, f"the stored body is not JSON: {exc}")
    except FhirError as exc:
        record_rejection(conn, mid, exc, replay=True)
        return ReplayReport(mid, row.message_type, row.status, "rejected", str(exc.status), exc.diagnostics)
    out = apply_request(conn, mid, ops, kind, replay=True)
    status = "error" if out.error else "processed"
    report = ReplayReport(
        mid,
        row.message_type,
        row.status,
        status,
        str(out.error.status) if out.error else "200",
        out.error.diagnostics if out.error else None,
    )
    failed = [r for r in out.results if r.status >= 400]
    if failed and report.error is None:  # a batch whose entries failed in part
        report.error = f"{len(failed)} of {len(out.results)} entries failed"
    report.changes = [
        _change(conn, r.resource_type, r.rid, r.version, f"{r.resource_type}/{r.rid}")
        for r in out.results
        if r.changed and r.rid
    ]
    return report


def _replay_csv(conn: Connection, row: Any, engine: MappingEngine) -> ReplayReport:
    from hms_ach.channels.sftp_csv import replay_stored_row

    try:
        out = replay_stored_row(conn, engine, int(row.id))
    except (KeyError, ValueError) as exc:
        return _not_replayable(row, str(exc).strip("'\""))
    report = ReplayReport(
        int(row.id), row.message_type, row.status, out.status, "AE" if out.error else "AA", out.error
    )
    report.changes = [
        _change(conn, w.resource_type, w.id, w.version_id, w.reference) for w in out.writes if w.changed
    ]
    return report


def _not_replayable(row: Any, reason: str) -> ReplayReport:
    return ReplayReport(
        int(row.id),
        row.message_type,
        row.status,
        row.status,
        row.ack_code or "",
        f"not replayable: {reason}",
        replayable=False,
    )


def replay_messages(
    store: Store,
    engine: MappingEngine,
    ids: list[int],
    policies: dict[str, Hl7Policy],
    apply: bool,
    max_bundle_entries: int = 1000,
) -> list[ReplayReport]:
    """Replay ``ids`` (in order) in one transaction; committed when ``apply``, else rolled back."""
    reports: list[ReplayReport] = []
    conn = store.writer.connect()
    txn = conn.begin()
    try:
        for mid in ids:
            row = messages.get(conn, mid)
            if row is None or row.status == "duplicate":
                continue
            if row.content_type == "fhir+json":
                reports.append(_replay_fhir(conn, row, engine, max_bundle_entries))
            elif row.content_type == "csv":
                reports.append(_replay_csv(conn, row, engine))
            elif row.content_type == "hl7v2":
                reports.append(_replay_hl7(conn, row, engine, policies))
            else:
                reports.append(
                    _not_replayable(
                        row,
                        f"content type {row.content_type!r} (channel {row.channel}) "
                        "is not replayed; send the request again",
                    )
                )
        if apply:
            txn.commit()
        else:
            txn.rollback()
    except BaseException:
        txn.rollback()
        raise
    finally:
        conn.close()
    return reports
