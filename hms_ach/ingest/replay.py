"""Replay stored messages through a (possibly changed) mapping set, and show what would change.

The messages run through the real store path (upserts, merges, history, actions) inside one
transaction. For a dry run that transaction is rolled back, so the diff shown is exactly what
``--apply`` would write, including the effect of earlier messages on later ones.

Each message is replayed the way it came in, chosen by its content type in ONE table
(content type -> :data:`Replayer`), given to :func:`replay_messages` by its caller:

* ``hl7v2``: parsed and mapped again (:func:`hms_ach.ingest.pipeline.replay_hl7`), with its
  channel's policy (:func:`hl7_replayer`);
* ``csv``: a stored bad row is mapped again with its dataset's CSV mapping
  (:func:`hms_ach.ingest.csv_rows.replay_stored_row`, :func:`csv_replayer`);
* ``file``: the record of a whole HL7 v2 file holds no message; its messages are replayed one by one;
* ``fhir+json`` (the ``fhir_rest`` channel): registered by the composition root
  (:mod:`hms_ach.app.cli`) from :mod:`hms_ach.fhir.replay`, since ingest does not import fhir.

What cannot be run again (the record of a whole file, a connection error, a workforce API
request, a content type the table lacks) is reported with the reason and left as it is.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson

from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.csv_rows import replay_stored_row
from hms_ach.ingest.pipeline import replay_hl7
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store import audit, messages
from hms_ach.store.db import Store
from hms_ach.store.messages import StoredMessage
from hms_ach.store.port import Tx
from hms_ach.store.versions import version_body


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


def change(tx: Tx, resource_type: str, rid: str, version: int, reference: str) -> RecordChange:
    """What version ``version`` of a record changed against the version before it."""
    after = version_body(tx, resource_type, rid, version)
    before = version_body(tx, resource_type, rid, version - 1)
    return RecordChange(reference, before is None, _diff(_body(before), _body(after), reference))


#: Replays one stored message (the row of ``hms_ach.store.messages``) in the caller's transaction.
Replayer: TypeAlias = Callable[[Tx, StoredMessage], ReplayReport]


def hl7_replayer(engine: MappingEngine, policies: Mapping[str, Hl7Policy]) -> Replayer:
    """HL7 v2 messages, evaluated again with their channel's policy (the default one when it is gone)."""

    def replay(tx: Tx, row: StoredMessage) -> ReplayReport:
        policy = policies.get(row.channel) or Hl7Policy(row.channel)
        out = replay_hl7(tx, int(row.id), bytes(row.raw), policy, engine)
        report = ReplayReport(
            int(row.id), row.message_type, row.status, out.status, out.result_code, out.error
        )
        report.changes = [
            change(tx, w.resource_type, w.id, w.version_id, w.reference) for w in out.writes if w.changed
        ]
        return report

    return replay


def csv_replayer(engine: MappingEngine) -> Replayer:
    """Stored bad CSV rows, mapped again with their dataset's mapping."""

    def replay(tx: Tx, row: StoredMessage) -> ReplayReport:
        try:
            out = replay_stored_row(tx, engine, int(row.id))
        except (KeyError, ValueError) as exc:
            return not_replayable(row, str(exc).strip("'\""))
        report = ReplayReport(
            int(row.id), row.message_type, row.status, out.status, "AE" if out.error else "AA", out.error
        )
        report.changes = [
            change(tx, w.resource_type, w.id, w.version_id, w.reference) for w in out.writes if w.changed
        ]
        return report

    return replay


def _whole_file(_tx: Tx, row: StoredMessage) -> ReplayReport:
    return not_replayable(
        row, f"message {row.id} records a whole file: its messages are stored one by one (replay those)"
    )


def replayers(engine: MappingEngine, policies: Mapping[str, Hl7Policy]) -> dict[str, Replayer]:
    """The replayers of the content types ingest knows (``hl7v2``, ``csv``, ``file``); the composition
    root adds the others (``fhir+json``)."""
    return {"hl7v2": hl7_replayer(engine, policies), "csv": csv_replayer(engine), "file": _whole_file}


def not_replayable(row: StoredMessage, reason: str) -> ReplayReport:
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
    ids: list[int],
    table: Mapping[str, Replayer],
    apply: bool,
    actor: str | None = None,
    on_each: Callable[[int], None] | None = None,
) -> list[ReplayReport]:
    """Replay ``ids`` (in order) in one transaction, each by the replayer of its content type in
    ``table``; committed when ``apply``, else rolled back. Duplicates are skipped. ``actor`` (an
    ``audit.actor_json`` text): who replays, the actor of every audit entry the replay writes.
    ``on_each(1)`` is called as each message is taken (a progress bar)."""
    reports: list[ReplayReport] = []
    with store.transaction(commit=apply) as conn:
        for mid in ids:
            if on_each is not None:
                on_each(1)
            row = messages.get(conn, mid)
            if row is None or row.status == "duplicate":
                continue
            replayer = table.get(row.content_type)
            if replayer is None:
                reports.append(
                    not_replayable(
                        row,
                        f"content type {row.content_type!r} (channel {row.channel}) "
                        "is not replayed; send the request again",
                    )
                )
                continue
            if actor is None:
                reports.append(replayer(conn, row))
                continue
            with audit.acting(conn, actor):
                reports.append(replayer(conn, row))
    return reports
