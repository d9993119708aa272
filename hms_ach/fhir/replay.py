"""Replay of stored FHIR writes (content type ``fhir+json``, the ``fhir_rest`` channel).

The stored body is run again as the same request (method, URL and If-Match / If-None-Exist, kept
in ``message_fhir_request``): validated, mapped with the FHIR mappings and written by
:func:`hms_ach.fhir.write.apply_request`. The composition root puts :func:`fhir_replayer` in the
replay table of :func:`hms_ach.ingest.replay.replay_messages`.
"""

from __future__ import annotations

import orjson

from hms_ach.fhir.bundles import request_operations
from hms_ach.fhir.outcomes import FhirError
from hms_ach.fhir.write import RequestLine, apply_request, prepare, rejection, stored_request_line
from hms_ach.ingest import pipeline
from hms_ach.ingest.replay import Replayer, ReplayReport, change, not_replayable
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store.messages import StoredMessage
from hms_ach.store.port import Tx


def fhir_replayer(engine: MappingEngine, max_bundle_entries: int) -> Replayer:
    """Stored FHIR writes, run again as the same request with ``engine``'s FHIR mappings."""

    def replay(tx: Tx, row: StoredMessage) -> ReplayReport:
        return replay_fhir(tx, row, engine, max_bundle_entries)

    return replay


def replay_fhir(conn: Tx, row: StoredMessage, engine: MappingEngine, max_bundle_entries: int) -> ReplayReport:
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
            return not_replayable(row, "its URL and headers were not stored (written by an older version)")
    try:
        body = orjson.loads(bytes(row.raw)) if line.method != "DELETE" else None
        ops, kind = request_operations(line, body, max_bundle_entries)
        # a batch's malformed entries and reads were never applied: nothing to replay
        ops = [op for op in ops if op.refused is None and op.method != "GET"]
        for op in ops:
            prepare(op, engine)
    except orjson.JSONDecodeError as exc:
        return not_replayable(row, f"the stored body is not JSON: {exc}")
    except FhirError as exc:
        pipeline.finish(conn, mid, rejection(exc), replay=True)
        return ReplayReport(mid, row.message_type, row.status, "rejected", str(exc.status), exc.diagnostics)
    out = pipeline.rerun(conn, mid, lambda tx, message_id: apply_request(tx, message_id, ops, kind))
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
        change(conn, r.resource_type, r.rid, r.version, f"{r.resource_type}/{r.rid}")
        for r in out.results
        if r.changed and r.rid
    ]
    return report
