"""Replay stored messages through a (possibly changed) mapping set, and show what would change.

The messages run through the real store path (upserts, merges, history, actions) inside one
transaction. For a dry run that transaction is rolled back, so the diff shown is exactly what
``--apply`` would write, including the effect of earlier messages on later ones.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import and_, select

from hms_ach.map.engine import MappingEngine
from hms_ach.pipeline import Hl7Policy, _charset, apply_evaluation, evaluate
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


def _body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    data = orjson.loads(text)
    return {k: v for k, v in data.items() if k != "meta"}


def _diff(before: dict[str, Any], after: dict[str, Any], ref: str) -> str:
    a = json.dumps(before, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    b = json.dumps(after, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    return "\n".join(difflib.unified_diff(a, b, f"{ref} (stored)", f"{ref} (replayed)", lineterm="", n=2))


def replay_messages(store: Store, engine: MappingEngine, ids: list[int], policies: dict[str, Hl7Policy],
                    apply: bool) -> list[ReplayReport]:
    reports: list[ReplayReport] = []
    conn = store.writer.connect()
    txn = conn.begin()
    try:
        for mid in ids:
            row = messages.get(conn, mid)
            if row is None or row.status == "duplicate":
                continue
            policy = policies.get(row.channel) or Hl7Policy(row.channel)
            ev = evaluate(bytes(row.raw), policy, engine)
            out = apply_evaluation(conn, ev, mid, _charset(ev, policy), replay=True)
            report = ReplayReport(mid, row.message_type, row.status, out.status, out.ack_code, out.error)
            for w in out.writes:
                if not w.changed:
                    continue
                after = conn.execute(select(H.c.resource).where(and_(
                    H.c.resource_type == w.resource_type, H.c.id == w.id, H.c.version_id == w.version_id))).scalar()
                before = conn.execute(select(H.c.resource).where(and_(
                    H.c.resource_type == w.resource_type, H.c.id == w.id,
                    H.c.version_id == w.version_id - 1))).scalar()
                report.changes.append(RecordChange(w.reference, before is None,
                                                   _diff(_body(before), _body(after), w.reference)))
            reports.append(report)
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
